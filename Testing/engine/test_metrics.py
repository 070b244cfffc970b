"""Metrics against hand-computed values: boxes, concentric spheres and brute force on an anisotropic
grid, known point sets, Jacobians of known fields and points through known fields."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from dlir.errors import InputError
from dlir.geometry import Grid, rotation_matrix
from dlir.metrics import (
    average_surface_distance,
    dice,
    folding_fraction,
    hausdorff,
    jacobian_determinant_image,
    jacobian_std,
    label_metrics,
    surface_distances,
    target_registration_error,
    transform_points_with_field,
    tre_summary,
)
from dlir.transforms import jacobian_determinant

SPACING = (0.8, 1.0, 2.5)  # (x, y, z) = (i, j, k) mm
COARSEST = max(SPACING)  # a surface voxel lies less than one 6-neighbour step (at most 2.5 mm) inside the true surface


def label_image(array: np.ndarray, spacing: tuple[float, float, float] = SPACING) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    return image


# ------------------------------------------------------------------------------- Dice
def box_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two 5x5x5 boxes ([k, j, i]) shifted by 2 voxels along k (the 2.5 mm axis): 75 voxels shared."""
    a = np.zeros((20, 16, 16), np.uint8)
    a[5:10, 5:10, 5:10] = 1
    return a, np.roll(a, 2, axis=0)


def test_dice_of_known_boxes_and_absent_labels() -> None:
    a, b = box_pair()
    b[0, 0, 0] = 2  # label 2 only in b
    result = dice(a, label_image(b))  # arrays and images mix
    assert result == {1: pytest.approx(2 * 75 / 250), 2: 0.0}
    chosen = dice(a, b, labels=[1, 3])
    assert list(chosen) == [1, 3] and math.isnan(chosen[3])
    assert dice(a, a) == {1: 1.0} and type(result[1]) is float
    with pytest.raises(InputError):
        dice(a, a[1:])


