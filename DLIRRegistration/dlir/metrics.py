"""Evaluation metrics of the DLIR paper (section 4): label overlap, surface distances, landmark
error and the Jacobian statistics of a transform.

Label maps and masks are SimpleITK images or ``[k, j, i]`` arrays.  Distances are in mm on the
images' true (possibly anisotropic) spacing; direction matrices are orthonormal, so they do not
change distances.  Points are ``[n, 3]`` arrays of LPS coordinates in mm, and a displacement
image holds LPS vectors (mm) on the fixed grid with ``T(x) = x + u(x)`` (fixed -> moving).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .geometry import Grid, tensor_to_image
from .transforms import jacobian_determinant

LabelImage = sitk.Image | np.ndarray
#: where a voxel spacing comes from: (x, y, z) = (i, j, k) in mm, a :class:`Grid` or an image
SpacingSource = Sequence[float] | Grid | sitk.Image


# ------------------------------------------------------------------------------------- overlap
def _array(image: LabelImage) -> np.ndarray:
    return sitk.GetArrayViewFromImage(image) if isinstance(image, sitk.Image) else np.asarray(image)


def _same_shape(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if x.shape != y.shape:
        raise InputError(f"{what} of different shapes {x.shape} and {y.shape} cannot be compared")


def _labels(a: np.ndarray, b: np.ndarray, labels: Sequence[int] | None) -> list[int]:
    if labels is not None:
        return [int(v) for v in labels]
    return sorted(int(v) for v in np.union1d(np.unique(a), np.unique(b)) if v != 0)


def dice(a: LabelImage, b: LabelImage, labels: Sequence[int] | None = None) -> dict[int, float]:
    """Dice coefficient ``2|A∩B| / (|A| + |B|)`` (unitless, 0..1) per label of two label maps.

    ``labels`` defaults to every non-zero label found in either map.  A label absent from both
    maps gives NaN; absent from one only, 0.
    """
    x, y = _array(a), _array(b)
    _same_shape(x, y, "label maps")
    result = {}
    for label in _labels(x, y, labels):
        p, r = x == label, y == label
        total = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
        result[label] = math.nan if total == 0 else 2.0 * int(np.count_nonzero(p & r)) / total
    return result


# ------------------------------------------------------------------------------------- surfaces
def _spacing(source: SpacingSource) -> tuple[float, float, float]:
    if isinstance(source, sitk.Image):
        source = source.GetSpacing()
    elif isinstance(source, Grid):
        source = source.spacing
    spacing = tuple(float(s) for s in source)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"a voxel spacing needs three positive values in mm, got {spacing}")
    return spacing  # type: ignore[return-value]


def _mask(image: LabelImage, label: int | None) -> np.ndarray:
    values = _array(image)
    return values != 0 if label is None else values == label


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union (empty arrays when both are empty).

    Exact for surface distances: every voxel outside the box is outside both masks.
    """
    union = a | b
    box = []
    for axis in range(3):
        hits = np.flatnonzero(union.any(axis=tuple(d for d in range(3) if d != axis)))
        if hits.size == 0:
            return a[:0], b[:0]
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return a[tuple(box)], b[tuple(box)]


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one of their 6 neighbours outside it (outside the array counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def _distance_to(surface: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Euclidean distance (mm) from every voxel centre to the nearest voxel centre of ``surface``."""
    image = sitk.GetImageFromArray(surface.astype(np.uint8))
    image.SetSpacing(spacing)
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.abs(sitk.GetArrayFromImage(distance)).astype(np.float64)


def surface_distances(
    a: LabelImage, b: LabelImage, spacing: SpacingSource, label: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (mm): from each surface voxel of A to B's surface, and from B's to A's.

    A and B are the voxels equal to ``label`` (non-zero voxels when ``label`` is None) of two
    ``[k, j, i]`` arrays or images on the same grid; ``spacing`` is (x, y, z) = (i, j, k) in mm, or
    a :class:`Grid` / image to take it from.  The surface of a mask is its voxels with a
    6-neighbour outside it; distances are between voxel centres.  Both arrays are empty when
    either mask is.
    """
    step = _spacing(spacing)
    x, y = _mask(a, label), _mask(b, label)
    _same_shape(x, y, "masks")
    x, y = _crop_to_union(x, y)
    sx, sy = _surface(x), _surface(y)
    if not sx.any() or not sy.any():
        return np.empty(0), np.empty(0)
    return _distance_to(sy, step)[sx], _distance_to(sx, step)[sy]


def _hausdorff(d_ab: np.ndarray, d_ba: np.ndarray) -> tuple[float, float]:
    if d_ab.size == 0:
        return math.nan, math.nan
    hd95 = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    return float(max(d_ab.max(), d_ba.max())), float(hd95)


def _average(d_ab: np.ndarray, d_ba: np.ndarray) -> float:
    if d_ab.size == 0:
        return math.nan
    return float((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size))


def hausdorff(a: LabelImage, b: LabelImage, spacing: SpacingSource, label: int | None = None) -> tuple[float, float]:
    """Symmetric Hausdorff distance HD and its 95th-percentile variant HD95 (mm), see :func:`surface_distances`.

    HD = max of the two directed maxima.  HD95 = max of the two directed 95th percentiles (numpy's
    linear interpolation), so one stray surface voxel does not dominate it.  NaN when a mask is empty.
    """
    return _hausdorff(*surface_distances(a, b, spacing, label))


def average_surface_distance(a: LabelImage, b: LabelImage, spacing: SpacingSource, label: int | None = None) -> float:
    """Average symmetric surface distance ASD (mm), see :func:`surface_distances`.

    ``ASD = (sum of d(a, B) over A's surface + sum of d(b, A) over B's surface) / (|surface A| + |surface B|)``
    (the DLIR paper's definition).  NaN when a mask is empty.
    """
    return _average(*surface_distances(a, b, spacing, label))


def label_metrics(
    reference: sitk.Image, propagated: sitk.Image, labels: Sequence[int] | None = None
) -> dict[int, dict[str, float]]:
    """Per label: ``dice`` (0..1), ``hd``, ``hd95`` and ``asd`` (mm) of a propagated label map against a reference.

    Both maps must be on the same grid.  ``labels`` defaults to every non-zero label of either map;
    the surface metrics are NaN for a label missing from either map.
    """
    if not Grid.from_image(reference).same_as(Grid.from_image(propagated), tol=1e-3):
        raise InputError("the propagated label map is not on the reference label map's grid")
    ref, prop = _array(reference), _array(propagated)
    result = {}
    for label, overlap in dice(ref, prop, labels).items():
        d_ab, d_ba = surface_distances(ref, prop, reference, label)
        hd, hd95 = _hausdorff(d_ab, d_ba)
        result[label] = {"dice": overlap, "hd": hd, "hd95": hd95, "asd": _average(d_ab, d_ba)}
    return result


# ------------------------------------------------------------------------------------- landmarks
def _points(points: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 3:
        raise InputError(f"{what} must be an [n, 3] array of points, got shape {array.shape}")
    return array


def target_registration_error(mapped: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) between corresponding LPS points ``[n, 3]``, shape ``[n]``.

    Typically ``mapped`` = T(fixed landmarks) and ``reference`` = the moving landmarks.
    """
    mapped, reference = _points(mapped, "mapped landmarks"), _points(reference, "reference landmarks")
    if mapped.shape != reference.shape:
        raise InputError(f"{len(mapped)} mapped landmarks cannot be compared with {len(reference)} reference landmarks")
    return np.linalg.norm(mapped - reference, axis=1)


def tre_summary(errors: np.ndarray) -> dict[str, float]:
    """``mean``, ``median``, ``max`` and ``std`` (population, ddof=0) of landmark errors (mm); NaN when there are none."""
    e = np.asarray(errors, dtype=np.float64).ravel()
    if e.size == 0:
        return {"mean": math.nan, "median": math.nan, "max": math.nan, "std": math.nan}
    return {"mean": float(e.mean()), "median": float(np.median(e)), "max": float(e.max()), "std": float(e.std())}


def transform_points_with_field(points_lps: np.ndarray, displacement: sitk.Image) -> np.ndarray:
    """``T(x) = x + u(x)`` for LPS points ``[n, 3]`` (mm), u interpolated trilinearly from a displacement image.

    ``displacement`` holds LPS vectors (mm) on the fixed grid (fixed -> moving).  ITK's
    displacement-field transform is used: beyond half a voxel outside the field's grid it leaves
    points unchanged.  The input image is not modified.
    """
    points = _points(points_lps, "landmarks")
    if displacement.GetDimension() != 3 or displacement.GetNumberOfComponentsPerPixel() != 3:
        raise InputError("a displacement field must be a 3D image of 3-vectors (LPS mm)")
    # the transform empties the image it is given: hand it Cast's new image, never the caller's
    transform = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    return np.array([transform.TransformPoint(tuple(p)) for p in points.tolist()], dtype=np.float64).reshape(-1, 3)


# ------------------------------------------------------------------------------------- Jacobian
#: a Jacobian-determinant map: an image, a ``[k, j, i]`` array or a tensor of any shape (on any device)
DeterminantMap = sitk.Image | np.ndarray | torch.Tensor


def _as_tensor(values: DeterminantMap | LabelImage) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values
    return torch.from_numpy(np.array(_array(values)))  # a copy: SimpleITK's view is read-only


def _inside(det: DeterminantMap, mask: DeterminantMap | None) -> torch.Tensor:
    """The determinant values inside ``mask`` (its non-zero voxels), or all of them, as a flat tensor."""
    values = _as_tensor(det)
    if mask is None:
        return values.reshape(-1)
    m = _as_tensor(mask).to(values.device) != 0
    if m.shape != values.shape:
        raise InputError("the mask is not on the Jacobian determinant's grid")
    return values[m]


def folding_fraction(det: DeterminantMap, mask: DeterminantMap | None = None) -> float:
    """Share (0..1) of voxels, inside ``mask`` (non-zero voxels) or the whole grid, where det J <= 0; NaN for an empty mask."""
    values = _inside(det, mask)
    return float((values <= 0).double().mean()) if values.numel() else math.nan


def jacobian_std(det: DeterminantMap, mask: DeterminantMap | None = None) -> float:
    """Standard deviation (sample, ddof=1) of det J, inside ``mask`` (non-zero voxels) or the whole grid; NaN below 2 voxels."""
    values = _inside(det, mask)
    return float(values.double().std()) if values.numel() > 1 else math.nan


def jacobian_determinant_image(displacement: sitk.Image, slab_voxels: int = 1 << 21) -> sitk.Image:
    """``det(I + du/dx)`` of an LPS displacement image (mm, derivatives in physical mm), float32 on its grid.

    Computed by :func:`dlir.transforms.jacobian_determinant` in float64, in slabs of about
    ``slab_voxels`` voxels along k (each with a one-slice halo, so the result is the same as in one
    piece) to bound memory on large fields.
    """
    if displacement.GetDimension() != 3 or displacement.GetNumberOfComponentsPerPixel() != 3:
        raise InputError("a displacement field must be a 3D image of 3-vectors (LPS mm)")
    grid = Grid.from_image(displacement)
    field = sitk.GetArrayViewFromImage(displacement)  # [k, j, i, 3]
    depth = grid.size[2]
    step = max(1, slab_voxels // (grid.size[0] * grid.size[1]))
    det = np.empty(grid.shape, dtype=np.float32)
    for start in range(0, depth, step):
        stop = min(start + step, depth)
        lo, hi = max(start - 1, 0), min(stop + 1, depth)
        slab = torch.from_numpy(np.array(field[lo:hi], dtype=np.float64)).movedim(-1, 0)[None]
        slab_grid = Grid((grid.size[0], grid.size[1], hi - lo), grid.spacing, grid.origin, grid.direction)
        det[start:stop] = jacobian_determinant(slab, slab_grid)[0, start - lo : stop - lo].numpy()
    return tensor_to_image(torch.from_numpy(det), grid)
