"""Spatial transforms in physical LPS space: affine, dense displacement fields, composition, warping.

Every transform ``T`` maps a point of the FIXED image to the corresponding point of the MOVING
image (ITK's resampling direction), so ``warped(x) = moving(T(x))``.  Points are tensors
``[N, ..., 3]`` in LPS mm.  A displacement field ``u`` is ``[N, 3, D, H, W]`` in LPS mm on a
:class:`~dlir.geometry.Grid` and stands for ``T(x) = x + u(x)``.

Stages compose as ``T = T1 o T2 o ... o Tn``: the last stage is applied to the point first
(``Composite([T1, ..., Tn])``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from .geometry import Grid, rotation_matrix, sample


class SpatialTransform(Protocol):
    """Maps fixed-image points ``[N, ..., 3]`` (LPS mm) to moving-image points of the same shape."""

    def __call__(self, points: torch.Tensor) -> torch.Tensor: ...


@dataclass
class AffineTransform:
    """``T(x) = A x + b`` with ``matrix`` A ``[N, 3, 3]`` and ``offset`` b ``[N, 3]`` (LPS mm)."""

    matrix: torch.Tensor
    offset: torch.Tensor

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        flat = points.reshape(points.shape[0], -1, 3)
        out = flat @ self.matrix.transpose(1, 2).to(points.dtype) + self.offset[:, None, :].to(points.dtype)
        return out.reshape(points.shape)

    @classmethod
    def translation(cls, offset: torch.Tensor) -> "AffineTransform":
        """A pure translation ``T(x) = x + offset`` (``offset`` ``[N, 3]`` mm)."""
        eye = torch.eye(3, dtype=offset.dtype, device=offset.device).expand(offset.shape[0], 3, 3)
        return cls(eye.clone(), offset)

    def compose(self, other: "AffineTransform") -> "AffineTransform":
        """``self o other`` (``other`` applied first) as one affine transform: computed in float64, returned in this
        transform's dtypes (differentiable in both)."""
        a, b = self.matrix.double(), self.offset.double()
        matrix = a @ other.matrix.double()
        offset = (a @ other.offset.double()[:, :, None])[:, :, 0] + b
        return AffineTransform(matrix.to(self.matrix.dtype), offset.to(self.offset.dtype))

    __matmul__ = compose

    def to(self, device: torch.device | str) -> "AffineTransform":
        """The same transform with its tensors on ``device``."""
        return AffineTransform(self.matrix.to(device), self.offset.to(device))


@dataclass(frozen=True)
class AffineBounds:
    """Constraints on the 12 affine parameters, as in the DLIR paper (section 5.1)."""

    max_rotation: float = math.pi  # radians, each of the three angles
    max_shear: float = math.pi  # bound on each shear coefficient (paper: -pi .. pi)
    min_scale: float = 0.5
    max_scale: float = 1.5


def affine_from_parameters(
    raw: torch.Tensor, centre: torch.Tensor, translation_scale: float, bounds: AffineBounds = AffineBounds()
) -> AffineTransform:
    """The affine transform encoded by 12 unconstrained network outputs ``raw`` ``[N, 12]``.

    Order: rotation (3, radians), shear (3), scale (3), translation (3).  Constraints:
    ``angle = max_rotation * tanh(r)``, ``shear = max_shear * tanh(s)``,
    ``scale = mid + half_range * tanh(c)`` (so raw 0 is scale 1 when the range is symmetric about
    1), ``translation = translation_scale * t`` mm (unconstrained).  The matrix
    ``A = R @ Shear @ Scale`` acts about ``centre`` ``[N, 3]`` (mm):
    ``T(x) = A (x - centre) + centre + translation``.  All zeros is the identity when the scale range is symmetric about 1.
    """
    if raw.dim() != 2 or raw.shape[1] != 12:
        raise ValueError(f"expected affine parameters [N, 12], got {tuple(raw.shape)}")
    rot, shear, scale, trans = raw.split(3, dim=1)
    angles = bounds.max_rotation * torch.tanh(rot)
    shears = bounds.max_shear * torch.tanh(shear)
    mid = (bounds.min_scale + bounds.max_scale) / 2
    half = (bounds.max_scale - bounds.min_scale) / 2
    scales = mid + half * torch.tanh(scale)
    n = raw.shape[0]
    one, zero = torch.ones_like(shears[:, 0]), torch.zeros_like(shears[:, 0])
    shear_m = torch.stack(
        [one, shears[:, 0], shears[:, 1], zero, one, shears[:, 2], zero, zero, one], dim=-1
    ).reshape(n, 3, 3)
    matrix = rotation_matrix(angles) @ shear_m @ torch.diag_embed(scales)
    offset = centre - (matrix @ centre[:, :, None])[:, :, 0] + translation_scale * trans
    return AffineTransform(matrix, offset)


