"""Metrics against hand-computed values: boxes, concentric spheres on an anisotropic grid, points, Jacobians."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dlir.geometry import Grid, rotation_matrix
from dlir.landmarks import read_landmark_pairs, read_points, write_points
from dlir.metrics import (
    average_surface_distance,
    dice,
    folding_fraction,
    hausdorff,
    jacobian_determinant_image,
    jacobian_std,
    label_metrics,
    target_registration_error,
    transform_points_with_field,
    tre_summary,
)

SPACING = (0.8, 1.0, 2.5)  # x, y, z mm
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_dice_of_known_boxes() -> None:
    a = np.zeros((10, 10, 10), np.uint8)
    b = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = 1  # 64 voxels
    b[3:7, 2:6, 2:6] = 1  # 64 voxels, 48 shared
    b[0, 0, 0] = 2
    result = dice(a, b)
    assert result[1] == pytest.approx(2 * 48 / 128)
    assert result[2] == 0.0
    assert math.isnan(dice(a, b, labels=[3])[3])


def spheres(r1: float, r2: float) -> tuple[np.ndarray, np.ndarray]:
    k, j, i = np.meshgrid(np.arange(40), np.arange(64), np.arange(80), indexing="ij")
    r = np.sqrt(((i - 40) * SPACING[0]) ** 2 + ((j - 32) * SPACING[1]) ** 2 + ((k - 20) * SPACING[2]) ** 2)
    return r <= r1, r <= r2


def test_concentric_spheres_on_an_anisotropic_grid() -> None:
    inner, outer = spheres(14.0, 20.0)
    hd, hd95 = hausdorff(inner, outer, SPACING)
    asd = average_surface_distance(inner, outer, SPACING)
    tolerance = max(SPACING)  # surfaces are voxelised: one (coarsest) voxel of slack
    assert abs(hd - 6.0) <= tolerance and abs(hd95 - 6.0) <= tolerance and abs(asd - 6.0) <= tolerance
    assert hd >= hd95


def test_shifted_box_hausdorff_is_exact_along_the_thick_axis() -> None:
    a = np.zeros((20, 20, 20), bool)
    a[5:10, 5:10, 5:10] = True
    b = np.roll(a, 2, axis=0)  # 2 voxels along k = 2 * 2.5 mm
    hd, hd95 = hausdorff(a, b, SPACING)
    assert hd == pytest.approx(5.0) and hd95 == pytest.approx(5.0)
    assert math.isnan(hausdorff(a, np.zeros_like(a), SPACING)[0])


def test_label_metrics_on_sitk_images() -> None:
    inner, outer = spheres(10.0, 10.0)
    ref = sitk.GetImageFromArray(inner.astype(np.uint8))
    ref.SetSpacing(SPACING)
    result = label_metrics(ref, ref)
    assert result[1] == pytest.approx({"dice": 1.0, "hd": 0.0, "hd95": 0.0, "asd": 0.0}, abs=1e-5)


def test_target_registration_error() -> None:
    a = np.array([[0.0, 0, 0], [1, 1, 1], [2, 0, 0]])
    b = np.array([[3.0, 4, 0], [1, 1, 1], [2, 0, 2]])
    errors = target_registration_error(a, b)
    assert errors.tolist() == [5.0, 0.0, 2.0]
    assert tre_summary(errors) == {"mean": pytest.approx(7 / 3), "median": 2.0, "max": 5.0, "std": pytest.approx(np.std([5, 0, 2]))}


def oblique_grid() -> Grid:
    r = rotation_matrix(torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64))[0].flatten().tolist()
    return Grid((14, 12, 10), (0.8, 1.3, 2.5), (5.0, -3.0, 7.0), tuple(r))


def field_image(field: np.ndarray, grid: Grid) -> sitk.Image:
    return grid.apply_to(sitk.GetImageFromArray(field.astype(np.float32), isVector=True))


def test_jacobian_image_of_a_pure_scale_and_the_folding_statistics() -> None:
    grid = oblique_grid()
    pts = grid.physical_points(dtype=torch.float64).numpy()
    det = sitk.GetArrayFromImage(jacobian_determinant_image(field_image(0.2 * pts, grid)))
    assert np.allclose(det, 1.728, atol=1e-4)
    values = np.array([[[1.0, -0.5], [0.0, 2.0]]])
    assert folding_fraction(values) == 0.5
    assert folding_fraction(values, mask=np.array([[[1, 0], [0, 1]]])) == 0.0
    assert jacobian_std(values) == pytest.approx(np.std(values, ddof=1))


def test_points_through_a_displacement_field() -> None:
    grid = oblique_grid()
    pts = grid.physical_points(dtype=torch.float64).numpy()
    linear = 0.05 * pts + np.array([1.0, -2.0, 0.5])
    interior = pts[3:7, 4:8, 5:9].reshape(-1, 3)
    mapped = transform_points_with_field(interior, field_image(linear, grid))
    assert np.allclose(mapped, interior * 1.05 + np.array([1.0, -2.0, 0.5]), atol=1e-4)


def test_landmark_files_round_trip_and_convert_ras(tmp_path: Path) -> None:
    points = np.array([[1.5, -2.0, 3.25], [-10.0, 20.0, 0.0]])
    for name in ("p.csv", "p.mrk.json"):
        assert np.allclose(read_points(write_points(tmp_path / name, points)), points)
    fcsv = tmp_path / "ras.fcsv"
    fcsv.write_text(
        "# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        "vtkMRMLMarkupsFiducialNode_0,1.5,-2,3.25,0,0,0,1,1,1,0,F-1,,\n"
    )
    assert np.allclose(read_points(fcsv), [[-1.5, 2.0, 3.25]])
    markups = tmp_path / "ras.mrk.json"
    markups.write_text('{"markups": [{"coordinateSystem": "RAS", "controlPoints": [{"position": [1, 2, 3]}]}]}')
    assert np.allclose(read_points(markups), [[-1.0, -2.0, 3.0]])


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")
def test_pairs_landmarks_match_the_data_readme() -> None:
    fixed, moving = read_landmark_pairs(DATA / "pairs" / "lung1_aniso" / "landmarks.csv")
    assert fixed.shape == moving.shape == (100, 3)
    assert target_registration_error(fixed, moving).mean() == pytest.approx(8.60, abs=0.01)
