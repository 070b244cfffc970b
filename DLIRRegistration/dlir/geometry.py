"""Image grids and every conversion between voxel indices, physical LPS millimetres and torch's
normalised sampling coordinates.

Conventions (the whole engine follows them; see DESIGN.md section 2):

* Physical space is ITK's: LPS coordinates in millimetres.  RAS never appears in ``dlir``.
* A :class:`Grid` is ITK's image geometry: ``size`` and ``spacing`` in ITK index order (i, j, k),
  ``origin`` = physical position of the centre of voxel (0, 0, 0), ``direction`` = 3x3 matrix whose
  *columns* are the physical directions of the i, j, k axes.  ``x = origin + D @ diag(spacing) @ idx``.
* Tensors that stand for images are ``[N, C, D, H, W]`` with W = i, H = j, D = k, exactly the
  order of ``SimpleITK.GetArrayFromImage`` (``[k, j, i]``).
* Point tensors are ``[..., 3]`` with the last axis (x, y, z) = (L, P, S) in mm.
* ``torch.nn.functional.grid_sample`` is always called with ``align_corners=True``; its last axis
  is (i, j, k) normalised so that -1 / +1 are the centres of the first / last voxel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

Vec3 = tuple[float, float, float]

#: largest deviation of ``D^T D`` from the identity accepted for a direction matrix ``D``
ORTHONORMAL_TOLERANCE = 1e-4
#: voxel sizes (mm) accepted in an image header: 0.1 micrometre to 10 metres
SPACING_RANGE_MM = (1e-4, 1e4)
#: largest accepted distance (mm) of an image's origin from zero along any axis (10,000 km; no
#: scanner writes that, and double precision still places voxels 2e-6 mm apart there)
MAX_ORIGIN_MM = 1e10


def header_problem(spacing, origin, direction) -> tuple[str, str] | None:
    """What is wrong with an image header, as ``(field, phrase)``, or None when it is usable.

    ``field`` is ``"spacing"``, ``"origin"`` or ``"direction"``; ``phrase`` completes a sentence
    that starts with the image's name ("the fixed image's ...").  Usable: spacing finite and in
    :data:`SPACING_RANGE_MM` along every axis, origin finite and within :data:`MAX_ORIGIN_MM`,
    direction a 3x3 matrix with finite entries whose columns are orthonormal (within
    :data:`ORTHONORMAL_TOLERANCE`).  Any units of the caller (mm; LPS or RAS) as long as consistent.
    """
    spacing_arr = np.asarray(spacing, dtype=np.float64).ravel()
    origin_arr = np.asarray(origin, dtype=np.float64).ravel()
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    low, high = SPACING_RANGE_MM
    if not np.isfinite(spacing_arr).all() or (spacing_arr <= 0).any():
        return "spacing", f"spacing {_fmt(spacing_arr)} mm is not a positive finite voxel size along every axis"
    if (spacing_arr < low).any() or (spacing_arr > high).any():
        return "spacing", f"spacing {_fmt(spacing_arr)} mm is outside the {low:g} to {high:g} mm that DLIR accepts for a voxel"
    if not np.isfinite(origin_arr).all():
        return "origin", f"origin {_fmt(origin_arr)} is not finite"
    if (np.abs(origin_arr) > MAX_ORIGIN_MM).any():
        return "origin", f"origin {_fmt(origin_arr)} mm is more than {MAX_ORIGIN_MM:g} mm (10,000 km) from zero, which no scanner writes"
    if not np.isfinite(matrix).all():
        return "direction", "direction matrix has NaN or infinite entries"
    if np.abs(matrix.T @ matrix - np.eye(3)).max() > ORTHONORMAL_TOLERANCE:
        return "direction", "direction matrix is not orthonormal (columns not unit length or not perpendicular)"
    return None


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


@dataclass(frozen=True)
class Grid:
    """Geometry of a 3D image in physical LPS space (ITK conventions, see module docstring)."""

    size: tuple[int, int, int]
    spacing: Vec3
    origin: Vec3
    direction: tuple[float, ...]  # 9 values, row-major 3x3, columns are the axis directions

    def __post_init__(self) -> None:
        if len(self.size) != 3 or len(self.spacing) != 3 or len(self.origin) != 3:
            raise ValueError("a Grid is three-dimensional: size, spacing and origin need 3 values")
        if len(self.direction) != 9:
            raise ValueError("a Grid's direction needs 9 values (a row-major 3x3 matrix)")
        if min(self.size) < 1 or min(self.spacing) <= 0:
            raise ValueError(f"invalid grid: size {self.size}, spacing {self.spacing}")

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_image(cls, image: sitk.Image) -> "Grid":
        """The grid of a 3D SimpleITK image."""
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    @classmethod
    def axis_aligned_box(
        cls, lower: np.ndarray, upper: np.ndarray, spacing: Vec3, multiple_of: int = 1, min_size: int = 1
    ) -> "Grid":
        """An identity-direction grid whose voxel centres cover the LPS box ``[lower, upper]`` (mm).

        The size along each axis is at least ``min_size`` and rounded up to a multiple of
        ``multiple_of`` (for networks that downsample by that factor); the grid stays centred on
        the box.
        """
        lower = np.asarray(lower, dtype=np.float64)
        upper = np.asarray(upper, dtype=np.float64)
        spacing_arr = np.asarray(spacing, dtype=np.float64)
        extent = upper - lower
        size = np.maximum(np.floor(extent / spacing_arr + 1e-6).astype(int) + 1, min_size)
        size = (np.ceil(size / multiple_of) * multiple_of).astype(int)
        centre = (lower + upper) / 2
        origin = centre - (size - 1) * spacing_arr / 2
        return cls(
            size=tuple(int(s) for s in size),
            spacing=tuple(float(s) for s in spacing_arr),
            origin=tuple(float(o) for o in origin),
            direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        )

    # ----------------------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (k, j, i) = (D, H, W)."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_physical(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping a voxel index (i, j, k) to an LPS point in mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def physical_to_index(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping an LPS point in mm to a continuous voxel index (i, j, k)."""
        return np.linalg.inv(self.index_to_physical())

    def corners(self) -> np.ndarray:
        """The 8 corner voxel centres in LPS mm, shape (8, 3)."""
        idx = np.array([[i, j, k, 1.0] for i in (0, self.size[0] - 1) for j in (0, self.size[1] - 1) for k in (0, self.size[2] - 1)])
        return (idx @ self.index_to_physical().T)[:, :3]

    def centre(self) -> np.ndarray:
        """Physical LPS position (mm) of the centre of the grid."""
        idx = np.append((np.asarray(self.size) - 1) / 2.0, 1.0)
        return (self.index_to_physical() @ idx)[:3]

    def bounding_box(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned LPS box (lower, upper) in mm enclosing all voxel centres."""
        c = self.corners()
        return c.min(axis=0), c.max(axis=0)

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this grid's spacing, origin and direction on ``image`` (whose size must match)."""
        if tuple(image.GetSize()) != tuple(self.size):
            raise ValueError(f"image size {image.GetSize()} does not match grid size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def translated(self, offset: np.ndarray) -> "Grid":
        """The same grid moved by ``offset`` (LPS mm): the origin plus ``offset``, in double precision."""
        shifted = np.asarray(self.origin, dtype=np.float64) + np.asarray(offset, dtype=np.float64)
        return Grid(self.size, self.spacing, tuple(float(o) for o in shifted), self.direction)

    def same_as(self, other: "Grid", tol: float = 1e-4) -> bool:
        """True when both grids have the same size and (within ``tol`` mm / cosine) geometry."""
        return (
            tuple(self.size) == tuple(other.size)
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    # ----------------------------------------------------------------------------- torch
    def physical_points(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """LPS positions (mm) of all voxel centres, shape ``[D, H, W, 3]`` (a cached tensor: do not modify it)."""
        return _physical_points(self, torch.device(device), dtype)

    def continuous_index(self, points: torch.Tensor) -> torch.Tensor:
        """Map LPS points (mm) ``[..., 3]`` to continuous voxel indices (i, j, k) of this grid."""
        m = torch.as_tensor(self.physical_to_index(), dtype=points.dtype, device=points.device)
        return torch.addmm(m[:3, 3], points.reshape(-1, 3), m[:3, :3].T).reshape(points.shape)

    def physical_from_index(self, index: torch.Tensor) -> torch.Tensor:
        """Map continuous voxel indices (i, j, k) ``[..., 3]`` to LPS points (mm), in the indices' dtype."""
        m = torch.as_tensor(self.index_to_physical(), dtype=index.dtype, device=index.device)
        return index @ m[:3, :3].T + m[:3, 3]

    def contains_index(self, index: torch.Tensor, axis: int | None = None) -> torch.Tensor:
        """True where a continuous voxel index lies in the image's buffer: ``[-0.5, size - 0.5]`` (ITK's inside test).

        ``index`` ``[..., 3]`` (i, j, k) gives ``[...]`` (inside along every axis); with ``axis`` (0, 1, 2 for i, j, k)
        ``index`` holds indices along that axis only and the test is elementwise.
        """
        if axis is not None:
            return (index >= -0.5) & (index <= self.size[axis] - 0.5)
        size = torch.as_tensor(self.size, dtype=index.dtype, device=index.device)
        return ((index >= -0.5) & (index <= size - 0.5)).all(dim=-1)

    def contains(self, points: torch.Tensor) -> torch.Tensor:
        """True where LPS points (mm) ``[..., 3]`` fall inside the image (:meth:`contains_index`), ``[...]``."""
        return self.contains_index(self.continuous_index(points))


@functools.lru_cache(maxsize=8)
def _physical_points(grid: Grid, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    axes = [torch.arange(n, dtype=torch.float64) for n in grid.size]
    k, j, i = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    return grid.physical_from_index(torch.stack([i, j, k], dim=-1)).to(device=device, dtype=dtype)


def sample(
    image: torch.Tensor,
    grid: Grid,
    points: torch.Tensor,
    mode: str = "bilinear",
    outside: float | None = 0.0,
) -> torch.Tensor:
    """Sample ``image`` (``[N, C, D, H, W]`` on ``grid``) at LPS points ``[N, d, h, w, 3]`` (mm).

    Matches ITK's ``ResampleImageFilter``: inside the buffer (continuous index in
    ``[-0.5, size - 0.5]``) values are interpolated with border clamping; points outside get
    ``outside`` (ITK's default pixel value).  ``outside=None`` extends the border values instead.
    ``mode`` is ``"bilinear"`` (trilinear) or ``"nearest"``.
    """
    if image.dim() != 5 or points.dim() != 5 or points.shape[-1] != 3:
        raise ValueError(f"expected image [N,C,D,H,W] and points [N,d,h,w,3], got {tuple(image.shape)} and {tuple(points.shape)}")
    if outside is None:  # no inside test: LPS -> normalised coordinates in one affine map (one pass over the points)
        coords = _normalised_coordinates(grid, points).to(image.dtype)
        return F.grid_sample(image, coords, mode=mode, padding_mode="border", align_corners=True)
    idx = grid.continuous_index(points)
    size = torch.as_tensor(grid.size, dtype=idx.dtype, device=idx.device)
    coords = (idx * (2.0 / (size - 1).clamp(min=1)) - 1.0).to(image.dtype)
    out = F.grid_sample(image, coords, mode=mode, padding_mode="border", align_corners=True)
    return out.masked_fill(~grid.contains_index(idx).unsqueeze(1), outside)


def _normalised_coordinates(grid: Grid, points: torch.Tensor, shift: np.ndarray | None = None,
                            size: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``grid_sample``'s coordinates (align_corners) of LPS ``points`` ``[..., 3]``: the continuous index of ``grid``
    (less ``shift``, for a block starting there) scaled to [-1, 1] over ``size`` voxels (default the grid's)."""
    m = grid.physical_to_index()[:3]
    n = np.asarray(grid.size if size is None else size, dtype=np.float64)
    scale = 2.0 / np.maximum(n - 1, 1)
    matrix = m[:, :3] * scale[:, None]
    offset = (m[:, 3] - (0.0 if shift is None else shift)) * scale - 1.0
    a = torch.as_tensor(matrix, dtype=points.dtype, device=points.device)
    b = torch.as_tensor(offset, dtype=points.dtype, device=points.device)
    return torch.addmm(b, points.reshape(-1, 3), a.T).reshape(points.shape)


def image_to_tensor(image: sitk.Image, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A scalar SimpleITK image as a ``[1, 1, D, H, W]`` tensor (values unchanged, cast to ``dtype``)."""
    arr = sitk.GetArrayFromImage(image)  # a copy: the image is never shared or modified
    return torch.from_numpy(arr).to(device=device, dtype=dtype)[None, None]


def tensor_to_image(tensor: torch.Tensor, grid: Grid, pixel_type: int | None = None) -> sitk.Image:
    """A ``[D, H, W]`` (scalar) or ``[D, H, W, 3]`` (vector) tensor as a SimpleITK image on ``grid``."""
    arr = tensor.detach().cpu().numpy()
    is_vector = arr.ndim == 4
    if tuple(arr.shape[:3]) != grid.shape:
        raise ValueError(f"array shape {arr.shape[:3]} does not match grid shape {grid.shape}")
    image = sitk.GetImageFromArray(arr, isVector=is_vector)
    if pixel_type is not None:
        image = sitk.Cast(image, pixel_type)
    return grid.apply_to(image)


def rotation_matrix(angles: torch.Tensor, order: str = "zyx") -> torch.Tensor:
    """Rotation matrices ``[N, 3, 3]`` from angles ``[N, 3]`` (radians) about the x, y and z axes.

    Each elementary rotation is right-handed (counter-clockwise seen from the axis' positive end);
    ``order`` names the factors from left to right: ``"zyx"`` gives ``Rz @ Ry @ Rx`` (a point is
    rotated about x first, then y, then z), ``"xyz"`` gives ``Rx @ Ry @ Rz``.
    """
    cx, cy, cz = torch.cos(angles).unbind(-1)
    sx, sy, sz = torch.sin(angles).unbind(-1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    factors = {"x": rx, "y": ry, "z": rz}
    return factors[order[0]] @ factors[order[1]] @ factors[order[2]]


def flip_ras_lps(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """RAS <-> LPS (mm): ``values`` with their x and y components negated along ``axis`` (components in the
    order x, y, z), the flip ``diag(-1, -1, 1)``.  Its own inverse and exact in floating point (sign
    changes only).  Points ``[..., 3]`` flip along the last axis; a direction matrix (columns = axis
    directions) flips its rows, ``axis=0``.  The engine works in LPS; only Slicer data (volume nodes,
    RAS landmark files) needs this."""
    shape = [1] * np.ndim(values)
    shape[axis] = 3
    return np.asarray(values) * np.array([-1.0, -1.0, 1.0]).reshape(shape)
