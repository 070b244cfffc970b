"""Preprocessing shared by inference and training: intensity normalisation, anti-aliasing,
the stages' network grids and the intensity moments.

Everything here works on tensors ``[N, 1, D, H, W]`` with their :class:`~dlir.geometry.Grid`,
in LPS mm, and is deterministic, so training and inference see identical inputs.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .geometry import Grid, sample
from .recipe import IntensitySpec

#: at most this many voxels are used to estimate percentiles (a strided subset beyond it)
_PERCENTILE_SAMPLES = 2_000_000
#: beyond this magnitude (intensity units) normalisation is computed in float64: float32 overflows at 3.4e38
_FLOAT32_SAFE = 1e37
#: a Gaussian wider than this many times the axis length only averages the axis: its sigma is capped there
_MAX_SIGMA_PER_VOXEL = 8.0
#: an image is block-averaged for a network grid onto a grid of at most this fraction of the network's spacing
COARSE_FRACTION = 1 / 3
#: share of the average extra blur of interpolating on the coarse grid that the residual Gaussian leaves out
_INTERPOLATION_BLUR = 0.5
#: voxels of an image converted to float32 at a time when it is brought toward a network grid
_SOURCE_SLAB_VOXELS = 4_000_000
#: the most voxels a network grid may have (an image header with a wrong spacing can ask for any number)
MAX_NETWORK_VOXELS = 2**28


def normalise_intensity(image: torch.Tensor, spec: IntensitySpec) -> torch.Tensor:
    """Scale intensities to [0, 1] as ``spec`` says (window in image units or percentiles), clipped."""
    low, high = intensity_window(image, spec)
    return apply_window(image, low, high)


def intensity_window(image: torch.Tensor | np.ndarray, spec: IntensitySpec) -> tuple[float, float]:
    """(low, high): the intensities that :func:`normalise_intensity` maps to 0 and 1.

    ``image`` is a tensor or an array of any numeric type; percentiles are estimated on the same
    strided subset of at most about 2 million voxels either way, so both give the same window.
    """
    if spec.kind == "window":
        return spec.low, spec.high
    if isinstance(image, np.ndarray):
        flat_np = image.reshape(-1)
        step = max(1, flat_np.size // _PERCENTILE_SAMPLES)
        subset = torch.from_numpy(np.ascontiguousarray(flat_np[::step]).astype(np.float32)).double()
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
    return low, high


def apply_window(image: torch.Tensor, low: float, high: float, extremes: tuple[float, float] | None = None) -> torch.Tensor:
    """``(image - low) / (high - low)`` clipped to [0, 1]; in float64 when float32 would overflow.

    ``extremes`` (min, max of the whole image) decides that for a part of an image (a slab).
    """
    span = high - low
    lo, hi = (float(image.min()), float(image.max())) if extremes is None else extremes
    extreme = max(abs(hi - low), abs(lo - low))
    if span > _FLOAT32_SAFE or extreme > _FLOAT32_SAFE:  # huge intensities: float32 would overflow to inf / inf = NaN
        return ((image.double() - low) / span).clamp(0, 1).to(image.dtype)
    return ((image - low) / span).clamp(0, 1)


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
    target is not coarser.  Separable convolution with replicated borders.  Memory stays bounded
    on extreme grids (e.g. 0.01 mm voxels smoothed for a 4 mm network grid): a convolution is a
    sum of shifted copies (the padded image and the result, nothing unfolded), and a kernel
    longer than its axis becomes the equivalent (axis x axis) matrix, with sigma capped at 8 times the axis length (beyond that
    the axis is averaged either way).
    """
    target = min(target_spacing)
    return gaussian_smooth(image, [(target / grid.spacing[axis] - 1) / 2 for axis in range(3)])


