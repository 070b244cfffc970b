"""``register(fixed, moving, stack)``: the one entry point for inference.

Flow: check inputs -> normalise intensities -> initial alignment (centres by default) -> stage
1..n on their network grids -> optional test-time refinement -> the composed transform
``T = T0 o T1 o ... o Tn`` evaluated on the FULL-resolution fixed grid -> warped moving image
(linear), warped labels (nearest neighbour, or linear on one-hot then argmax), det-Jacobian map,
folding fraction and std of the Jacobian.  All in LPS mm; T maps fixed points to moving points.

Coordinates: the whole computation runs in LPS mm relative to the fixed image's centre (both
grids are translated by minus that centre, in double precision), so images far from the origin
(scanner coordinates of 1e9 mm) register exactly like the same images near it; a translation of
space changes no displacement.  The outputs are put back on the original fixed grid.

Guarantees beyond the input checks of :mod:`dlir.io`: a NaN or infinite value in any stage's
output, the refinement or the composed transform stops the run with one sentence naming it;
label values come back exactly (any integer type, negative or above 2^24: labels are gathered as
integers, never interpolated as floats); a warning (and ``no_overlap`` in :meth:`Registration.summary`)
when fixed and moving hardly overlap after the initial alignment.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import numpy as np
import SimpleITK as sitk
import torch

from .device import resolve_device
from .errors import CancelledError, DeviceError, InputError, StackError
from .export import itk_transform
from .geometry import Grid, image_to_tensor, sample, tensor_to_image
from .io import check_image, check_label_map
from .memory import check_memory
from .metrics import folding_fraction, jacobian_std
from .pipeline import PreparedImage, alignment, check_stage_output, run_stages, stage_grid
from .refine import refine, refinement_grid
from .stack import Stack
from .transforms import Composite, SpatialTransform, jacobian_determinant

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
Cancel = Callable[[], bool]
LabelInterpolation = Literal["nearest", "one-hot-linear"]

#: voxels per chunk when evaluating the transform on the full-resolution fixed grid
_CHUNK_VOXELS = 2_000_000
#: below this share of fixed voxels inside the moving image after the initial alignment, the
#: images count as not overlapping (a warning, and ``no_overlap`` in the summary)
NO_OVERLAP_BELOW = 0.01
#: at most about this many fixed voxels (a regular subset) are used to measure the overlap
_OVERLAP_POINTS = 32**3
#: one-hot-linear with at most this many labels (background included) sums each label's weight
#: directly; beyond, the weights of the 8 neighbours' own labels (the same sums, any label count)
_FEW_LABELS = 16


@dataclass
class Registration:
    """The result of one registration, everything on the full-resolution fixed grid (LPS mm)."""

    displacement: sitk.Image  # 3-vector float32, u(x) with T(x) = x + u(x): fixed -> moving
    warped: sitk.Image  # moving resampled on the fixed grid (linear), float32
    jacobian: sitk.Image  # det(I + du/dx), float32
    warped_labels: sitk.Image | None
    folding_fraction: float  # share of voxels (in the mask when given) with det <= 0
    jacobian_std: float
    device: str
    stack_name: str
    timings: dict[str, float] = field(default_factory=dict)
    overlap_fraction: float = 1.0  # share of fixed voxels inside the moving image after the initial alignment
    warnings: list[str] = field(default_factory=list)  # sentences also logged as warnings
    #: the stage transforms ``[T0, T1, ..., Tn]`` in the computation's coordinates: LPS mm plus ``frame_offset``
    stage_transforms: list[SpatialTransform] = field(default_factory=list, repr=False)
    frame_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def itk_transform(self) -> sitk.CompositeTransform:
        """A new, compact ITK transform equal to ``T`` (fixed -> moving, resampling direction; see :mod:`dlir.export`).

        Its size follows the stages' network grids, not the fixed image.
        """
        return itk_transform(self.stage_transforms, self.frame_offset)

    def summary(self) -> dict[str, object]:
        """JSON-ready numbers of the run."""
        return {
            "stack": self.stack_name,
            "device": self.device,
            "folding_fraction": self.folding_fraction,
            "jacobian_std": self.jacobian_std,
            "overlap_fraction": round(self.overlap_fraction, 4),
            "no_overlap": self.overlap_fraction < NO_OVERLAP_BELOW,
            "warnings": list(self.warnings),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    stack: Stack,
    *,
    moving_labels: sitk.Image | None = None,
    fixed_mask: sitk.Image | None = None,
    device: str = "auto",
    refine_steps: int = 0,
    initial_alignment: str | None = None,
    label_interpolation: LabelInterpolation = "nearest",
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> Registration:
    """Register ``moving`` onto ``fixed`` with ``stack``; inputs are never modified.

    ``initial_alignment`` (``centre``, ``com`` or ``none``) overrides the stack's recipe.
    ``refine_steps`` > 0 runs that many optimiser steps on the stack's loss, starting from the
    networks' output.  ``progress(step, fraction)`` is called between steps (and between chunks
    of the full-resolution warp); ``cancel()`` is polled there too and raises
    :class:`~dlir.errors.CancelledError` when it returns True.
    On ``device="auto"`` a GPU out-of-memory error falls back to the CPU.
    """
    fixed_f = check_image(fixed, "fixed image")
    moving_f = check_image(moving, "moving image")
    if moving_labels is not None:
        check_label_map(moving_labels, moving, "moving label map", "moving image", allow_negative=True)
    if fixed_mask is not None:
        check_label_map(fixed_mask, fixed, "fixed mask", "fixed image")
    if refine_steps < 0:
        raise InputError("the number of refinement steps cannot be negative")
    if label_interpolation not in ("nearest", "one-hot-linear"):
        raise InputError(f"unknown label interpolation {label_interpolation!r}: use nearest or one-hot-linear")
    target = resolve_device(device)
    try:
        return _register(fixed_f, moving_f, stack, moving_labels, fixed_mask, target, refine_steps,
                         initial_alignment, label_interpolation, progress, cancel)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        if device != "auto" and isinstance(exc, DeviceError):  # our own estimate: its sentence says what to do
            raise
        if device != "auto":
            raise DeviceError("the GPU ran out of memory for this pair; choose the CPU (device 'cpu') or free GPU memory") from exc
        log.warning("GPU out of memory; registering on the CPU instead")
        return _register(fixed_f, moving_f, stack, moving_labels, fixed_mask, torch.device("cpu"), refine_steps,
                         initial_alignment, label_interpolation, progress, cancel)


class _Steps:
    """Progress reports, cancellation checks and timings of the named steps of one run."""

    def __init__(self, total: int, progress: Progress | None, cancel: Cancel | None, device: torch.device) -> None:
        self.total, self.done = total, 0
        self.progress, self.cancel, self.device = progress, cancel, device
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.cancel is not None and self.cancel():
            raise CancelledError("the registration was cancelled")
        if self.progress is not None:
            self.progress(name, self.done / self.total)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[name] = time.perf_counter() - start
        self.done += 1
        if self.progress is not None:
            self.progress(name, self.done / self.total)

    def within(self, name: str, fraction: float) -> None:
        """Progress inside the running step ``name`` (``fraction`` of it done); polls cancel."""
        if self.cancel is not None and self.cancel():
            raise CancelledError("the registration was cancelled")
        if self.progress is not None:
            self.progress(name, (self.done + fraction) / self.total)


def _register(
    fixed: sitk.Image,
    moving: sitk.Image,
    stack: Stack,
    moving_labels: sitk.Image | None,
    fixed_mask: sitk.Image | None,
    device: torch.device,
    refine_steps: int,
    initial_mode: str | None,
    label_interpolation: LabelInterpolation,
    progress: Progress | None,
    cancel: Cancel | None,
) -> Registration:
    n_stages = len(stack.stages)
    steps = _Steps(n_stages + 3 + (refine_steps > 0), progress, cancel, device)
    stack = stack.to(device).eval()
    # the computation runs relative to the fixed image's centre (see the module docstring)
    output_grid = Grid.from_image(fixed)
    offset = -output_grid.centre()
    fixed_grid, moving_grid = output_grid.translated(offset), Grid.from_image(moving).translated(offset)
    intensity = stack.manifest.recipe.intensity
    for stage in stack.stages:  # refuses network grids an absurd header would blow up, before anything is allocated
        stage_grid(stage.spec, fixed_grid)
    if refine_steps > 0:
        refinement_grid(stack.stages[-1], fixed_grid)
    check_memory(stack, fixed_grid, moving_grid, device, refine_steps=refine_steps, moving_labels=moving_labels is not None)

    with steps.step("preprocess"):
        fixed_raw = image_to_tensor(fixed, device)
        moving_raw = image_to_tensor(moving, device)
        fixed_p = PreparedImage.from_tensor(fixed_raw, fixed_grid, intensity)
        moving_p = PreparedImage.from_tensor(moving_raw, moving_grid, intensity)
        initial = alignment(stack, fixed_p, moving_p, initial_mode)
        overlap = overlap_fraction(initial, fixed_grid, moving_grid, device)
    warnings = []
    if overlap < NO_OVERLAP_BELOW:
        warnings.append(
            f"the fixed and moving images do not overlap after the initial alignment ({100 * overlap:.2f} % of the "
            "fixed image falls inside the moving image), so the result is meaningless; check the images' origins "
            "or align their centres (initial alignment 'centre')"
        )
        log.warning(warnings[-1])

    with torch.no_grad():
        transforms, raws = run_stages(stack, fixed_p, moving_p, initial, step=steps.step, check_finite=True)

    if refine_steps > 0:
        name = f"refine ({refine_steps} steps)"
        with steps.step(name):
            last = stack.stages[-1]
            transforms[-1] = refine(last, raws[-1], stage_grid(last.spec, fixed_grid), Composite(transforms[:-1]),
                                    fixed_p, moving_p, refine_steps)
            check_stage_output(f"the refinement ({refine_steps} steps) of stage {n_stages}/{n_stages}", stack.name,
                               None, transforms[-1])

    transform = Composite(transforms)
    with torch.no_grad():
        with steps.step("warp"):
            displacement, warped, labels = _full_resolution(
                transform, fixed_grid, moving_raw, moving_grid, moving_labels, label_interpolation, device,
                lambda fraction: steps.within("warp", fraction),
            )
            if not bool(torch.isfinite(displacement).all()):
                raise StackError(f"the transform composed from the stages of the stack '{stack.name}' has NaN or "
                                 "infinite values on the fixed grid; the stack is unusable for these images")
        with steps.step("jacobian"):
            det = jacobian_determinant(displacement, fixed_grid)[0]
            mask = None if fixed_mask is None else torch.from_numpy(sitk.GetArrayFromImage(fixed_mask) > 0).to(device)
            if mask is not None and not bool(mask.any()):
                raise InputError("the fixed mask is empty: no voxel to compute folding on")
            folding = folding_fraction(det, mask)
            jac_std = jacobian_std(det, mask)

    return Registration(
        displacement=tensor_to_image(displacement[0].movedim(0, -1), output_grid),
        warped=tensor_to_image(warped, output_grid),
        jacobian=tensor_to_image(det.float(), output_grid),
        warped_labels=None if labels is None else _as_label_image(labels, output_grid, moving_labels),
        folding_fraction=folding,
        jacobian_std=jac_std,
        device=str(device),
        stack_name=stack.name,
        timings=steps.timings,
        overlap_fraction=overlap,
        warnings=warnings,
        stage_transforms=transforms,
        frame_offset=tuple(float(v) for v in offset),
    )


def overlap_fraction(initial: SpatialTransform, fixed_grid: Grid, moving_grid: Grid, device: torch.device | str = "cpu") -> float:
    """Share of fixed voxels (a regular subset of about 32^3) whose point ``initial(x)`` lies inside the moving image.

    Inside = continuous moving index in ``[-0.5, size - 0.5]`` along every axis (as :func:`dlir.geometry.sample`);
    computed in double precision.
    """
    axes = [torch.arange(0, n, max(1, math.ceil(n / round(_OVERLAP_POINTS ** (1 / 3)))), dtype=torch.float64)
            for n in fixed_grid.size]
    k, j, i = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    index = torch.stack([i, j, k], dim=-1).reshape(-1, 3)
    m = torch.as_tensor(fixed_grid.index_to_physical(), dtype=torch.float64)
    points = (index @ m[:3, :3].T + m[:3, 3])[None]
    mapped = initial(points.to(device)).cpu()[0]
    continuous = moving_grid.continuous_index(mapped)
    size = torch.as_tensor(moving_grid.size, dtype=torch.float64)
    inside = ((continuous >= -0.5) & (continuous <= size - 0.5)).all(dim=-1)
    return float(inside.double().mean())


def _full_resolution(
    transform: SpatialTransform,
    fixed_grid: Grid,
    moving: torch.Tensor,
    moving_grid: Grid,
    moving_labels: sitk.Image | None,
    label_interpolation: LabelInterpolation,
    device: torch.device,
    report: Callable[[float], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
    """Displacement ``[1, 3, D, H, W]``, warped image ``[D, H, W]`` and warped labels on the fixed grid.

    Evaluated in slabs along k to bound memory on large images; ``report(fraction)`` after each
    slab.  The labels come back as an array ``[D, H, W]`` of the moving label map's own type, every
    value exactly one of the moving labels (or 0 outside the moving image).
    """
    depth, height, width = fixed_grid.shape
    slab = max(1, _CHUNK_VOXELS // (height * width))
    index_to_lps = torch.as_tensor(fixed_grid.index_to_physical(), dtype=torch.float64, device=device)
    table: np.ndarray | None = None
    codes: torch.Tensor | None = None
    if moving_labels is not None:
        table, codes = _label_codes(sitk.GetArrayFromImage(moving_labels), device)
    disp = torch.empty((1, 3, depth, height, width), dtype=torch.float32, device=device)
    warped = torch.empty((depth, height, width), dtype=torch.float32, device=device)
    warped_codes = None if codes is None else torch.zeros((depth, height, width), dtype=torch.int64, device=device)
    jj, ii = torch.meshgrid(torch.arange(height, dtype=torch.float64, device=device),
                            torch.arange(width, dtype=torch.float64, device=device), indexing="ij")
    for k0 in range(0, depth, slab):
        k1 = min(depth, k0 + slab)
        kk = torch.arange(k0, k1, dtype=torch.float64, device=device).view(-1, 1, 1).expand(-1, height, width)
        idx = torch.stack([ii.expand_as(kk), jj.expand_as(kk), kk], dim=-1)
        pts = (idx @ index_to_lps[:3, :3].T + index_to_lps[:3, 3]).float()[None]
        mapped = transform(pts)
        disp[:, :, k0:k1] = (mapped - pts).movedim(-1, 1)
        warped[k0:k1] = sample(moving, moving_grid, mapped)[0, 0]
        if table is not None and codes is not None and warped_codes is not None:
            warped_codes[k0:k1] = _warp_label_codes(codes, len(table), moving_grid, mapped[0], label_interpolation)
        if report is not None and k1 < depth:
            report(k1 / depth)
    labels = None if table is None or warped_codes is None else table[warped_codes.cpu().numpy()]
    return disp, warped, labels


def _label_codes(labels: np.ndarray, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
    """(table, codes): ``table[codes] == labels`` exactly, ``codes`` an integer tensor ``[D, H, W]`` on ``device``.

    ``table[0]`` is the background 0 (also where no voxel holds 0), then every other label value in
    ascending order, in the label map's own type: warping moves codes, never label values.
    """
    values, inverse = np.unique(labels, return_inverse=True)
    nonzero = values != 0
    table = np.concatenate([np.zeros(1, dtype=values.dtype), values[nonzero]])
    place = np.where(nonzero, np.cumsum(nonzero), 0)  # 0 for the label 0, else the value's place in ``table``
    codes = place[inverse.reshape(labels.shape)]
    kind = torch.int32 if table.size < 2**31 else torch.int64
    return table, torch.from_numpy(codes.astype(np.int64)).to(device=device, dtype=kind)


def _warp_label_codes(codes: torch.Tensor, count: int, grid: Grid, points: torch.Tensor, mode: LabelInterpolation) -> torch.Tensor:
    """Label codes ``[D, H, W]`` (``0 .. count - 1``, on ``grid``) at LPS points ``[d, h, w, 3]``: nearest neighbour, or
    linear one-hot + argmax.

    Outside the moving image (continuous index beyond ``[-0.5, size - 0.5]``) the code is 0
    (background), as ITK's default pixel value.  ``one-hot-linear``: each label's weight is the
    sum of the trilinear weights of the 8 neighbouring voxels that hold it (the linear
    interpolation of its one-hot image, with clamped borders); the heaviest label wins, ties going
    to the background, then to the smaller label.  60,000 labels cost about what 16 do.
    """
    shape = points.shape[:-1]
    idx = grid.continuous_index(points).reshape(-1, 3)
    size = torch.as_tensor(grid.size, dtype=idx.dtype, device=idx.device)
    inside = ((idx >= -0.5) & (idx <= size - 0.5)).all(dim=-1)
    depth, height, width = codes.shape
    flat = codes.reshape(-1)
    top = (size - 1).to(torch.int64)

    if mode == "nearest":
        r = torch.round(idx).to(torch.int64).clamp(min=torch.zeros_like(top), max=top)
        out = flat[(r[:, 2] * height + r[:, 1]) * width + r[:, 0]].to(torch.int64)
    else:
        c = idx.clamp(min=torch.zeros_like(size), max=size - 1)
        lower = torch.floor(c).to(torch.int64).clamp(max=top)
        upper = (lower + 1).clamp(max=top)
        frac = c - lower.to(c.dtype)
        kind = torch.int32 if flat.numel() < 2**31 else torch.int64
        ends = [torch.stack([lower[:, a], upper[:, a]], dim=1).to(kind) for a in range(3)]  # (i, j, k): [M, 2] each
        shares = [torch.stack([1 - frac[:, a], frac[:, a]], dim=1) for a in range(3)]
        rows = ((ends[2] * height)[:, :, None] + ends[1][:, None, :]).reshape(-1, 4) * width
        index = (rows[:, :, None] + ends[0][:, None, :]).reshape(-1, 8)  # the 8 neighbours, k slowest, i fastest
        weight = ((shares[2][:, :, None] * shares[1][:, None, :]).reshape(-1, 4)[:, :, None] * shares[0][:, None, :]).reshape(-1, 8)
        label = flat[index]  # the codes of the 8 neighbours, [M, 8]
        if count <= _FEW_LABELS:  # each label's weight, heaviest first (argmax: ties to the smaller code)
            zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
            out = torch.stack([torch.where(label == code, weight, zero).sum(dim=1) for code in range(count)], dim=1).argmax(dim=1)
        else:  # the weight of each neighbour's label, summed over the neighbours holding it
            score = torch.zeros_like(weight)
            for other in range(8):
                score += weight[:, other : other + 1] * (label == label[:, other : other + 1])
            best = score.max(dim=1, keepdim=True).values
            candidates = torch.where(score == best, label, torch.full_like(label, torch.iinfo(label.dtype).max))
            out = candidates.min(dim=1).values.to(torch.int64)
    out = torch.where(inside, out, torch.zeros_like(out))
    return out.reshape(shape)


def _as_label_image(labels: np.ndarray, grid: Grid, like: sitk.Image | None) -> sitk.Image:
    """Warped label values (already of the moving label map's type) as an image on ``grid``."""
    image = grid.apply_to(sitk.GetImageFromArray(labels))
    if like is not None and image.GetPixelID() != like.GetPixelID():
        image = sitk.Cast(image, like.GetPixelID())
    return image
