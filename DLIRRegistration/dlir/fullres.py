"""The composed transform evaluated once per voxel of the FULL-resolution fixed grid, slab by slab along k,
and what is made of it there: the warped moving image, warped labels, the det-Jacobian map with its
folding fraction and std, the displacement field.

``T`` maps fixed points to moving points (LPS mm).  What the engine exports (one affine ``L`` after
one field on a coarse grid along the fixed grid's axes: every bundled stack in fast mode, accurate
mode on images whose axes are LPS's) is evaluated separably from small per-row tables, det J
analytically (:mod:`dlir.separable`): the work per voxel is a gather and a multiply-add per output.
Any other transform is split as ``T = L o R``: ``R`` evaluated per voxel, ``L`` folded into the
moving image's index and the Jacobian's constant factor ``det L``, det J by central differences.
Memory grows with the outputs asked for only: each slab converts only the block of the moving
image its points fall in to float32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .choices import CHUNK_VOXELS, LabelInterpolation
from .errors import StackError
from .geometry import Grid
from .labelwarp import as_label_image, label_codes, warp_label_codes
from .separable import SeparableTransform, one_thread
from .transforms import AffineTransform, Composite, SpatialTransform, evaluate_on_slab, is_finite, jacobian_of_map, slab_points

#: label codes below this are exact as float32 and gathered by ``grid_sample`` (nearest neighbour)
_EXACT_FLOAT_CODES = 2**24
#: voxels per chunk when evaluating the transform on the full-resolution fixed grid (a module name that tests patch)
_CHUNK_VOXELS = CHUNK_VOXELS


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
    gathered exactly).  ``jacobian`` / ``statistics``: det(dT/dx) as an image / its folding
    fraction and std (in ``mask`` when given): analytic where ``T`` is separable on ``fixed_grid``,
    else central differences across slab borders (a one-slice halo carried from slab to slab: the
    same values as on the whole grid at once).
    ``displacement``: the field u as a 3-vector float32 image.  Images are put on ``output_grid``.
    Nothing of full resolution is allocated except the outputs asked for (and the label codes of
    the moving label map).  ``report(fraction)`` after each slab.
    """
    if not is_finite(transform):
        raise StackError(f"the transform composed from the stages of the stack '{stack_name}' has NaN or "
                         "infinite values; the stack is unusable for these images")
    if moving_grid is None and (moving is not None or moving_labels is not None):
        raise ValueError("warping the moving image or its labels needs the moving grid")
    depth, height, width = fixed_grid.shape
    slab = max(1, (chunk_voxels or _CHUNK_VOXELS) // (height * width))
    need_det = jacobian or statistics
    out = _Outputs.allocate(fixed_grid.shape, moving, moving_labels, float_warped, jacobian, displacement, device)
    warping = moving_grid is not None and (out.warped is not None or out.labels is not None)
    separable = SeparableTransform.of(transform, fixed_grid, moving_grid, device)
    slabs = (_separable_slabs(separable, moving_grid, depth, slab, warping, displacement, need_det) if separable is not None
             else _pointwise_slabs(transform, fixed_grid, moving_grid, slab, warping, displacement, need_det, device))
    moments = _Moments()
    jacobian_s = 0.0
    for k0, k1, sampling, shift, det, det_s in slabs:
        if sampling is not None and moving_grid is not None:
            out.warp(k0, k1, sampling, moving, moving_grid, label_interpolation)
        if out.displacement is not None and shift is not None:
            out.displacement[k0:k1] = shift.cpu().numpy()
        if det is not None:
            t0 = time.perf_counter()
            if out.jacobian is not None:
                out.jacobian[k0:k1] = det.cpu().numpy()
            if statistics:
                moments.add(det if mask is None else det[torch.from_numpy(np.asarray(mask[k0:k1]) > 0).to(det.device)])
            jacobian_s += det_s + time.perf_counter() - t0
        if report is not None and k1 < depth:
            report(k1 / depth)
    t0 = time.perf_counter()
    result = out.images(output_grid, moving_labels)
    result.folding_fraction, result.jacobian_std = moments.folding(), moments.std()
    result.jacobian_s = jacobian_s + (time.perf_counter() - t0 if jacobian else 0.0)
    return result


@dataclass
class _Outputs:
    """The full-resolution arrays ``[D, H, W]`` (``[D, H, W, 3]`` for the displacement) filled slab by slab; None:
    not asked for.  ``table`` and ``codes``: the moving label map coded (:func:`~dlir.labelwarp.label_codes`)."""

    warped: np.ndarray | None
    labels: np.ndarray | None
    jacobian: np.ndarray | None
    displacement: np.ndarray | None
    table: np.ndarray | None = None
    codes: torch.Tensor | None = None

    @classmethod
    def allocate(cls, shape: tuple[int, int, int], moving: np.ndarray | None, moving_labels: sitk.Image | None,
                 float_warped: bool, jacobian: bool, displacement: bool, device: torch.device) -> "_Outputs":
        """The arrays asked for: warped in the moving image's type (float32 for float types or ``float_warped``),
        labels in the label map's type, the Jacobian and the displacement in float32."""
        table, codes, labels = None, None, None
        if moving_labels is not None:
            table, codes = label_codes(sitk.GetArrayViewFromImage(moving_labels), device)
            labels = np.empty(shape, dtype=table.dtype)
        warped = None
        if moving is not None:
            kind = np.dtype(np.float32) if float_warped or moving.dtype.kind not in "iub" else moving.dtype
            warped = np.empty(shape, dtype=kind)
        return cls(warped, labels, np.empty(shape, dtype=np.float32) if jacobian else None,
                   np.empty((*shape, 3), dtype=np.float32) if displacement else None, table, codes)

    def warp(self, k0: int, k1: int, sampling: "_Sampling", moving: np.ndarray | None, moving_grid: Grid,
             interpolation: LabelInterpolation) -> None:
        """Slices ``k0 .. k1-1`` of the warped image and labels at the moving points of ``sampling``."""
        if self.warped is not None and moving is not None:
            self.warped[k0:k1] = sampling.warp(moving, self.warped.dtype)
        if self.table is not None and self.codes is not None and self.labels is not None:
            if interpolation == "nearest" and len(self.table) <= _EXACT_FLOAT_CODES:
                codes = sampling.nearest(self.codes)
            else:
                codes = warp_label_codes(self.codes, len(self.table), moving_grid, sampling.index(), interpolation)
            self.labels[k0:k1] = self.table[codes.cpu().numpy()]

    def images(self, grid: Grid, moving_labels: sitk.Image | None) -> FullResolution:
        """The arrays as images on ``grid`` (labels in ``moving_labels``' pixel type)."""
        def image(array: np.ndarray | None, vector: bool = False) -> sitk.Image | None:
            return None if array is None else grid.apply_to(sitk.GetImageFromArray(array, isVector=vector))

        return FullResolution(
            warped=image(self.warped),
            labels=None if self.labels is None else as_label_image(self.labels, grid, moving_labels),
            jacobian=image(self.jacobian),
            displacement=image(self.displacement, vector=True),
        )


@dataclass
class _Sampling:
    """Where the points of one slab ``[n, H, W]`` fall in the moving image: ``grid_sample``'s coordinates
    ``[1, n, H, W, 3]`` (align_corners) over the block ``low .. high-1`` (i, j, k) of it, and where they lie outside
    it (continuous index beyond ``[-0.5, size - 0.5]``; None: nowhere).  ``index``: the continuous moving index
    ``[n, H, W, 3]``, made when first asked (labels gather by index)."""

    coords: torch.Tensor
    low: np.ndarray
    high: np.ndarray
    outside: torch.Tensor | None
    index: Callable[[], torch.Tensor]

    def nearest(self, codes: torch.Tensor) -> torch.Tensor:
        """Label codes ``[D, H, W]`` (integers below :data:`_EXACT_FLOAT_CODES`, exact as float32) at the slab's points:
        the nearest voxel's (ties to even, as :func:`~dlir.labelwarp.warp_label_codes`), 0 outside; ``[n, H, W]``
        int64.  One ``grid_sample`` over the block instead of a gather by index."""
        low, high = self.low, self.high
        block = codes[low[2] : high[2], low[1] : high[1], low[0] : high[0]].to(torch.float32)
        values = F.grid_sample(block[None, None], self.coords, mode="nearest", padding_mode="border", align_corners=True)[0, 0]
        if self.outside is not None:
            values.masked_fill_(self.outside, 0.0)
        return values.long()

    def warp(self, moving: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """``moving`` (``[D, H, W]``, any type) at the slab's points: trilinear, border values clamped inside the
        image, 0 outside, as ``dtype`` (integers rounded and clipped to the type's range).  Only the block is converted
        to float32."""
        low, high = self.low, self.high
        block = np.array(moving[low[2] : high[2], low[1] : high[1], low[0] : high[0]], dtype=np.float32)
        values = F.grid_sample(torch.from_numpy(block).to(self.coords.device)[None, None], self.coords, mode="bilinear",
                               padding_mode="border", align_corners=True)[0, 0]
        if self.outside is not None:
            values.masked_fill_(self.outside, 0.0)
        if dtype.kind in "iub":
            values = values.round_()
            if dtype.kind != "b":
                info = np.iinfo(dtype)
                values = values.clamp_(float(info.min), float(info.max))
            return values.cpu().numpy().astype(dtype)
        return values.cpu().numpy().astype(dtype, copy=False)


def _block(least: np.ndarray, most: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low, high, scale): the block of an image of ``size`` (i, j, k) holding continuous indices from ``least`` to
    ``most`` plus a voxel (clamped to the image), and ``grid_sample``'s coordinate per index unit over it."""
    low = np.clip(np.floor(least).astype(np.int64) - 1, 0, size - 1)
    high = np.clip(np.ceil(most).astype(np.int64) + 2, low + 1, size)
    return low, high, 2.0 / (high - low - 1).clip(min=1)


#: one slab's ``(k0, k1, sampling of the moving image, displacement [n, H, W, 3] (LPS mm), det J [n, H, W], seconds
#: spent on det J)`` (float32; None where not asked for)
Slab = tuple[int, int, _Sampling | None, torch.Tensor | None, torch.Tensor | None, float]


def _separable_slabs(separable: SeparableTransform, moving_grid: Grid | None, depth: int, slab: int, index: bool,
                     displacement: bool, det: bool) -> Iterator[Slab]:
    """The slabs of a transform of one affine and one field parallel to the fixed grid (:mod:`dlir.separable`): the
    block, ``grid_sample``'s coordinates over it and the outside test come from the tables (no pass over the points)."""
    size = None if moving_grid is None else np.asarray(moving_grid.size)
    for k0 in range(0, depth, slab):
        k1 = min(depth, k0 + slab)
        tables = separable.tables(k0, k1, index=index, displacement=displacement, det=det)
        sampling = None
        if tables.index is not None and size is not None:
            sampling = _separable_sampling(separable, tables.index, size)
        t0 = time.perf_counter()
        det_map = None if tables.det is None else separable.expand_det(tables.det)
        det_s = tables.det_s + time.perf_counter() - t0
        yield (k0, k1, sampling, None if tables.displacement is None else separable.expand(tables.displacement),
               det_map, det_s)


def _separable_sampling(separable: SeparableTransform, index: torch.Tensor, size: np.ndarray) -> _Sampling:
    """The slab's sampling of the moving image (of ``size`` voxels, i j k) from its index tables ``[2, n, H, S, 3]``."""
    with one_thread():  # table-sized work
        least, most = separable.bounds(index)
        low, high, scale = _block(least, most, size)
        to_block = torch.from_numpy(scale)
        normalised = torch.stack([(index[0] - torch.from_numpy(low.astype(np.float64))) * to_block - 1.0, index[1] * to_block])
    coords = separable.expand(normalised)
    outside = None
    for axis in range(3):  # only along the axes where some point lies outside the image
        if least[axis] < -0.5 or most[axis] > size[axis] - 0.5:
            lower, upper = (np.array([-0.5, size[axis] - 0.5]) - low[axis]) * scale[axis] - 1.0
            beyond = (coords[..., axis] < lower) | (coords[..., axis] > upper)
            outside = beyond if outside is None else outside.logical_or_(beyond)
    return _Sampling(coords[None], low, high, outside, lambda: separable.expand(index))


def _pointwise_slabs(transform: SpatialTransform, grid: Grid, moving_grid: Grid | None, slab: int, index: bool,
                     displacement: bool, det: bool, device: torch.device) -> Iterator[Slab]:
    """The slabs of any other transform: ``T = L o R`` with ``R`` evaluated per voxel (pointwise where it is not
    separable), ``L`` folded into the moving image's index, det J by central differences of ``R(x)`` (a one-slice
    halo carried from slab to slab: the same values as on the whole grid at once) times ``det L``."""
    leading, rest = Composite.of(transform).split_leading_affine()
    to_index, det_leading = _index_map(leading, moving_grid, device)
    for k0, k1, q, inner in _mapped_slabs(rest, grid, slab, det, device):
        sampling = None
        if index and to_index is not None and moving_grid is not None:
            sampling = _pointwise_sampling(_apply(to_index, q[0, inner]), moving_grid)
        shift = None
        if displacement:
            mapped = q[0, inner] if leading is None else leading(q[:, inner])[0]
            shift = mapped - slab_points(grid, k0, k1, device)[0]
        t0 = time.perf_counter()
        det_map = _slab_determinant(q, inner, grid, det_leading) if det else None
        yield k0, k1, sampling, shift, det_map, time.perf_counter() - t0


def _pointwise_sampling(idx: torch.Tensor, grid: Grid) -> _Sampling:
    """The sampling of the image on ``grid`` at continuous indices ``idx`` ``[n, H, W, 3]`` (i, j, k)."""
    least, most = torch.aminmax(idx.reshape(-1, 3), dim=0)
    low, high, scale = _block(least.cpu().double().numpy(), most.cpu().double().numpy(), np.asarray(grid.size))
    coords = (idx - torch.as_tensor(low, dtype=idx.dtype, device=idx.device)) * torch.as_tensor(scale, dtype=idx.dtype, device=idx.device) - 1.0
    return _Sampling(coords[None], low, high, ~grid.contains_index(idx), lambda: idx)


def _mapped_slabs(rest: SpatialTransform, grid: Grid, slab: int, halo: bool,
                  device: torch.device) -> Iterator[tuple[int, int, torch.Tensor, slice]]:
    """``(k0, k1, q, inner)`` for each slab of ``slab`` slices of ``grid``: ``q`` = ``rest(x)`` float32 ``[1, n, H, W, 3]``
    (LPS mm) at the voxel centres of slices ``k0 .. k1-1``, with ``halo`` one more slice on each side where the grid
    has one (the neighbours of central differences; the slice shared by two slabs is evaluated once and carried);
    ``q[:, inner]`` are slices ``k0 .. k1-1``."""
    depth = grid.shape[0]
    carried: torch.Tensor | None = None  # q of slices k0 - 1 and k0
    for k0 in range(0, depth, slab):
        k1 = min(depth, k0 + slab)
        end = min(depth, k1 + 1) if halo else k1  # one slice beyond: the next slab's halo
        first = k0 if carried is None else k0 + 1
        q = evaluate_on_slab(rest, grid, first, end, device)
        start = k0
        if carried is not None:
            q, start = torch.cat([carried, q], 1), k0 - 1
        if halo:
            carried = q[:, k1 - 1 - start : k1 + 1 - start]
        yield k0, k1, q, slice(k0 - start, k1 - start)


def _slab_determinant(q: torch.Tensor, inner: slice, grid: Grid, det_leading: float) -> torch.Tensor:
    """``det L * det(dq/dx)`` at the slices ``inner`` of ``q`` (:func:`_mapped_slabs`, halo included) on ``grid``,
    ``[k1-k0, H, W]``: the Jacobian determinant of ``T = L o R``."""
    height, width = grid.shape[1], grid.shape[2]
    halo = Grid((width, height, q.shape[1]), grid.spacing, grid.origin, grid.direction)
    det = jacobian_of_map(q.movedim(-1, 1), halo, inner)[0]
    return det.mul_(det_leading) if det_leading != 1.0 else det


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
