"""``register(fixed, moving, stack)``: the one entry point for inference.

Flow: check inputs -> normalise intensities -> initial alignment (centres by default) -> stage
1..n on their network grids -> optional test-time refinement -> the composed transform
``T = T0 o T1 o ... o Tn`` evaluated on the FULL-resolution fixed grid -> warped moving image
(linear), warped labels (nearest neighbour, or linear on one-hot then argmax), det-Jacobian map,
folding fraction and std of the Jacobian.  All in LPS mm; T maps fixed points to moving points.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import numpy as np
import SimpleITK as sitk
import torch

from .device import resolve_device
from .errors import CancelledError, DeviceError, InputError
from .geometry import Grid, image_to_tensor, sample, tensor_to_image
from .io import check_image, check_label_map
from .metrics import folding_fraction, jacobian_std
from .pipeline import PreparedImage, alignment, run_stages, stage_grid
from .refine import refine
from .stack import Stack
from .transforms import Composite, SpatialTransform, jacobian_determinant

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
Cancel = Callable[[], bool]
LabelInterpolation = Literal["nearest", "one-hot-linear"]

#: voxels per chunk when evaluating the transform on the full-resolution fixed grid
_CHUNK_VOXELS = 2_000_000


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

    def itk_transform(self) -> sitk.DisplacementFieldTransform:
        """A new ITK transform equal to the displacement (fixed -> moving, resampling direction)."""
        field_image = sitk.Cast(self.displacement, sitk.sitkVectorFloat64)
        return sitk.DisplacementFieldTransform(field_image)

    def summary(self) -> dict[str, object]:
        """JSON-ready numbers of the run."""
        return {
            "stack": self.stack_name,
            "device": self.device,
            "folding_fraction": self.folding_fraction,
            "jacobian_std": self.jacobian_std,
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
    networks' output.  ``progress(step, fraction)`` is called between steps; ``cancel()`` is
    polled there too and raises :class:`~dlir.errors.CancelledError` when it returns True.
    On ``device="auto"`` a GPU out-of-memory error falls back to the CPU.
    """
    fixed_f = check_image(fixed, "fixed image")
    moving_f = check_image(moving, "moving image")
    if moving_labels is not None:
        check_label_map(moving_labels, moving, "moving label map", "moving image")
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
    fixed_grid, moving_grid = Grid.from_image(fixed), Grid.from_image(moving)
    intensity = stack.manifest.recipe.intensity

    with steps.step("preprocess"):
        fixed_raw = image_to_tensor(fixed, device)
        moving_raw = image_to_tensor(moving, device)
        fixed_p = PreparedImage.from_tensor(fixed_raw, fixed_grid, intensity)
        moving_p = PreparedImage.from_tensor(moving_raw, moving_grid, intensity)
        initial = alignment(stack, fixed_p, moving_p, initial_mode)

    with torch.no_grad():
        transforms, raws = run_stages(stack, fixed_p, moving_p, initial, step=steps.step)

    if refine_steps > 0:
        with steps.step(f"refine ({refine_steps} steps)"):
            last = stack.stages[-1]
            transforms[-1] = refine(last, raws[-1], stage_grid(last.spec, fixed_grid), Composite(transforms[:-1]),
                                    fixed_p, moving_p, refine_steps)

    transform = Composite(transforms)
    with torch.no_grad():
        with steps.step("warp"):
            displacement, warped, labels = _full_resolution(
                transform, fixed_grid, moving_raw, moving_grid, moving_labels, label_interpolation, device
            )
        with steps.step("jacobian"):
            det = jacobian_determinant(displacement, fixed_grid)[0]
            mask = None if fixed_mask is None else torch.from_numpy(sitk.GetArrayFromImage(fixed_mask) > 0).to(device)
            if mask is not None and not bool(mask.any()):
                raise InputError("the fixed mask is empty: no voxel to compute folding on")
            folding = folding_fraction(det, mask)
            jac_std = jacobian_std(det, mask)

    return Registration(
        displacement=tensor_to_image(displacement[0].movedim(0, -1), fixed_grid),
        warped=tensor_to_image(warped, fixed_grid),
        jacobian=tensor_to_image(det.float(), fixed_grid),
        warped_labels=None if labels is None else _as_label_image(labels, fixed_grid, moving_labels),
        folding_fraction=folding,
        jacobian_std=jac_std,
        device=str(device),
        stack_name=stack.name,
        timings=steps.timings,
    )


def _full_resolution(
    transform: SpatialTransform,
    fixed_grid: Grid,
    moving: torch.Tensor,
    moving_grid: Grid,
    moving_labels: sitk.Image | None,
    label_interpolation: LabelInterpolation,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Displacement ``[1, 3, D, H, W]``, warped image ``[D, H, W]`` and warped labels on the fixed grid.

    Evaluated in slabs along k to bound memory on large images.
    """
    depth, height, width = fixed_grid.shape
    slab = max(1, _CHUNK_VOXELS // (height * width))
    index_to_lps = torch.as_tensor(fixed_grid.index_to_physical(), dtype=torch.float64, device=device)
    labels_t = None
    label_values: list[int] = []
    if moving_labels is not None:
        labels_np = sitk.GetArrayFromImage(moving_labels)
        label_values = [int(v) for v in np.unique(labels_np) if v != 0]
        labels_t = torch.from_numpy(labels_np.astype(np.float32)).to(device)[None, None]
    disp = torch.empty((1, 3, depth, height, width), dtype=torch.float32, device=device)
    warped = torch.empty((depth, height, width), dtype=torch.float32, device=device)
    warped_labels = None if labels_t is None else torch.zeros((depth, height, width), dtype=torch.float32, device=device)
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
        if labels_t is not None and warped_labels is not None:
            warped_labels[k0:k1] = _warp_labels(labels_t, moving_grid, mapped, label_values, label_interpolation)
    return disp, warped, warped_labels


def _warp_labels(labels: torch.Tensor, grid: Grid, points: torch.Tensor, values: list[int], mode: LabelInterpolation) -> torch.Tensor:
    """Labels ``[1, 1, D, H, W]`` sampled at ``points``: nearest neighbour, or linear one-hot + argmax."""
    if mode == "nearest" or not values:
        return sample(labels, grid, points, mode="nearest")[0, 0]
    best = sample((labels == 0).float(), grid, points, outside=1.0)[0, 0]
    out = torch.zeros_like(best)
    for v in values:
        p = sample((labels == v).float(), grid, points)[0, 0]
        better = p > best
        out = torch.where(better, torch.full_like(out, float(v)), out)
        best = torch.where(better, p, best)
    return out


def _as_label_image(labels: torch.Tensor, grid: Grid, like: sitk.Image | None) -> sitk.Image:
    image = tensor_to_image(labels.round(), grid)
    return sitk.Cast(image, like.GetPixelID() if like is not None else sitk.sitkUInt16)