def affine_from_keypoints(fixed: torch.Tensor, moving: torch.Tensor, ridge_mm2: float = 1.0) -> AffineTransform:
    """The affine transform mapping ``fixed`` keypoints onto ``moving`` ones, least squares.

    ``fixed``, ``moving``: ``[N, K, 3]`` LPS mm.  With centred points ``P``, ``Q`` (K x 3) the matrix is
    ``A = (Q^T P + r I)(P^T P + r I)^-1`` (``r = ridge_mm2 * K``, mm^2: a pull towards the identity
    that keeps the fit defined when the keypoints are (nearly) coplanar, and is negligible for
    keypoints spread over centimetres) and ``b = mean(Q) - A mean(P)``, so ``T(x) = A x + b``.
    """
    p_mean, q_mean = fixed.mean(dim=1, keepdim=True), moving.mean(dim=1, keepdim=True)
    p, q = (fixed - p_mean).double(), (moving - q_mean).double()
    ridge = ridge_mm2 * fixed.shape[1] * torch.eye(3, dtype=p.dtype, device=p.device)
    # A (P^T P + rI) = Q^T P + rI, solved as (P^T P + rI) A^T = (Q^T P + rI)^T
    matrix = torch.linalg.solve(p.transpose(1, 2) @ p + ridge, (q.transpose(1, 2) @ p + ridge).transpose(1, 2)).transpose(1, 2)
    matrix = matrix.to(fixed.dtype)
    offset = q_mean[:, 0] - (matrix @ p_mean[:, 0, :, None])[..., 0]
    return AffineTransform(matrix, offset)


@dataclass
class DisplacementField:
    """``T(x) = x + u(x)``; ``field`` u is ``[N, 3, D, H, W]`` (LPS mm) on ``grid``.

    Between voxel centres u is interpolated trilinearly; outside the grid it is extended with its
    border values (a smooth field stays smooth a little beyond its box).
    """

    field: torch.Tensor
    grid: Grid

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        pts = points.reshape(points.shape[0], -1, 1, 1, 3)
        u = sample(self.field.to(points.dtype), self.grid, pts, outside=None)  # [N, 3, M, 1, 1]
        return points + u.reshape(points.shape[0], 3, -1).transpose(1, 2).reshape(points.shape)


