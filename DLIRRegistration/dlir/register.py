"""``register(fixed, moving, stack)``: the one entry point for inference.

Flow: check inputs -> normalise intensities -> initial alignment (centres by default) -> stage
1..n on their network grids -> optional test-time refinement -> the composed transform
``T = T0 o T1 o ... o Tn`` evaluated once per voxel of the FULL-resolution fixed grid, slab by slab
(:func:`full_resolution`) -> warped moving image (linear, in the moving image's pixel type),
warped labels (nearest neighbour, or linear on one-hot then argmax), det-Jacobian map, folding
fraction and std of the Jacobian.  All in LPS mm; T maps fixed points to moving points.

Memory grows with the outputs only: the images are read in their own types (network inputs come
from one anti-aliased, block-averaged copy per stage spacing, see :class:`~dlir.pipeline.PreparedImage`),
each slab converts only what it needs to float32, and only the outputs asked for (``outputs``)
are kept at full resolution; the displacement field and the Jacobian map are computed on demand
from the kept transform when they were not asked for.

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
from typing import Callable, Collection, Iterator, Literal

import numpy as np
import SimpleITK as sitk
import torch

from .device import resolve_device
from .errors import CancelledError, DeviceError, InputError, StackError
from .export import itk_transform
from .geometry import Grid
from .io import check_image, check_label_map
from .memory import check_memory
from .pipeline import PreparedImage, alignment, check_stage_output, run_stages, stage_grid
from .refine import Refinement, check_refinement, refine
from .stack import Stack
from .transforms import AffineTransform, Composite, SpatialTransform, evaluate_on_slab, is_finite, jacobian_of_map, slab_points

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
Cancel = Callable[[], bool]
LabelInterpolation = Literal["nearest", "one-hot-linear"]

#: voxels per chunk when evaluating the transform on the full-resolution fixed grid
_CHUNK_VOXELS = 1_000_000
#: below this share of fixed voxels inside the moving image after the initial alignment, the
#: images count as not overlapping (a warning, and ``no_overlap`` in the summary)
NO_OVERLAP_BELOW = 0.01
#: at most about this many fixed voxels (a regular subset) are used to measure the overlap
_OVERLAP_POINTS = 32**3
#: one-hot-linear with at most this many labels (background included) sums each label's weight
#: directly; beyond, the weights of the 8 neighbours' own labels (the same sums, any label count)
_FEW_LABELS = 16
#: the merged field of a stack's B-spline stages (what full resolution evaluates and ``transform.h5`` holds) is
#: on a grid no finer than this (mm): a 2 mm last stage (control points 8 mm apart) is smooth at 4 mm, and a
#: 2 mm field of a head or chest with its margin made a 50-118 MB transform; measured deviation from the
#: stages' own composition in ``Testing/engine/test_export.py``
MERGED_SPACING_MM = 4.0
#: the full-resolution results :func:`register` can make (``outputs``) and those it makes by default
ENGINE_OUTPUTS = ("warped", "labels", "jacobian", "displacement")
DEFAULT_OUTPUTS = ("warped", "labels", "jacobian")


@dataclass
class Registration:
    """The result of one registration, everything on the full-resolution fixed grid (LPS mm).

    ``warped``, ``warped_labels`` and the Jacobian image are made when asked for (``outputs`` of
    :func:`register`); ``displacement`` and ``jacobian`` are also computed on demand from the
    composed ``transform`` (by slabs; cached once computed) when the run did not make them.
    """

    warped: sitk.Image | None  # moving resampled on the fixed grid (linear): the moving image's pixel type (integers rounded) or float32
    warped_labels: sitk.Image | None
    folding_fraction: float  # share of voxels (in the mask when given) with det <= 0
    jacobian_std: float
    device: str
    stack_name: str
    timings: dict[str, float] = field(default_factory=dict)
    overlap_fraction: float = 1.0  # share of fixed voxels inside the moving image after the initial alignment
    warnings: list[str] = field(default_factory=list)  # sentences also logged as warnings
    transform: SpatialTransform | None = None  # T, fixed -> moving, in the coordinates of ``grid``
    grid: Grid | None = None  # the fixed grid as the computation saw it (translated by minus its centre)
    output_grid: Grid | None = None  # the fixed image's own grid
    refinement: dict[str, list[float]] | None = None  # per refinement level: spacing (mm), steps, final loss, seconds
    _displacement: sitk.Image | None = field(default=None, repr=False)
    _jacobian: sitk.Image | None = field(default=None, repr=False)

    @property
    def displacement(self) -> sitk.Image:
        """u(x) with T(x) = x + u(x) (fixed -> moving), 3-vector float32 on the fixed grid."""
        if self._displacement is None:
            self._displacement = self._evaluate(displacement=True).displacement
        return self._displacement

    @property
    def jacobian(self) -> sitk.Image:
        """det(I + du/dx) per fixed voxel, float32."""
        if self._jacobian is None:
            self._jacobian = self._evaluate(jacobian=True).jacobian
        return self._jacobian

    def _evaluate(self, **wanted: bool) -> "FullResolution":
        if self.transform is None or self.grid is None or self.output_grid is None:
            raise ValueError("this registration holds no transform to evaluate")
        device = torch.device(self.device)
        with torch.no_grad():
            return full_resolution(self.transform, self.grid, self.output_grid, device, **wanted)

    def itk_transform(self) -> sitk.CompositeTransform:
        """A new, compact ITK transform equal to ``T`` (fixed -> moving, resampling direction; see :mod:`dlir.export`).

        Its size follows the stages' network grids, not the fixed image.
        """
        if self.transform is None or self.grid is None or self.output_grid is None:
            raise ValueError("this registration holds no transform to export")
        shift = np.asarray(self.grid.origin, dtype=np.float64) - np.asarray(self.output_grid.origin, dtype=np.float64)
        return itk_transform([self.transform], shift)

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
            **({"refinement": self.refinement} if self.refinement is not None else {}),
        }


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    stack: Stack,
    *,
    moving_labels: sitk.Image | None = None,
    fixed_mask: sitk.Image | None = None,
    device: str = "auto",
    refine: Refinement = 0,
    initial_alignment: str | None = None,
    label_interpolation: LabelInterpolation = "nearest",
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    outputs: Collection[str] | None = None,
    float_warped: bool = False,
) -> Registration:
    """Register ``moving`` onto ``fixed`` with ``stack``; inputs are never modified.

    ``outputs``: which full-resolution results to make, a subset of :data:`ENGINE_OUTPUTS`
    (default: warped, labels and jacobian).  ``displacement`` keeps the full-resolution field from
    the same pass (else :attr:`Registration.displacement` computes it when first read, as
    :attr:`Registration.jacobian` does when ``jacobian`` is not asked for).  Folding fraction and
    std of the Jacobian are always computed (slab by slab, nothing kept): they are the run's
    quality numbers.  ``float_warped``: the warped image as float32 instead of the moving image's
    pixel type (integer types are rounded to the nearest value and clipped to the type's range).

    ``initial_alignment`` (``centre``, ``com``, ``moments`` or ``none``) overrides the stack's recipe.
    ``refine``: ``"auto"`` is accurate mode (instance optimisation of the whole transform, coarse to
    fine, to convergence, never folding: :mod:`dlir.refine`); a number N > 0 runs N optimiser
    steps at the finest level only (for experiments); 0 is the networks' one-shot result.  ``progress(step, fraction)`` is called between steps (and between chunks
    of the full-resolution warp); ``cancel()`` is polled there too and raises
    :class:`~dlir.errors.CancelledError` when it returns True.
    On ``device="auto"`` a GPU out-of-memory error falls back to the CPU.
    """
    fixed_f = check_image(fixed, "fixed image", as_float32=False)  # read in their own types, never copied whole
    moving_f = check_image(moving, "moving image", as_float32=False)
    if moving_labels is not None:
        check_label_map(moving_labels, moving, "moving label map", "moving image", allow_negative=True)
    if fixed_mask is not None:
        check_label_map(fixed_mask, fixed, "fixed mask", "fixed image")
    check_refinement(refine)
    if label_interpolation not in ("nearest", "one-hot-linear"):
        raise InputError(f"unknown label interpolation {label_interpolation!r}: use nearest or one-hot-linear")
    wanted = frozenset(DEFAULT_OUTPUTS if outputs is None else outputs)
    if not wanted <= set(ENGINE_OUTPUTS):
        raise InputError(f"unknown outputs {', '.join(sorted(wanted - set(ENGINE_OUTPUTS)))}: choose from {', '.join(ENGINE_OUTPUTS)}")
    target = resolve_device(device)
    options = (wanted, float_warped)
    try:
        return _register(fixed_f, moving_f, stack, moving_labels, fixed_mask, target, refine,
                         initial_alignment, label_interpolation, progress, cancel, options)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        if device != "auto" and isinstance(exc, DeviceError):  # our own estimate: its sentence says what to do
            raise
        if device != "auto":
            raise DeviceError("the GPU ran out of memory for this pair; choose the CPU (device 'cpu') or free GPU memory") from exc
        log.warning("GPU out of memory; registering on the CPU instead")
        return _register(fixed_f, moving_f, stack, moving_labels, fixed_mask, torch.device("cpu"), refine,
                         initial_alignment, label_interpolation, progress, cancel, options)


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

    def record(self, name: str, seconds: float) -> None:
        """A step done as part of another one (timed there): its time and progress."""
        self.timings[name] = seconds
        self.done += 1
        if self.progress is not None:
            self.progress(name, self.done / self.total)


def _register(
    fixed: sitk.Image,
    moving: sitk.Image,
    stack: Stack,
    moving_labels: sitk.Image | None,
    fixed_mask: sitk.Image | None,
    device: torch.device,
    refinement: Refinement,
    initial_mode: str | None,
    label_interpolation: LabelInterpolation,
    progress: Progress | None,
    cancel: Cancel | None,
    options: tuple[frozenset[str], bool] = (frozenset(("warped", "labels", "jacobian")), False),
) -> Registration:
    wanted, float_warped = options
    n_stages = len(stack.stages)
    steps = _Steps(n_stages + 3 + (refinement != 0), progress, cancel, device)
    stack = stack.to(device).eval()
    # the computation runs relative to the fixed image's centre (see the module docstring)
    output_grid = Grid.from_image(fixed)
    offset = -output_grid.centre()
    fixed_grid, moving_grid = output_grid.translated(offset), Grid.from_image(moving).translated(offset)
    intensity = stack.manifest.recipe.intensity
    for stage in stack.stages:  # refuses network grids an absurd header would blow up, before anything is allocated
        stage_grid(stage.spec, fixed_grid)
    check_memory(stack, fixed_grid, moving_grid, device, refine=refinement != 0, moving_labels=moving_labels is not None,
                 displacement="displacement" in wanted)

    fixed_voxels = sitk.GetArrayViewFromImage(fixed)  # views in the images' own types: no full-resolution copy
    moving_voxels = sitk.GetArrayViewFromImage(moving)
    with steps.step("preprocess"):
        fixed_p = PreparedImage.from_array(fixed_voxels, fixed_grid, intensity, device)
        moving_p = PreparedImage.from_array(moving_voxels, moving_grid, intensity, device)
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
        transforms = run_stages(stack, fixed_p, moving_p, initial, step=steps.step, check_finite=True, skip_worse=True)

    mask = None
    if fixed_mask is not None:
        mask = sitk.GetArrayViewFromImage(fixed_mask)
        if not mask.any():
            raise InputError("the fixed mask is empty: no voxel to compute folding on")
    refined = None
    if refinement != 0:
        name = "refine (accurate)" if refinement == "auto" else f"refine ({refinement} steps)"

        def report(level: int, levels: int, step: int, limit: int, loss: float) -> None:
            steps.within(f"{name}: level {level}/{levels}, step {step}, loss {loss:.4f}", (level - 1 + step / limit) / levels)

        with steps.step(name):
            refined = refine(transforms, fixed_p, moving_p, refinement, mask, report)
            transforms = refined.transforms
            check_stage_output("the refinement of the stack's transform", stack.name, None, Composite(transforms))
    del fixed_p, moving_p  # their anti-aliased copies

    # the stages' fields as one at the finest stage spacing (not finer than MERGED_SPACING_MM), parallel to the
    # fixed grid: evaluated separably per voxel, and the transform that is exported
    transform = Composite(transforms).merged_fields(along=fixed_grid, min_spacing=MERGED_SPACING_MM)
    with torch.no_grad():
        with steps.step("warp"):
            result = full_resolution(
                transform, fixed_grid, output_grid, device,
                moving=moving_voxels if "warped" in wanted else None, moving_grid=moving_grid,
                moving_labels=moving_labels if "labels" in wanted else None, label_interpolation=label_interpolation,
                jacobian="jacobian" in wanted, statistics=True, displacement="displacement" in wanted, mask=mask,
                float_warped=float_warped, report=lambda fraction: steps.within("warp", fraction),
                stack_name=stack.name,
            )
        steps.timings["warp"] -= result.jacobian_s
        steps.record("jacobian", result.jacobian_s)

    return Registration(
        warped=result.warped,
        warped_labels=result.labels,
        folding_fraction=result.folding_fraction,
        jacobian_std=result.jacobian_std,
        device=str(device),
        stack_name=stack.name,
        timings=steps.timings,
        overlap_fraction=overlap,
        warnings=warnings,
        transform=transform,
        grid=fixed_grid,
        output_grid=output_grid,
        refinement=None if refined is None else refined.summary(),
        _displacement=result.displacement,
        _jacobian=result.jacobian,
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
    points = fixed_grid.physical_from_index(index)[None]
    mapped = initial(points.to(device)).cpu()[0]
    return float(moving_grid.contains(mapped).double().mean())


@dataclass
class FullResolution:
    """What one pass over the full-resolution fixed grid made (None: not asked for)."""

    warped: sitk.Image | None = None
    labels: sitk.Image | None = None
    jacobian: sitk.Image | None = None
    displacement: sitk.Image | None = None
    folding_fraction: float = math.nan
    jacobian_std: float = math.nan
    jacobian_s: float = 0.0  # seconds spent on the Jacobian (inside the pass)


class _Moments:
    """Count, mean and sum of squared deviations of values seen chunk by chunk (Chan et al.'s merge), float64."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2, self.folded = 0, 0.0, 0.0, 0

    def add(self, values: torch.Tensor) -> None:
        n = values.numel()
        if n == 0:
            return
        mean = float(values.sum(dtype=torch.float64)) / n  # sums in float64, no float64 copy of the values
        deviation = values - mean
        m2 = float(deviation.mul_(deviation).sum(dtype=torch.float64))
        self.folded += int((values <= 0).sum())
        total = self.n + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.n * n / total
        self.mean += delta * n / total
        self.n = total

    def folding(self) -> float:
        return self.folded / self.n if self.n else math.nan

    def std(self) -> float:  # sample standard deviation (ddof=1), as dlir.metrics.jacobian_std
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else math.nan


def full_resolution(
    transform: SpatialTransform,
    fixed_grid: Grid,
    output_grid: Grid,
    device: torch.device,
    *,
    moving: np.ndarray | None = None,
    moving_grid: Grid | None = None,
    moving_labels: sitk.Image | None = None,
    label_interpolation: LabelInterpolation = "nearest",
    jacobian: bool = False,
    statistics: bool = False,
    displacement: bool = False,
    mask: np.ndarray | None = None,
    float_warped: bool = False,
    report: Callable[[float], None] | None = None,
    stack_name: str = "",
    chunk_voxels: int | None = None,
) -> FullResolution:
    """Evaluate ``transform`` once per voxel of ``fixed_grid``, by slabs along k, and make what is asked for.

    ``moving`` (voxels ``[D, H, W]`` of any numeric type, on ``moving_grid``): the warped image
    (linear, 0 outside), in the moving image's type (integers rounded, clipped to the type's range)
    or float32 (float types, or ``float_warped``); each slab reads only the block of the moving
    image its points fall in, converted to float32.  ``moving_labels``: warped labels (codes
    gathered exactly).  ``jacobian`` / ``statistics``: det(I + du/dx) as an image / its folding
    fraction and std (in ``mask`` when given), with central differences across slab borders (a
    one-slice halo carried from slab to slab: the same values as on the whole grid at once).
    ``displacement``: the field u as a 3-vector float32 image.  Images are put on ``output_grid``.
    Nothing of full resolution is allocated except the outputs asked for (and the label codes of
    the moving label map).  ``report(fraction)`` after each slab.
    """
    depth, height, width = fixed_grid.shape
    slab = max(1, (chunk_voxels or _CHUNK_VOXELS) // (height * width))
    need_det = jacobian or statistics
    table: np.ndarray | None = None
    codes: torch.Tensor | None = None
    labels_out: np.ndarray | None = None
    if moving_labels is not None:
        assert moving_grid is not None
        table, codes = _label_codes(sitk.GetArrayViewFromImage(moving_labels), device)
        labels_out = np.empty((depth, height, width), dtype=table.dtype)
    warped_out = None
    if moving is not None:
        assert moving_grid is not None
        kind = np.dtype(np.float32) if float_warped or moving.dtype.kind not in "iub" else moving.dtype
        warped_out = np.empty((depth, height, width), dtype=kind)
    det_out = np.empty((depth, height, width), dtype=np.float32) if jacobian else None
    disp_out = np.empty((depth, height, width, 3), dtype=np.float32) if displacement else None
    moments = _Moments()
    jacobian_s = 0.0
    if not is_finite(transform):
        raise StackError(f"the transform composed from the stages of the stack '{stack_name}' has NaN or "
                         "infinite values; the stack is unusable for these images")
    # T = L o R: R evaluated per voxel (q = R(x)), L folded into the moving image's index and det J = det L * det dR/dx
    leading, rest = Composite.of(transform).split_leading_affine()
    to_index, det_leading = _index_map(leading, moving_grid, device)
    carried: torch.Tensor | None = None  # q of slices k0 - 1 and k0 (the halo of the central differences)
    for k0 in range(0, depth, slab):
        k1 = min(depth, k0 + slab)
        end = min(depth, k1 + 1) if need_det else k1  # one slice beyond: the next slab's halo
        first = k0 if carried is None else k0 + 1
        q = evaluate_on_slab(rest, fixed_grid, first, end, device)
        start = k0
        if carried is not None:
            q, start = torch.cat([carried, q], 1), k0 - 1
        inner = slice(k0 - start, k1 - start)
        if need_det:
            carried = q[:, k1 - 1 - start : k1 + 1 - start]
        if to_index is not None and moving_grid is not None and (warped_out is not None or labels_out is not None):
            index = _apply(to_index, q[:, inner])  # once for the image and the labels
            if warped_out is not None and moving is not None:
                warped_out[k0:k1] = _warp_block(moving, moving_grid, index, warped_out.dtype)
            if table is not None and codes is not None and labels_out is not None:
                labels_out[k0:k1] = table[_warp_label_codes(codes, len(table), moving_grid, index[0], label_interpolation).cpu().numpy()]
        if disp_out is not None:
            mapped = q[:, inner] if leading is None else leading(q[:, inner])
            disp_out[k0:k1] = (mapped - slab_points(fixed_grid, k0, k1, device))[0].cpu().numpy()
        if need_det:
            t0 = time.perf_counter()
            halo = Grid((width, height, q.shape[1]), fixed_grid.spacing, fixed_grid.origin, fixed_grid.direction)
            det = jacobian_of_map(q.movedim(-1, 1), halo, inner)[0]
            if det_leading != 1.0:
                det = det.mul_(det_leading)
            if det_out is not None:
                det_out[k0:k1] = det.cpu().numpy()
            if statistics:
                moments.add(det if mask is None else det[torch.from_numpy(np.asarray(mask[k0:k1]) > 0).to(det.device)])
            jacobian_s += time.perf_counter() - t0
        if report is not None and k1 < depth:
            report(k1 / depth)
    t0 = time.perf_counter()
    out = FullResolution(
        warped=None if warped_out is None else output_grid.apply_to(sitk.GetImageFromArray(warped_out)),
        labels=None if labels_out is None else _as_label_image(labels_out, output_grid, moving_labels),
        jacobian=None if det_out is None else output_grid.apply_to(sitk.GetImageFromArray(det_out)),
        displacement=None if disp_out is None else output_grid.apply_to(sitk.GetImageFromArray(disp_out, isVector=True)),
        folding_fraction=moments.folding(),
        jacobian_std=moments.std(),
    )
    out.jacobian_s = jacobian_s + (time.perf_counter() - t0 if jacobian else 0.0)
    return out


def _index_map(leading: AffineTransform | None, moving_grid: Grid | None,
               device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, float]:
    """((matrix, offset) taking a point q to the moving image's continuous index of L(q), det L): the leading affine
    ``L`` (None: the identity) and the moving grid's physical-to-index map composed in float64, applied in float32."""
    matrix = np.eye(3) if leading is None else leading.matrix[0].double().cpu().numpy()
    offset = np.zeros(3) if leading is None else leading.offset[0].double().cpu().numpy()
    det = float(np.linalg.det(matrix))
    if moving_grid is None:
        return None, det
    to_index = moving_grid.physical_to_index()
    m = to_index[:3, :3] @ matrix
    b = to_index[:3, :3] @ offset + to_index[:3, 3]
    return (torch.as_tensor(m, dtype=torch.float32, device=device), torch.as_tensor(b, dtype=torch.float32, device=device)), det


def _apply(affine: tuple[torch.Tensor, torch.Tensor], points: torch.Tensor) -> torch.Tensor:
    """``matrix @ p + offset`` for every point ``[..., 3]`` (one pass)."""
    matrix, offset = affine
    return torch.addmm(offset, points.reshape(-1, 3), matrix.T).reshape(points.shape)


def _warp_block(moving: np.ndarray, grid: Grid, idx: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """``moving`` (``[D, H, W]``, any type, on ``grid``) at continuous indices ``idx`` ``[1, d, h, w, 3]`` (i, j, k of
    ``grid``, the images of LPS points): trilinear, 0 outside, as ``dtype``.

    As :func:`dlir.geometry.sample` on the whole image (inside = continuous index in
    ``[-0.5, size - 0.5]``, border values clamped), but only the block of the moving image that
    holds the points (plus a voxel) is converted to float32.
    """
    least, most = torch.aminmax(idx.reshape(-1, 3), dim=0)
    size = np.asarray(grid.size)
    low = np.clip(np.floor(least.cpu().double().numpy()).astype(np.int64) - 1, 0, size - 1)
    high = np.clip(np.ceil(most.cpu().double().numpy()).astype(np.int64) + 2, low + 1, size)
    block = np.array(moving[low[2] : high[2], low[1] : high[1], low[0] : high[0]], dtype=np.float32)
    n = torch.as_tensor((high - low - 1).clip(min=1), dtype=idx.dtype, device=idx.device)
    coords = (idx - torch.as_tensor(low, dtype=idx.dtype, device=idx.device)) * (2.0 / n) - 1.0
    values = torch.nn.functional.grid_sample(torch.from_numpy(block).to(idx.device)[None, None], coords,
                                             mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
    values = values.masked_fill(~grid.contains_index(idx)[0], 0.0)
    if dtype.kind in "iub":
        values = torch.round(values)
        if dtype.kind != "b":
            info = np.iinfo(dtype)
            values = values.clamp(float(info.min), float(info.max))
        return values.cpu().numpy().astype(dtype)
    return values.cpu().numpy().astype(dtype, copy=False)


def _label_codes(labels: np.ndarray, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
    """(table, codes): ``table[codes] == labels`` exactly, ``codes`` an integer tensor ``[D, H, W]`` on ``device``.

    ``table[0]`` is the background 0 (also where no voxel holds 0), then every other label value in
    ascending order, in the label map's own type: warping moves codes, never label values.  Codes
    are the smallest integer type that holds them; label maps of 8- and 16-bit integers are coded
    slab by slab through a lookup table (no full-size 64-bit copy).
    """
    if labels.dtype.kind in "iub" and labels.dtype.itemsize <= 2:
        lowest = int(labels.min())
        counts = np.zeros(int(labels.max()) - lowest + 1, dtype=np.int64)
        step = max(1, 4_000_000 // max(1, labels[0].size))
        for k0 in range(0, labels.shape[0], step):
            counts += np.bincount((labels[k0 : k0 + step].astype(np.int32) - lowest).ravel(), minlength=counts.size)
        values = (np.flatnonzero(counts) + lowest).astype(labels.dtype)
    else:
        values = np.unique(labels)
    nonzero = values != 0
    table = np.concatenate([np.zeros(1, dtype=values.dtype), values[nonzero]])
    kind = np.uint8 if table.size <= 256 else np.int16 if table.size <= 2**15 else np.int32 if table.size < 2**31 else np.int64
    if labels.dtype.kind in "iub" and labels.dtype.itemsize <= 2:
        lut = np.zeros(counts.size, dtype=kind)
        lut[values[nonzero].astype(np.int64) - lowest] = np.arange(1, table.size, dtype=kind)
        codes = np.empty(labels.shape, dtype=kind)
        for k0 in range(0, labels.shape[0], step):
            codes[k0 : k0 + step] = lut[labels[k0 : k0 + step].astype(np.int32) - lowest]
    else:
        place = np.where(nonzero, np.cumsum(nonzero), 0)  # 0 for the label 0, else the value's place in ``table``
        codes = place[np.searchsorted(values, labels)].astype(kind)
    return table, torch.from_numpy(codes).to(device=device)


def _warp_label_codes(codes: torch.Tensor, count: int, grid: Grid, index: torch.Tensor, mode: LabelInterpolation) -> torch.Tensor:
    """Label codes ``[D, H, W]`` (``0 .. count - 1``, on ``grid``) at continuous indices ``[d, h, w, 3]`` (i, j, k of
    ``grid``, the images of LPS points): nearest neighbour, or linear one-hot + argmax.

    Outside the moving image (continuous index beyond ``[-0.5, size - 0.5]``) the code is 0
    (background), as ITK's default pixel value.  ``one-hot-linear``: each label's weight is the
    sum of the trilinear weights of the 8 neighbouring voxels that hold it (the linear
    interpolation of its one-hot image, with clamped borders); the heaviest label wins, ties going
    to the background, then to the smaller label.  60,000 labels cost about what 16 do.
    """
    shape = index.shape[:-1]
    idx = index.reshape(-1, 3)
    size = torch.as_tensor(grid.size, dtype=idx.dtype, device=idx.device)
    inside = grid.contains_index(idx)
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
