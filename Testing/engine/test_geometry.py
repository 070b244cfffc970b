"""Engine resampling equals SimpleITK's on anisotropic and oblique grids (DESIGN.md section 2)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from dlir.geometry import Grid, image_to_tensor, rotation_matrix, sample
from dlir.transforms import AffineTransform, warp


def oblique_direction(angles_deg: tuple[float, float, float]) -> tuple[float, ...]:
    r = rotation_matrix(torch.tensor(np.deg2rad([angles_deg]), dtype=torch.float64))[0].numpy()
    return tuple(r.flatten())


def smooth_image(size, spacing, origin, direction) -> sitk.Image:
    """A sum of Gaussian blobs in physical space (smooth everywhere), on the given grid."""
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    pts = Grid.from_image(image).physical_points(dtype=torch.float64).numpy()
    centre = Grid.from_image(image).centre()
    values = np.zeros(pts.shape[:3])
    for offset, width in (((0, 0, 0), 12.0), ((8, -5, 4), 6.0), ((-6, 7, -3), 8.0)):
        d2 = ((pts - centre - np.asarray(offset)) ** 2).sum(-1)
        values += np.exp(-d2 / (2 * width**2))
    result = sitk.GetImageFromArray(values.astype(np.float32))
    result.CopyInformation(image)
    return result


def itk_affine() -> sitk.AffineTransform:
    """Rotation + shear + scale + translation about a centre, fixed -> moving."""
    rot = rotation_matrix(torch.tensor([[0.12, -0.08, 0.2]], dtype=torch.float64))[0].numpy()
    shear = np.array([[1, 0.05, 0], [0, 1, -0.04], [0, 0, 1]])
    matrix = rot @ shear @ np.diag([1.08, 0.95, 1.03])
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(matrix.flatten().tolist())
    tx.SetCenter((3.0, -2.0, 5.0))
    tx.SetTranslation((4.0, -3.0, 2.5))
    return tx


def as_engine(tx: sitk.AffineTransform) -> AffineTransform:
    a = np.asarray(tx.GetMatrix()).reshape(3, 3)
    c, t = np.asarray(tx.GetCenter()), np.asarray(tx.GetTranslation())
    offset = c - a @ c + t
    return AffineTransform(torch.tensor(a, dtype=torch.float32)[None], torch.tensor(offset, dtype=torch.float32)[None])


def check_against_sitk(moving: sitk.Image, fixed: sitk.Image) -> float:
    tx = itk_affine()
    reference = sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ours = warp(image_to_tensor(moving), Grid.from_image(moving), as_engine(tx), Grid.from_image(fixed))[0, 0].numpy()
    ref = sitk.GetArrayFromImage(reference)
    return float(np.abs(ours - ref).max() / (ref.max() - ref.min()))


def test_resampling_matches_sitk_on_anisotropic_grids() -> None:
    moving = smooth_image((40, 36, 14), (1.1, 0.9, 3.5), (-20.0, -15.0, -25.0), oblique_direction((0, 0, 0)))
    fixed = smooth_image((34, 40, 20), (1.3, 1.0, 2.5), (-22.0, -18.0, -24.0), oblique_direction((0, 0, 0)))
    assert check_against_sitk(moving, fixed) < 1e-3


def test_resampling_matches_sitk_on_oblique_grids() -> None:
    moving = smooth_image((36, 32, 16), (1.2, 1.0, 3.0), (-18.0, -14.0, -20.0), oblique_direction((18, -7, 11)))
    fixed = smooth_image((30, 34, 18), (1.4, 1.1, 2.6), (-16.0, -20.0, -22.0), oblique_direction((-12, 9, 4)))
    assert check_against_sitk(moving, fixed) < 1e-3


def test_nearest_neighbour_labels_match_sitk() -> None:
    moving = smooth_image((30, 28, 12), (1.2, 1.0, 3.0), (-15.0, -12.0, -15.0), oblique_direction((10, 0, -5)))
    labels = sitk.Cast(sitk.BinaryThreshold(moving, 0.5, 10.0, 1, 0) + sitk.BinaryThreshold(moving, 0.9, 10.0, 1, 0), sitk.sitkUInt8)
    fixed = smooth_image((28, 30, 14), (1.3, 1.1, 2.5), (-16.0, -15.0, -16.0), oblique_direction((-8, 4, 0)))
    tx = itk_affine()
    reference = sitk.GetArrayFromImage(sitk.Resample(labels, fixed, tx, sitk.sitkNearestNeighbor, 0))
    ours = warp(image_to_tensor(labels), Grid.from_image(labels), as_engine(tx), Grid.from_image(fixed), mode="nearest")[0, 0].numpy()
    assert (ours == reference).mean() >= 0.999


def test_voxel_physical_round_trip_and_direction() -> None:
    grid = Grid((5, 6, 7), (0.5, 1.5, 3.0), (10.0, -4.0, 2.0), oblique_direction((20, 10, -30)))
    image = sitk.Image(grid.size, sitk.sitkUInt8)
    grid.apply_to(image)
    idx = (3, 1, 5)
    expected = image.TransformIndexToPhysicalPoint(idx)
    m = grid.index_to_physical()
    assert np.allclose(m @ np.array([*idx, 1.0]), [*expected, 1.0])
    assert np.allclose(grid.physical_to_index() @ m, np.eye(4))
    pts = grid.physical_points(dtype=torch.float64)
    assert np.allclose(pts[idx[2], idx[1], idx[0]].numpy(), expected)
    assert np.allclose(grid.centre(), image.TransformContinuousIndexToPhysicalPoint((2.0, 2.5, 3.0)))
    index = torch.tensor([[3.0, 1.0, 5.0], [0.25, 4.5, -0.5]], dtype=torch.float64)
    assert np.allclose(grid.physical_from_index(index)[0].numpy(), expected)
    assert torch.allclose(grid.continuous_index(grid.physical_from_index(index)), index)


def test_contains_is_itks_inside_test_on_an_oblique_grid() -> None:
    grid = Grid((4, 5, 6), (0.5, 1.5, 3.0), (10.0, -4.0, 2.0), oblique_direction((20, 10, -30)))
    index = torch.tensor([[-0.5, 0.0, 0.0], [-0.51, 0.0, 0.0], [3.5, 4.5, 5.5], [3.5, 4.5, 5.51], [1.0, 2.0, 3.0]],
                         dtype=torch.float64)
    assert grid.contains_index(index).tolist() == [True, False, True, False, True]
    near = torch.tensor([[-0.49, 0.0, 0.0], [-0.51, 0.0, 0.0], [3.49, 4.49, 5.49], [3.5, 4.5, 5.51]], dtype=torch.float64)
    assert grid.contains(grid.physical_from_index(near)).tolist() == [True, False, True, False]  # LPS points, mm
    assert grid.contains_index(torch.tensor([-0.5, 5.5, 5.6], dtype=torch.float64), axis=2).tolist() == [True, True, False]


def test_outside_points_take_the_default_value() -> None:
    grid = Grid((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), oblique_direction((0, 0, 0)))
    image = torch.ones(1, 1, 4, 4, 4)
    pts = torch.tensor([[[[[-0.4, 0, 0], [-0.6, 0, 0], [3.4, 3.0, 3.0], [3.6, 0, 0]]]]])
    values = sample(image, grid, pts)[0, 0, 0, 0].tolist()
    assert values == [1.0, 0.0, 1.0, 0.0]