# ------------------------------------------------------------------------------- surface distances
def brute_force_directed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance (mm) from every surface voxel of A to the nearest surface voxel of B, pair by pair."""
    six = ndimage.generate_binary_structure(3, 1)
    surface = [m & ~ndimage.binary_erosion(m, six, border_value=0) for m in (a, b)]
    pa, pb = (np.argwhere(s) * np.array(SPACING[::-1]) for s in surface)  # [k, j, i] indices -> mm
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)


def test_surface_distances_match_brute_force_on_random_shapes() -> None:
    rng = np.random.default_rng(7)
    for _ in range(3):
        a = ndimage.binary_opening(rng.random((9, 12, 14)) > 0.45)
        b = ndimage.binary_opening(rng.random((9, 12, 14)) > 0.45)
        d_ab, d_ba = surface_distances(a, b, SPACING)
        assert np.allclose(d_ab, brute_force_directed(a, b), atol=1e-5)
        assert np.allclose(d_ba, brute_force_directed(b, a), atol=1e-5)
        both = np.concatenate([d_ab, d_ba])
        assert average_surface_distance(a, b, SPACING) == pytest.approx(both.mean(), abs=1e-5)
        hd, hd95 = hausdorff(a, b, SPACING)
        assert hd == pytest.approx(both.max(), abs=1e-5)
        assert hd95 == pytest.approx(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)), abs=1e-5)


def spheres(r1: float, r2: float) -> tuple[np.ndarray, np.ndarray]:
    """Two concentric balls (radii in mm) on the anisotropic grid, centred off the voxel lattice."""
    k, j, i = np.meshgrid(np.arange(24), np.arange(56), np.arange(70), indexing="ij")
    x, y, z = (i - 34.7) * SPACING[0], (j - 28.2) * SPACING[1], (k - 11.6) * SPACING[2]
    r = np.sqrt(x**2 + y**2 + z**2)
    return r <= r1, r <= r2


@pytest.mark.parametrize(("r1", "r2"), [(14.0, 20.0), (10.0, 20.0)])
def test_concentric_spheres_on_an_anisotropic_grid(r1: float, r2: float) -> None:
    inner, outer = spheres(r1, r2)
    gap = r2 - r1
    # every surface voxel lies within one coarsest step inside its sphere, so every directed distance is gap +- COARSEST
    for directed in surface_distances(inner, outer, SPACING):
        assert np.all(np.abs(directed - gap) <= COARSEST)
    hd, hd95 = hausdorff(inner, outer, SPACING)
    asd = average_surface_distance(inner, outer, SPACING)
    assert abs(hd - gap) <= COARSEST and abs(hd95 - gap) <= COARSEST and abs(asd - gap) <= COARSEST
    assert asd <= hd95 <= hd


def test_shifted_box_is_exact_along_the_thick_axis() -> None:
    a, b = box_pair()
    hd, hd95 = hausdorff(a, b, SPACING)
    assert hd == pytest.approx(5.0) and hd95 == pytest.approx(5.0)  # 2 voxels x 2.5 mm
    # per direction (98 surface voxels): 25 at 5 mm, 16 at 2.5 mm, and the 3x3 inside of the far face reach
    # the side walls: 6 x 0.8 + 2 x 1.0 + 1 x 1.6 = 8.4 mm; the rest touch the other surface (0 mm)
    assert average_surface_distance(a, b, SPACING) == pytest.approx(2 * (125 + 40 + 8.4) / (2 * 98), abs=1e-5)
    # labels, and the spacing taken from an image or a grid
    image_a, image_b = label_image(3 * a), label_image(3 * b)
    assert hausdorff(image_a, image_b, image_a, label=3) == pytest.approx((5.0, 5.0))
    assert hausdorff(image_a, image_b, Grid.from_image(image_a), label=3) == pytest.approx((5.0, 5.0))


def test_empty_masks_give_nan_without_warnings() -> None:
    a, _ = box_pair()
    empty = np.zeros_like(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in ((a, empty), (empty, a), (empty, empty)):
            assert all(math.isnan(v) for v in hausdorff(x, y, SPACING))
            assert math.isnan(average_surface_distance(x, y, SPACING))
    with pytest.raises(InputError):
        hausdorff(a, a, (1.0, 0.0, 1.0))


def test_label_metrics_per_label() -> None:
    a, b = box_pair()
    reference = label_image(a + 2 * (np.arange(a.size).reshape(a.shape) == 0))  # label 2: one voxel, reference only
    result = label_metrics(reference, label_image(b))
    assert result[1] == pytest.approx({"dice": 0.6, "hd": 5.0, "hd95": 5.0, "asd": 346.8 / 196}, abs=1e-5)
    assert result[2]["dice"] == 0.0 and all(math.isnan(result[2][m]) for m in ("hd", "hd95", "asd"))
    assert list(label_metrics(reference, reference, labels=[1])) == [1]
    with pytest.raises(InputError, match="grid"):
        label_metrics(reference, label_image(b, (0.8, 1.0, 2.0)))


# ------------------------------------------------------------------------------- landmarks
def test_target_registration_error_of_known_points() -> None:
    mapped = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    reference = np.array([[3.0, 4.0, 0.0], [1.0, 1.0, 1.0], [2.0, 0.0, 2.0], [3.0, 5.0, 9.0]])
    errors = target_registration_error(mapped, reference)
    assert errors.tolist() == [5.0, 0.0, 2.0, 7.0]
    summary = tre_summary(errors)
    assert summary == {"mean": 3.5, "median": 3.5, "max": 7.0, "std": pytest.approx(math.sqrt(7.25))}
    assert all(math.isnan(v) for v in tre_summary(np.empty(0)).values())
    with pytest.raises(InputError):
        target_registration_error(mapped, reference[:3])
    with pytest.raises(InputError):
        target_registration_error(mapped[:, :2], reference[:, :2])


# ------------------------------------------------------------------------------- fields
def oblique_grid() -> Grid:
    r = rotation_matrix(torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64))[0].flatten().tolist()
    return Grid((14, 12, 10), (0.8, 1.3, 2.5), (5.0, -3.0, 7.0), tuple(r))


def field_image(field: np.ndarray, grid: Grid, pixel_type: int = sitk.sitkVectorFloat32) -> sitk.Image:
    """An LPS displacement image ``[k, j, i, 3]`` on ``grid``."""
    return grid.apply_to(sitk.Cast(sitk.GetImageFromArray(field, isVector=True), pixel_type))


def test_folding_fraction_and_jacobian_std_of_a_known_array() -> None:
    det = np.array([[[1.0, -0.5], [0.0, 2.0]], [[1.5, 1.0], [0.5, 3.0]]])
    assert folding_fraction(det) == 0.25
    mask = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 1]]])
    assert folding_fraction(det, mask) == pytest.approx(1 / 3)
    assert folding_fraction(sitk.GetImageFromArray(det), sitk.GetImageFromArray(mask.astype(np.uint8))) == pytest.approx(1 / 3)
    assert jacobian_std(det) == pytest.approx(math.sqrt(np.sum((det - 8.5 / 8) ** 2) / 7))
    inside_mean = 7 / 6  # of 1.0, -0.5 and 3.0
    assert jacobian_std(det, mask) == pytest.approx(math.sqrt(sum((v - inside_mean) ** 2 for v in (1.0, -0.5, 3.0)) / 2))
    assert math.isnan(folding_fraction(det, np.zeros_like(mask)))
    with pytest.raises(InputError):
        folding_fraction(det, mask[:1])


def test_jacobian_image_of_a_pure_scale_on_an_oblique_anisotropic_grid() -> None:
    grid = oblique_grid()
    pts = grid.physical_points(dtype=torch.float64).numpy()
    image = field_image(0.2 * pts, grid)
    det = jacobian_determinant_image(image)
    assert det.GetPixelID() == sitk.sitkFloat32 and Grid.from_image(det).same_as(grid)
    assert np.allclose(sitk.GetArrayFromImage(det)[1:-1, 1:-1, 1:-1], 1.2**3, atol=1e-4)


def test_jacobian_image_in_slabs_equals_one_piece() -> None:
    grid = oblique_grid()
    field = np.random.default_rng(3).normal(0.0, 1.5, (*grid.shape, 3))
    image = field_image(field, grid, sitk.sitkVectorFloat64)
    whole = jacobian_determinant(torch.from_numpy(field).movedim(-1, 0)[None], grid)[0].float().numpy()
    for slab_voxels in (1, 2 * 14 * 12, 10**9):  # one slice, two slices, everything at once
        assert np.array_equal(sitk.GetArrayFromImage(jacobian_determinant_image(image, slab_voxels)), whole)
    with pytest.raises(InputError):
        jacobian_determinant_image(sitk.Image(4, 4, 4, sitk.sitkFloat32))


def interior_points(grid: Grid, n: int) -> np.ndarray:
    """Random LPS points (mm) at continuous indices at least one voxel inside the grid."""
    idx = np.random.default_rng(5).uniform(1.0, np.array(grid.size) - 2.0, (n, 3))
    return np.c_[idx, np.ones(n)] @ grid.index_to_physical()[:3].T


@pytest.mark.parametrize("pixel_type", [sitk.sitkVectorFloat32, sitk.sitkVectorFloat64])
def test_points_through_constant_and_linear_fields(pixel_type: int) -> None:
    grid = oblique_grid()
    pts = grid.physical_points(dtype=torch.float64).numpy()
    points = interior_points(grid, 25)
    shift = np.array([1.0, -2.0, 0.5])
    constant = field_image(np.broadcast_to(shift, pts.shape).copy(), grid, pixel_type)
    assert np.allclose(transform_points_with_field(points, constant), points + shift, atol=1e-5)
    linear = field_image(0.05 * pts + shift, grid, pixel_type)  # trilinear interpolation reproduces it exactly
    before = sitk.GetArrayFromImage(linear)
    assert np.allclose(transform_points_with_field(points, linear), 1.05 * points + shift, atol=1e-4)
    assert linear.GetPixelID() == pixel_type and np.array_equal(sitk.GetArrayFromImage(linear), before)  # input untouched
    far = grid.corners()[:1] + 1000.0
    assert np.allclose(transform_points_with_field(far, linear), far)  # ITK: no displacement outside the field
    with pytest.raises(InputError):
        transform_points_with_field(points[:, :2], linear)