@dataclass
class Composite:
    """``T = T1 o T2 o ... o Tn`` for ``transforms = [T1, ..., Tn]`` (Tn is applied first), and the algebra of such
    compositions: every method returns the same map ``T`` (fixed -> moving, LPS mm) in another form."""

    transforms: Sequence[SpatialTransform]

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        for transform in reversed(self.transforms):
            points = transform(points)
        return points

    @classmethod
    def of(cls, transform: SpatialTransform) -> "Composite":
        """``transform`` as a composite: itself when it is one, else the composite of it alone."""
        return transform if isinstance(transform, Composite) else cls([transform])

    def flattened(self) -> "Composite":
        """The same composition with nested composites unpacked: its parts are affine transforms and fields only."""
        parts: list[SpatialTransform] = []
        for transform in self.transforms:
            parts += transform.flattened().transforms if isinstance(transform, Composite) else [transform]
        return Composite(parts)

    def with_affines_folded(self) -> "Composite":
        """The flattened composition with every run of consecutive :class:`AffineTransform` composed into one
        (:meth:`AffineTransform.compose`): one pass over the points per run."""
        folded: list[SpatialTransform] = []
        for part in self.flattened().transforms:
            previous = folded[-1] if folded else None
            if isinstance(part, AffineTransform) and isinstance(previous, AffineTransform):
                folded[-1] = previous @ part
            else:
                folded.append(part)
        return Composite(folded)

    def split_leading_affine(self) -> tuple[AffineTransform | None, "Composite"]:
        """``(L, R)`` with ``T = L o R``: ``L`` the affine transforms applied last, folded into one (None when there is
        none), ``R`` the rest, its affine runs folded too (the identity as an empty composite when nothing is left).

        Full-resolution work evaluates ``R`` per voxel and folds ``L`` into what comes next (the moving image's
        index, the Jacobian's constant factor ``det L``); accurate mode refines an affine correction behind ``L``.
        """
        parts = list(self.with_affines_folded().transforms)
        if parts and isinstance(parts[0], AffineTransform):
            return parts[0], Composite(parts[1:])
        return None, Composite(parts)

    def merged_fields(self, along: Grid | None = None, min_spacing: float = 0.0) -> "Composite":
        """The flattened composition with every run of consecutive :class:`DisplacementField` replaced by one field:
        ``u(x) = T_run(x) - x`` at the voxel centres of the grid of the run's field applied first (its last one),
        trilinear between them as every field.

        One field instead of several halves the full-resolution work: every field but the first-applied
        one is evaluated point by point at moved positions, while a field on a grid parallel to the
        image is separable.  So with ``along`` (the fixed image's grid) oblique to that field's grid,
        the merged field is put on a grid of ``along``'s direction instead, with the field's finest
        spacing, covering the field's box.  Exact at the new grid's voxel centres; between them the
        trilinear interpolation of the composed map stands for the composition of trilinear maps (the
        difference is bounded in ``Testing/engine/test_export.py``).
        ``min_spacing`` (mm): the merged grid is never finer than this (a coarser grid of ``along``'s or the
        field's direction covering the same box), so that the merged field, which is also what
        ``transform.h5`` and Slicer's transform node hold, stays compact when the last stage's grid is fine.
        A run of one field is kept as it is (exact).
        """
        merged: list[SpatialTransform] = []
        run: list[DisplacementField] = []

        def close() -> None:
            merged.extend([_merged_field(run, along, min_spacing)] if len(run) > 1 else run)
            run.clear()

        for part in self.flattened().transforms:
            if isinstance(part, DisplacementField):
                run.append(part)
            else:
                close()
                merged.append(part)
        close()
        return Composite(merged)


def _merged_field(run: Sequence[DisplacementField], along: Grid | None, min_spacing: float) -> DisplacementField:
    """The fields ``run`` (composition order, at least two) as one field (:meth:`Composite.merged_fields`)."""
    first = run[-1]
    spacing = max(float(min(first.grid.spacing)), min_spacing)
    if spacing == min(first.grid.spacing) and (along is None or parallel_axes(along, first.grid)):
        grid = first.grid
    else:
        grid = _covering(first.grid, along if along is not None else first.grid, spacing)
    pts = grid_points(grid, first.field.shape[0], first.field.device)
    if grid is first.grid:  # at its own voxel centres its values need no interpolation
        mapped = Composite(run[:-1])(pts + first.field.movedim(1, -1).to(pts.dtype))
    else:
        mapped = Composite(run)(pts)
    return DisplacementField((mapped - pts).movedim(-1, 1).contiguous(), grid)


def is_finite(transform: SpatialTransform) -> bool:
    """True when every number of ``transform`` (matrix, offset, field; all parts of a composite) is finite."""
    if isinstance(transform, Composite):
        return all(is_finite(t) for t in transform.transforms)
    if isinstance(transform, AffineTransform):
        return bool(torch.isfinite(transform.matrix).all()) and bool(torch.isfinite(transform.offset).all())
    if isinstance(transform, DisplacementField):
        return bool(torch.isfinite(transform.field).all())
    return True


