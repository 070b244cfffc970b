"""Evaluation metrics of the DLIR paper (section 4): label overlap, surface distances, landmark
error and the Jacobian statistics of a transform.

Distances are in mm on the images' true spacing (direction matrices are orthonormal, so they do
not change distances).  Label maps and masks are SimpleITK images or ``[k, j, i]`` arrays.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .geometry import Grid, tensor_to_image
from .transforms import jacobian_determinant

LabelImage = sitk.Image | np.ndarray


def _array(image: LabelImage) -> np.ndarray:
    return sitk.GetArrayViewFromImage(image) if isinstance(image, sitk.Image) else np.asarray(image)


def _labels(a: np.ndarray, b: np.ndarray, labels: Sequence[int] | None) -> list[int]:
    if labels is not None:
        return [int(v) for v in labels]
    return sorted(int(v) for v in np.union1d(np.unique(a), np.unique(b)) if v != 0)


def dice(a: LabelImage, b: LabelImage, labels: Sequence[int] | None = None) -> dict[int, float]:
    """Dice coefficient ``2|A∩B| / (|A| + |B|)`` per label (default: every non-zero label of either).

    A label absent from both maps gives NaN; absent from one only, 0.
    """
    x, y = _array(a), _array(b)
    if x.shape != y.shape:
        raise InputError(f"label maps of different shapes {x.shape} and {y.shape} cannot be compared")
    result = {}
    for label in _labels(x, y, labels):
        p, r = x == label, y == label
        total = int(p.sum()) + int(r.sum())
        result[label] = float("nan") if total == 0 else 2.0 * int(np.logical_and(p, r).sum()) / total
    return result


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one of their 6 neighbours outside it (the image border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~interior


def _distance_to(surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Euclidean distance (mm) from every voxel centre to the nearest voxel of ``surface``."""
    image = sitk.GetImageFromArray(surface.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.abs(sitk.GetArrayFromImage(distance))


def surface_distances(a_mask: np.ndarray, b_mask: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (mm): from each surface voxel of A to B's surface, and from B's to A's.

    ``spacing`` is (x, y, z) = (i, j, k) in mm, the masks are ``[k, j, i]``.  Empty when a mask is.
    """
    sa, sb = _surface(a_mask.astype(bool)), _surface(b_mask.astype(bool))
    if not sa.any() or not sb.any():
        return np.empty(0), np.empty(0)
    return _distance_to(sb, spacing)[sa], _distance_to(sa, spacing)[sb]


def hausdorff(a_mask: np.ndarray, b_mask: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """Symmetric Hausdorff distance and its 95th-percentile variant (mm).

    HD = max of both directed maxima (paper section 4); HD95 = max of both directed 95th
    percentiles.  NaN when a mask is empty.
    """
    d_ab, d_ba = surface_distances(a_mask, b_mask, spacing)
    if d_ab.size == 0:
        return float("nan"), float("nan")
    return float(max(d_ab.max(), d_ba.max())), float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def average_surface_distance(a_mask: np.ndarray, b_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance (mm): both directed distance sets summed, over their total count."""
    d_ab, d_ba = surface_distances(a_mask, b_mask, spacing)
    if d_ab.size == 0:
        return float("nan")
    return float((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size))


def label_metrics(reference: sitk.Image, propagated: sitk.Image, labels: Sequence[int] | None = None) -> dict[int, dict[str, float]]:
    """Dice, HD, HD95 and ASD (mm) per label of a propagated label map against a reference on the same grid."""
    if not Grid.from_image(reference).same_as(Grid.from_image(propagated), tol=1e-3):
        raise InputError("the propagated label map is not on the reference label map's grid")
    ref, prop = _array(reference), _array(propagated)
    spacing = reference.GetSpacing()
    overlap = dice(ref, prop, labels)
    result = {}
    for label, d in overlap.items():
        hd, hd95 = hausdorff(ref == label, prop == label, spacing)
        result[label] = {"dice": d, "hd": hd, "hd95": hd95, "asd": average_surface_distance(ref == label, prop == label, spacing)}
    return result


def target_registration_error(mapped: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) between corresponding points ``[n, 3]`` (e.g. T(fixed landmarks) vs moving landmarks)."""
    mapped, reference = np.asarray(mapped, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if mapped.shape != reference.shape or mapped.ndim != 2 or mapped.shape[1] != 3:
        raise InputError(f"landmark sets must both be [n, 3], got {mapped.shape} and {reference.shape}")
    return np.linalg.norm(mapped - reference, axis=1)


def tre_summary(errors: np.ndarray) -> dict[str, float]:
    """Mean, median, max and std of landmark errors (mm)."""
    e = np.asarray(errors, dtype=np.float64)
    return {"mean": float(e.mean()), "median": float(np.median(e)), "max": float(e.max()), "std": float(e.std())}


def transform_points_with_field(points_lps: np.ndarray, displacement: sitk.Image) -> np.ndarray:
    """``T(x) = x + u(x)`` for LPS points ``[n, 3]`` (mm), u interpolated trilinearly from a displacement image.

    Outside the field's grid ITK's displacement-field transform leaves points unchanged.
    """
    transform = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))  # takes a copy
    return np.array([transform.TransformPoint(tuple(float(c) for c in p)) for p in np.asarray(points_lps)])


def _inside(det: LabelImage, mask: LabelImage | None) -> np.ndarray:
    values = _array(det)
    if mask is None:
        return values.ravel()
    m = _array(mask) > 0
    if m.shape != values.shape:
        raise InputError("the mask is not on the Jacobian's grid")
    return values[m]


def folding_fraction(det: LabelImage, mask: LabelImage | None = None) -> float:
    """Share of voxels (inside ``mask`` when given) where the Jacobian determinant is <= 0."""
    values = _inside(det, mask)
    return float(np.count_nonzero(values <= 0) / values.size) if values.size else float("nan")


def jacobian_std(det: LabelImage, mask: LabelImage | None = None) -> float:
    """Standard deviation (ddof=1) of the Jacobian determinant (inside ``mask`` when given)."""
    values = _inside(det, mask).astype(np.float64)
    return float(values.std(ddof=1)) if values.size > 1 else float("nan")


def jacobian_determinant_image(displacement: sitk.Image) -> sitk.Image:
    """``det(I + du/dx)`` (physical derivatives) of an LPS displacement image, float32 on its grid."""
    if displacement.GetNumberOfComponentsPerPixel() != 3 or displacement.GetDimension() != 3:
        raise InputError("a displacement field must be a 3D image of 3-vectors")
    grid = Grid.from_image(displacement)
    field = torch.from_numpy(sitk.GetArrayFromImage(displacement).astype(np.float64)).movedim(-1, 0)[None]
    return tensor_to_image(jacobian_determinant(field, grid)[0].float(), grid)