def coarse_factors(grid: Grid, target_spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """Integer block-averaging factors (i, j, k) that bring ``grid`` toward a grid for ``target_spacing`` mm.

    The coarse grid's spacing stays at most :data:`COARSE_FRACTION` of the target (the smallest
    of its three spacings, as :func:`smooth_for_spacing`), so that resampling it trilinearly adds
    little blur of its own.
    """
    target = min(target_spacing)
    return tuple(max(1, int(math.floor(COARSE_FRACTION * target / s + 1e-6))) for s in grid.spacing)  # type: ignore[return-value]


def antialiased_source(
    slab: Callable[[int, int], torch.Tensor], grid: Grid, target_spacing: tuple[float, float, float]
) -> tuple[torch.Tensor, Grid]:
    """The image on ``grid`` anti-aliased for resampling at ``target_spacing`` mm, on a coarser grid.

    One pass over the image, slab by slab along k (``slab(k0, k1)`` gives slices ``k0 .. k1-1``
    as float32 ``[1, 1, k1-k0, H, W]``, e.g. normalised from the image's own type): block averages
    by :func:`coarse_factors` (replicated borders where the size is not a multiple), then the
    residual Gaussian so that the total variance per axis equals :func:`smooth_for_spacing`'s
    (a block of ``f`` voxels has variance ``(f^2 - 1) / 12`` voxels^2).  Returns the coarse image
    ``[1, 1, d, h, w]`` and its grid: block centres, so it covers up to ``f - 1`` voxels beyond the
    image at the far borders; sample it with :func:`sample_source` to keep 0 outside the image.
    Without block averaging (factors 1) this is :func:`smooth_for_spacing` exactly.
    """
    fi, fj, fk = coarse_factors(grid, target_spacing)
    factors = (fi, fj, fk)
    target = min(target_spacing)
    sigmas = []
    for axis, f in enumerate(factors):
        sigma = (target / grid.spacing[axis] - 1) / 2  # voxels of ``grid``, as smooth_for_spacing
        # residual variance in coarse voxels: the Gaussian's, less the block's and less part of the extra blur of
        # linear interpolation between coarse voxels rather than original ones (t (1 - t) h^2, h^2 / 6 on average)
        variance = (sigma**2 - (f**2 - 1) / 12) / f**2 - _INTERPOLATION_BLUR * (f**2 - 1) / (6 * f**2)
        sigmas.append(math.sqrt(max(variance, 0.0)) if sigma >= 0.25 else 0.0)
    depth, height, width = grid.shape
    step = fk * max(1, _SOURCE_SLAB_VOXELS // (fk * height * width))
    parts = []
    for k0 in range(0, depth, step):
        k1 = min(depth, k0 + step)
        part = slab(k0, k1)
        pad = (0, (-width) % fi, 0, (-height) % fj, 0, (-(k1 - k0)) % fk)
        if any(pad):
            part = F.pad(part, pad, mode="replicate")
        if factors != (1, 1, 1):
            part = F.avg_pool3d(part, (fk, fj, fi))
        parts.append(gaussian_smooth(part, [sigmas[0], sigmas[1], 0.0]))  # within slices: slab by slab
    coarse = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    del parts
    m = grid.index_to_physical()
    origin = (m @ np.array([(f - 1) / 2 for f in factors] + [1.0]))[:3]
    coarse_grid = Grid(size=(coarse.shape[4], coarse.shape[3], coarse.shape[2]),
                       spacing=tuple(s * f for s, f in zip(grid.spacing, factors)),  # type: ignore[arg-type]
                       origin=tuple(float(o) for o in origin), direction=grid.direction)  # type: ignore[arg-type]
    return gaussian_smooth(coarse, [0.0, 0.0, sigmas[2]]), coarse_grid


def sample_source(image: torch.Tensor, image_grid: Grid, extent: Grid, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of a (coarse) ``image`` on ``image_grid`` at LPS ``points``, 0 outside ``extent``'s image.

    As :func:`dlir.geometry.sample` on the original image: inside = continuous index of ``extent``
    in ``[-0.5, size - 0.5]``; between the coarse grid's border centres and that limit the border
    value is kept.
    """
    if image_grid == extent:
        return sample(image, image_grid, points)
    out = sample(image, image_grid, points, outside=None)
    return out.masked_fill(~extent.contains(points).unsqueeze(1), 0.0)


def gaussian_smooth(image: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Separable Gaussian of ``image`` ``[N, C, D, H, W]`` with ``sigmas`` (voxels) along (i, j, k); replicated borders."""
    out = image
    for axis, dim in ((0, 4), (1, 3), (2, 2)):
        sigma = sigmas[axis]
        length = image.shape[dim]
        if sigma < 0.25 or length < 2:
            continue
        if 2 * math.ceil(3 * sigma) + 1 > length:
            out = _smooth_axis_by_matrix(out, dim, min(sigma, _MAX_SIGMA_PER_VOXEL * length))
        else:
            out = _smooth_axis_by_convolution(out, dim, _gaussian_kernel(sigma))
    return out


def _smooth_axis_by_convolution(image: torch.Tensor, dim: int, kernel: torch.Tensor) -> torch.Tensor:
    """``image`` ``[N, C, D, H, W]`` convolved along ``dim`` with ``kernel`` (replicated borders).

    As a sum of shifted copies (one multiply-add per tap), so it needs the padded image and the
    result only: no unfolded input of kernel-length times the image, whatever the image's size.
    """
    k = kernel.double().tolist()
    r = (len(k) - 1) // 2
    n = image.shape[dim]
    pad = [0, 0, 0, 0, 0, 0]
    pad[2 * (4 - dim)] = pad[2 * (4 - dim) + 1] = r
    padded = F.pad(image, pad, mode="replicate")
    out = padded.narrow(dim, 0, n) * k[0]
    for tap in range(1, len(k)):
        out.add_(padded.narrow(dim, tap, n), alpha=k[tap])
    return out


def _smooth_axis_by_matrix(image: torch.Tensor, dim: int, sigma: float) -> torch.Tensor:
    """The replicated-border Gaussian convolution along ``dim`` as one (n x n) matrix (for kernels longer than the axis)."""
    n = image.shape[dim]
    kernel = _gaussian_kernel(sigma).double().numpy()
    r = (kernel.size - 1) // 2
    cumulative = np.concatenate([[0.0], np.cumsum(kernel)])  # cumulative[t] = sum of kernel[:t]
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    tap = cols - rows + r  # the kernel tap that lands on voxel j from output voxel i (interior j)
    matrix = np.where((tap >= 0) & (tap < kernel.size), kernel[np.clip(tap, 0, kernel.size - 1)], 0.0)
    # border voxels also receive every tap that falls beyond them (replicated borders)
    first = np.clip(r - np.arange(n) + 1, 0, kernel.size)  # taps t <= r - i land on voxel 0
    last = np.clip(n - 1 - np.arange(n) + r, 0, kernel.size)  # taps t >= n - 1 - i + r land on voxel n - 1
    matrix[:, 0] = cumulative[first]
    matrix[:, n - 1] = cumulative[-1] - cumulative[last]
    a = torch.as_tensor(matrix, dtype=image.dtype, device=image.device)
    return (image.movedim(dim, -1) @ a.T).movedim(-1, dim).contiguous()


def network_grid(fixed_grid: Grid, spacing: tuple[float, float, float], multiple_of: int = 1, min_size: int = 1) -> Grid:
    """The stage grid: axis-aligned LPS, ``spacing`` mm, covering the fixed image's bounding box.

    The network always sees anatomy in LPS orientation, whatever the fixed image's direction
    matrix; the size is at least ``min_size`` and rounded up (symmetrically) to a multiple of
    ``multiple_of`` (voxels beyond the image are zeros).
    """
    lower, upper = fixed_grid.bounding_box()
    extent = upper - lower
    voxels = float(np.prod(np.maximum(np.floor(extent / np.asarray(spacing, dtype=np.float64)) + 1, min_size) + multiple_of))
    if not voxels <= MAX_NETWORK_VOXELS:
        raise InputError(
            f"the fixed image spans {' x '.join(f'{e:.4g}' for e in extent)} mm: a network grid of "
            f"{' x '.join(f'{v:g}' for v in spacing)} mm over it would have {voxels:.3g} voxels, more than the "
            f"{MAX_NETWORK_VOXELS:.3g} DLIR allows; check the image's spacing (its header may be wrong) or crop it"
        )
    return Grid.axis_aligned_box(lower, upper, spacing, multiple_of, min_size)


def intensity_moments(slab: Callable[[int, int], torch.Tensor], grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(centre (LPS mm), covariance (mm^2, 3 x 3, LPS)) of a non-negative image on ``grid``, read slab by slab
    (``slab(k0, k1)`` gives slices ``k0 .. k1-1`` as ``[1, 1, k1-k0, H, W]``).

    First and second moments of the voxel indices weighted by intensity, from each slab's 1D and 2D
    marginals (no per-voxel coordinates), mapped to LPS by the grid's direction and spacing.
    """
    depth, height, width = grid.shape
    step = max(1, 4_000_000 // (height * width))
    total, first, second = 0.0, np.zeros(3), np.zeros((3, 3))
    for k0 in range(0, depth, step):
        w = slab(k0, min(depth, k0 + step))[0, 0].double()  # [k, j, i]
        axes = [torch.arange(n, dtype=torch.float64, device=w.device) for n in (w.shape[2], w.shape[1], w.shape[0])]
        axes[2] = axes[2] + k0  # i, j, k of the whole image
        total += float(w.sum())
        profiles = (w.sum(dim=(0, 1)), w.sum(dim=(0, 2)), w.sum(dim=(1, 2)))  # along i, j, k
        planes = {(0, 1): w.sum(dim=0), (0, 2): w.sum(dim=1), (1, 2): w.sum(dim=2)}  # [j, i], [k, i], [k, j]
        for a in range(3):
            first[a] += float((profiles[a] * axes[a]).sum())
            second[a, a] += float((profiles[a] * axes[a] ** 2).sum())
        for (a, b), plane in planes.items():  # plane is indexed [b, a]
            second[a, b] += float((plane * axes[b][:, None] * axes[a][None, :]).sum())
            second[b, a] = second[a, b]
    if total <= 0:
        raise InputError("the image is empty (all zero after normalisation): no centre of mass")
    mean = first / total
    covariance = second / total - np.outer(mean, mean)
    to_physical = grid.index_to_physical()
    linear = to_physical[:3, :3]
    return linear @ mean + to_physical[:3, 3], linear @ covariance @ linear.T
