"""Preprocessing shared by inference and training: intensity normalisation, anti-aliasing,
the stages' network grids and the initial (centre) alignment.

Everything here works on tensors ``[N, 1, D, H, W]`` with their :class:`~dlir.geometry.Grid`,
in LPS mm, and is deterministic, so training and inference see identical inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .geometry import Grid, sample
from .recipe import IntensitySpec
from .transforms import AffineTransform, SpatialTransform, grid_points

#: at most this many voxels are used to estimate percentiles (a strided subset beyond it)
_PERCENTILE_SAMPLES = 2_000_000


def normalise_intensity(image: torch.Tensor, spec: IntensitySpec) -> torch.Tensor:
    """Scale intensities to [0, 1] as ``spec`` says (window in image units or percentiles), clipped."""
    if spec.kind == "window":
        low, high = spec.low, spec.high
    else:
        flat = image.flatten()
        step = max(1, flat.numel() // _PERCENTILE_SAMPLES)
        subset = flat[::step].double()
        low, high = percentiles(subset, (spec.low, spec.high))
        if high <= low:
            high = float(subset.max())
            low = float(subset.min())
        if high <= low:
            raise InputError("the image is constant: there is nothing to register")
    return ((image - low) / (high - low)).clamp(0, 1)


def percentiles(values: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """The ``qs``-th percentiles of a 1D tensor, linear between order statistics (as ``torch.quantile``
    and ``numpy.percentile``), by one partial partition instead of a full sort."""
    data = values.detach().cpu().numpy()
    positions = [q / 100 * (data.size - 1) for q in qs]
    ranks = sorted({int(p) for p in positions} | {min(int(p) + 1, data.size - 1) for p in positions})
    part = np.partition(data, ranks)
    out = []
    for p in positions:
        lower = int(p)
        upper = min(lower + 1, data.size - 1)
        out.append(float(part[lower] + (p - lower) * (part[upper] - part[lower])))
    return out


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def smooth_for_spacing(image: torch.Tensor, grid: Grid, target_spacing: tuple[float, float, float]) -> torch.Tensor:
    """Gaussian anti-aliasing of ``image`` (on ``grid``) before resampling it at ``target_spacing`` mm.

    Along each image axis, sigma (voxels) = (target / source spacing - 1) / 2, none when the
    target is not coarser.  Separable convolution with replicated borders.
    """
    target = min(target_spacing)
    out = image
    for axis, dim in ((0, 4), (1, 3), (2, 2)):
        sigma = (target / grid.spacing[axis] - 1) / 2
        if sigma < 0.25 or image.shape[dim] < 2:
            continue
        k = _gaussian_kernel(sigma).to(device=image.device, dtype=image.dtype)
        r = (k.numel() - 1) // 2
        shape = [1, 1, 1, 1, 1]
        shape[dim] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (4 - dim)] = pad[2 * (4 - dim) + 1] = r
        c = out.shape[1]
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.view(shape).expand(c, 1, *shape[2:]), groups=c)
    return out


def network_grid(fixed_grid: Grid, spacing: tuple[float, float, float], multiple_of: int = 1, min_size: int = 1) -> Grid:
    """The stage grid: axis-aligned LPS, ``spacing`` mm, covering the fixed image's bounding box.

    The network always sees anatomy in LPS orientation, whatever the fixed image's direction
    matrix; the size is at least ``min_size`` and rounded up (symmetrically) to a multiple of
    ``multiple_of`` (voxels beyond the image are zeros).
    """
    lower, upper = fixed_grid.bounding_box()
    return Grid.axis_aligned_box(lower, upper, spacing, multiple_of, min_size)


def to_grid(image: torch.Tensor, image_grid: Grid, transform: SpatialTransform | None, grid: Grid) -> torch.Tensor:
    """``image`` resampled onto ``grid`` through ``transform`` (identity when None), trilinear, 0 outside."""
    pts = grid_points(grid, image.shape[0], image.device)
    if transform is not None:
        pts = transform(pts)
    return sample(image, image_grid, pts)


def centre_of_mass(image: torch.Tensor, grid: Grid) -> np.ndarray:
    """Intensity-weighted centre (LPS mm) of a non-negative image ``[1, 1, D, H, W]``."""
    w = image[0, 0].double()
    total = float(w.sum())
    if total <= 0:
        raise InputError("the image is empty (all zero after normalisation): no centre of mass")
    idx = [float((w.sum(dim=tuple(d for d in range(3) if d != axis)) * torch.arange(w.shape[axis], dtype=torch.float64)).sum()) / total
           for axis in (2, 1, 0)]  # i (W), j (H), k (D)
    return (grid.index_to_physical() @ np.array(idx + [1.0]))[:3]


def initial_alignment(
    mode: str, fixed: torch.Tensor, fixed_grid: Grid, moving: torch.Tensor, moving_grid: Grid
) -> AffineTransform:
    """The translation that puts the moving image's centre on the fixed image's (fixed -> moving).

    ``mode``: ``"centre"`` (centres of the image grids), ``"com"`` (centres of mass of the
    normalised intensities) or ``"none"`` (identity).  Images ``[1, 1, D, H, W]`` in [0, 1].
    """
    if mode == "none":
        shift = np.zeros(3)
    elif mode == "centre":
        shift = moving_grid.centre() - fixed_grid.centre()
    elif mode == "com":
        shift = centre_of_mass(moving, moving_grid) - centre_of_mass(fixed, fixed_grid)
    else:
        raise InputError(f"unknown initial alignment {mode!r}: use centre, com or none")
    return AffineTransform.translation(torch.as_tensor(shift, dtype=torch.float32, device=fixed.device)[None])