def grid_points(grid: Grid, batch: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """LPS positions (mm) of all voxel centres of ``grid``, ``[batch, D, H, W, 3]``."""
    return grid.physical_points(device=device).unsqueeze(0).expand(batch, -1, -1, -1, -1)


def displacement_on_grid(transform: SpatialTransform, grid: Grid, batch: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """The displacement ``T(x) - x`` (LPS mm) at the voxel centres of ``grid``, ``[N, 3, D, H, W]``."""
    pts = grid_points(grid, batch, device)
    return (transform(pts) - pts).movedim(-1, 1).contiguous()


def warp(
    image: torch.Tensor,
    image_grid: Grid,
    transform: SpatialTransform,
    target_grid: Grid,
    mode: str = "bilinear",
    outside: float | None = 0.0,
) -> torch.Tensor:
    """Resample ``image`` ``[N, C, D, H, W]`` (on ``image_grid``) onto ``target_grid`` through ``transform``.

    ``warped(x) = image(T(x))`` for every voxel centre x of ``target_grid``; ITK-compatible
    interpolation and outside value (see :func:`dlir.geometry.sample`).
    """
    pts = transform(grid_points(target_grid, image.shape[0], image.device))
    return sample(image, image_grid, pts, mode=mode, outside=outside)


def jacobian_determinant(field: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``det(I + du/dx)`` of a displacement field ``[N, 3, D, H, W]`` (LPS mm) on ``grid``, ``[N, D, H, W]``.

    Derivatives are taken with respect to physical coordinates (spacing and direction included):
    central differences inside, one-sided at the border.  1 = volume preserved, < 1 shrinkage,
    > 1 expansion, <= 0 folding.
    """
    if field.dim() != 5 or field.shape[1] != 3:
        raise ValueError(f"expected a displacement field [N, 3, D, H, W], got {tuple(field.shape)}")
    return _determinant(field, grid, displacement=True)


def jacobian_of_map(points: torch.Tensor, grid: Grid, rows: slice | None = None) -> torch.Tensor:
    """``det(dT/dx)`` of a map given by its values ``T(x)`` ``[N, 3, D, H, W]`` (LPS mm) at the voxel centres x of
    ``grid``, ``[N, D, H, W]``: the same central differences as :func:`jacobian_determinant` of ``T(x) - x``, without
    forming the displacement.  ``rows``: only these slices (along D), the others serving as neighbours."""
    if points.dim() != 5 or points.shape[1] != 3:
        raise ValueError(f"expected mapped points [N, 3, D, H, W], got {tuple(points.shape)}")
    return _determinant(points, grid, displacement=False, rows=rows)


def _slice_differences(values: torch.Tensor, rows: slice) -> torch.Tensor:
    """d values / d k (index units) at slices ``rows`` of ``values`` ``[N, C, D, H, W]``: central differences,
    one-sided at the first and last slice (as ``torch.gradient`` with ``edge_order=1``)."""
    depth = values.shape[2]
    k = torch.arange(rows.start, rows.stop, device=values.device)
    up, down = (k + 1).clamp(max=depth - 1), (k - 1).clamp(min=0)
    steps = (up - down).to(values.dtype).view(1, 1, -1, 1, 1)
    return (values.index_select(2, up) - values.index_select(2, down)).div_(steps)


def _determinant(values: torch.Tensor, grid: Grid, displacement: bool, rows: slice | None = None) -> torch.Tensor:
    """``det(dT/dx)`` from ``T(x)`` or ``u(x) = T(x) - x`` on ``grid``, through index derivatives.

    With ``G = d values / d index`` and ``B = dx / d index`` (direction times spacing), ``dT/dx =
    (B + G) B^-1`` for a displacement and ``G B^-1`` for a map, so ``det = det(B + G) / det B`` or
    ``det(G) / det B``: no 3x3 product per voxel.  Along an axis of one voxel the map is taken as
    the identity there (``u`` constant).
    """
    values = values.contiguous()  # differences along strided views are about twice as slow
    rows = slice(0, values.shape[2]) if rows is None else rows
    inner = values[:, :, rows]
    dims = [d for d, n in zip((4, 3), grid.size[:2]) if n > 1]
    grads = dict(zip(dims, torch.gradient(inner, dim=dims, edge_order=1)))
    if grid.size[2] > 1:
        grads[2] = _slice_differences(values, rows)
    per_index = [grads.get(d) for d in (4, 3, 2)]  # d values_c / d index_a for a = i, j, k
    basis = grid.direction_matrix @ np.diag(grid.spacing)  # B[c, a] = dx_c / d index_a

    def entry(c: int, a: int) -> torch.Tensor | float:
        g = per_index[a]
        if g is None:
            return float(basis[c, a])
        b = float(basis[c, a]) if displacement else 0.0
        return g[:, c] + b if b != 0.0 else g[:, c]

    (a, b, c), (d, e, f), (h, i, k) = [[entry(row, col) for col in range(3)] for row in range(3)]
    det = a * (e * k - f * i) - b * (d * k - f * h) + c * (d * i - e * h)
    if not isinstance(det, torch.Tensor):
        det = torch.full_like(inner[:, 0], det)
    return det / float(np.linalg.det(basis))


def slab_points(grid: Grid, k0: int, k1: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """LPS positions (mm) of the voxel centres of slices ``k0 .. k1-1`` of ``grid``, float32 ``[1, k1-k0, H, W, 3]``.

    The sum of the three axes' contributions (each computed in double precision, rounded once to
    float32, added in float32): within a few float32 ulps of the exact positions, without a
    double-precision array of the slab's size.
    """
    m = torch.as_tensor(grid.index_to_physical(), dtype=torch.float64)
    height, width = grid.shape[1], grid.shape[2]
    k = torch.arange(k0, k1, dtype=torch.float64)[:, None] * m[:3, 2] + m[:3, 3]
    j = torch.arange(height, dtype=torch.float64)[:, None] * m[:3, 1]
    i = torch.arange(width, dtype=torch.float64)[:, None] * m[:3, 0]
    parts = [p.to(device=device, dtype=torch.float32) for p in (k, j, i)]
    return (parts[0][:, None, None, :] + parts[1][None, :, None, :] + parts[2][None, None, :, :])[None]


def _interpolation_matrix(coords: torch.Tensor, n: int) -> torch.Tensor:
    """``[len(coords), n]``: linear interpolation weights at continuous indices ``coords`` of an axis of ``n`` values,
    clamped to the border (as ``grid_sample`` with ``align_corners=True`` and border padding)."""
    c = coords.clamp(0, n - 1)
    lower = c.floor().clamp(max=max(n - 2, 0)).long()
    frac = c - lower
    out = torch.zeros((coords.numel(), n), dtype=coords.dtype)
    rows = torch.arange(coords.numel())
    out[rows, lower] = 1 - frac if n > 1 else torch.ones_like(frac)
    if n > 1:
        out[rows, lower + 1] += frac
    return out


def resample_parallel(values: torch.Tensor, source: Grid, grid: Grid, k0: int = 0, k1: int | None = None,
                      extent: Grid | None = None) -> torch.Tensor | None:
    """``values`` ``[C, Dz, Dy, Dx]`` (on ``source``) at the voxel centres of slices ``k0 .. k1-1`` of ``grid``,
    ``[C, k1-k0, H, W]``, trilinear with the border values extended (as ``grid_sample`` with border padding), by three
    small matrix products instead of a gather per point.

    Only when ``grid``'s axes are parallel to ``source``'s, axis for axis (a diagonal direction matrix relative to it,
    flips allowed); None otherwise.  ``extent`` (parallel too): 0 where a point lies outside that image (continuous
    index beyond ``[-0.5, size - 0.5]``, as :func:`dlir.geometry.sample`); inside and outside are separable.
    """
    k1 = grid.shape[0] if k1 is None else k1
    if not parallel_axes(grid, source) or (extent is not None and not parallel_axes(grid, extent)):
        return None
    to_source = source.physical_to_index() @ grid.index_to_physical()  # grid index -> source index (diagonal + offset)
    to_extent = None if extent is None else extent.physical_to_index() @ grid.index_to_physical()
    dtype = torch.float64
    axes = [torch.arange(grid.size[0], dtype=dtype), torch.arange(grid.size[1], dtype=dtype), torch.arange(k0, k1, dtype=dtype)]
    mats = []
    for d, a in enumerate(axes):
        m = _interpolation_matrix(a * float(to_source[d, d]) + float(to_source[d, 3]), source.size[d])
        if to_extent is not None:
            index = a * float(to_extent[d, d]) + float(to_extent[d, 3])
            m[~extent.contains_index(index, axis=d)] = 0.0  # type: ignore[union-attr]
        mats.append(m.to(device=values.device, dtype=torch.float32))
    mi, mj, mk = mats
    u = values.float()
    u = torch.einsum("kz,czyx->ckyx", mk, u)
    u = torch.einsum("jy,ckyx->ckjx", mj, u)
    return torch.matmul(u, mi.T)


def field_on_grid(field: "DisplacementField", grid: Grid, k0: int, k1: int) -> torch.Tensor | None:
    """``u`` of ``field`` at the voxel centres of slices ``k0 .. k1-1`` of ``grid``, ``[1, k1-k0, H, W, 3]``, by separable
    linear interpolation (:func:`resample_parallel`); None unless ``grid``'s axes are parallel to the field grid's.
    Equal to :class:`DisplacementField`'s own evaluation (trilinear, border values extended) up to float32 rounding.
    """
    if field.field.shape[0] != 1:
        return None
    u = resample_parallel(field.field[0], field.grid, grid, k0, k1)
    return None if u is None else u.permute(1, 2, 3, 0)[None]


def evaluate_on_slab(transform: SpatialTransform, grid: Grid, k0: int, k1: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """T(x) for the voxel centres x of slices ``k0 .. k1-1`` of ``grid``, float32 ``[1, k1-k0, H, W, 3]`` (LPS mm).

    The transform applied first (the last of a :class:`Composite`), when a displacement field on a
    grid parallel to ``grid``, is evaluated separably (:func:`field_on_grid`); the rest pointwise,
    consecutive affine transforms as one (:meth:`Composite.with_affines_folded`).
    """
    points = slab_points(grid, k0, k1, device)
    parts = list(Composite.of(transform).flattened().transforms)
    mapped = points
    if parts and isinstance(parts[-1], DisplacementField):
        u = field_on_grid(parts[-1], grid, k0, k1)
        if u is not None:
            mapped = points + u.to(points.dtype)
            parts = parts[:-1]
    return Composite(parts).with_affines_folded()(mapped)


def map_grid(transform: SpatialTransform, grid: Grid, batch: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """T(x) at the voxel centres x of ``grid``, float32 ``[batch, D, H, W, 3]`` (LPS mm): where a stage's inputs are sampled.

    Runs of displacement fields are merged first (:meth:`Composite.merged_fields`: one field on the grid of the field applied
    first, exact at its voxel centres, trilinear between), so a point meets one field instead of one per earlier
    stage; with one pair (``batch`` 1) that field, when parallel to ``grid``, is evaluated separably
    (:func:`evaluate_on_slab`).  The difference from evaluating the fields one after the other is the merge's
    (trilinear between the merged field's voxel centres), largest in the outermost slices where a large
    deformation leaves a field's box.
    """
    merged = Composite.of(transform).merged_fields()
    if batch == 1:
        return evaluate_on_slab(merged, grid, 0, grid.shape[0], device)
    return merged(grid_points(grid, batch, device))


#: largest angle (radians) between two axes taken as parallel: 5e-5 mm over 500 mm
PARALLEL_RADIANS = 1e-7


def parallel_axes(a: Grid, b: Grid) -> bool:
    """True when the axes of ``a`` are parallel to those of ``b``, axis for axis (flips allowed), within
    :data:`PARALLEL_RADIANS`.  Compared column by column, so that a direction read from a file, orthonormal only to
    its float32 rounding, is parallel to itself."""
    ca, cb = a.direction_matrix, b.direction_matrix
    ca, cb = ca / np.linalg.norm(ca, axis=0), cb / np.linalg.norm(cb, axis=0)
    sines = np.linalg.norm(np.cross(ca.T, cb.T), axis=1)  # |sin| of the angle between corresponding axes
    return bool((sines <= PARALLEL_RADIANS).all())


def _covering(grid: Grid, along: Grid, spacing: float, margin: float = 0.0) -> Grid:
    """A grid with ``along``'s direction and ``spacing`` mm (isotropic) whose voxel centres cover ``grid``'s box and
    ``margin`` mm more on every side."""
    axes = along.direction_matrix  # columns: the new grid's axes in LPS
    corners = grid.corners() @ axes  # the box's corners in the new axes' coordinates (mm)
    low, high = corners.min(axis=0) - margin, corners.max(axis=0) + margin
    size = tuple(int(math.ceil((h - lo) / spacing)) + 1 for lo, h in zip(low, high))
    origin = axes @ low
    return Grid(size, (spacing,) * 3, tuple(float(v) for v in origin), along.direction)


def covering_grid(grid: Grid, spacing: float, margin: float = 0.0) -> Grid:
    """A grid along ``grid``'s axes (its direction), ``spacing`` mm isotropic, whose voxel centres cover ``grid``'s
    voxel centres and ``margin`` mm more on every side: a field on it is evaluated on ``grid`` separably
    (:mod:`dlir.separable`)."""
    return _covering(grid, grid, spacing, margin)
