"""The engine and ITK agree on what a transform means (DESIGN.md section 2).

(a) ``transform.h5`` written by ``dlir register``, read back with ``SimpleITK.ReadTransform``,
    reproduces ``warped.nii.gz`` (linear) and ``labels.nii.gz`` (nearest neighbour) on an oblique,
    anisotropic real pair, for a fresh stack (near identity) and for a stack whose output layers
    are set to a visible rotation, translation and deformation.
(b) ICON-style analytic check: a known smooth displacement field on a tiny oblique, anisotropic
    grid with a non-zero origin; warping through ``dlir.transforms.warp`` / ``dlir.geometry.sample``
    equals ``sitk.Resample`` with ``sitk.DisplacementFieldTransform`` of the same field, border
    voxels included (points that leave the image, points in the outer half voxel).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dlir.geometry import Grid, image_to_tensor, rotation_matrix, sample
from dlir.stack import load_stack, save_stack
from dlir.transforms import DisplacementField, warp

RunDlir = Callable[..., subprocess.CompletedProcess]

PAIR = "pairs/brain1_aniso_oblique"


# ------------------------------------------------------------------------ (a) transform.h5 vs outputs
def dense_labels(moving: sitk.Image) -> sitk.Image:
    """Four labels from intensity quantiles of the moving image: many boundaries, so nearest-neighbour
    differences cannot hide (the pair's own tumour label covers a few hundred voxels only)."""
    arr = sitk.GetArrayFromImage(moving)
    edges = np.quantile(arr[arr > np.quantile(arr, 0.2)], [0.25, 0.5, 0.75])
    labels = np.where(arr > np.quantile(arr, 0.2), 1 + np.searchsorted(edges, arr), 0).astype(np.uint8)
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(moving)
    return image


def compact_parts(transform: sitk.Transform) -> list[sitk.Transform]:
    """The parts of a transform read from ``transform.h5``: an ITK composite (the last part acts first)."""
    assert transform.GetTransformEnum() == sitk.sitkComposite, transform.GetName()
    composite = sitk.CompositeTransform(transform)
    return [composite.GetNthTransform(i) for i in range(composite.GetNumberOfTransforms())]


@pytest.fixture(scope="module")
def visible_stack_file(fresh_stack_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fresh small stack with its output layers set: a rotation (~5 deg about z, ~3 deg about x),
    a translation of a few mm, a 2.5 % scaling and a B-spline field that varies with the images
    (Jacobian about 0.96 to 1.05, no folding)."""
    stack = load_stack(fresh_stack_file)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head = stack.stages[0].net.head[-1]
        # raw: rotation (3), shear (3), scale (3), translation (3, units of half the grid's extent)
        head.bias.copy_(torch.tensor([0.017, -0.006, 0.028, 0.01, 0.0, -0.01, 0.05, -0.03, 0.02, 0.04, -0.03, 0.02]))
        out = stack.stages[1].net.output
        out.bias.copy_(torch.tensor([0.5, -0.4, 0.3]))  # control points (voxels of the 4 mm grid): 2, -1.6, 1.2 mm
        out.weight.copy_(torch.randn(out.weight.shape, generator=g) * 3.0)
    stack.manifest.name = "visible-warp"
    return save_stack(stack, tmp_path_factory.mktemp("visible") / "visible-warp.safetensors")


@pytest.mark.parametrize("which", ["fresh", "visible"])
def test_transform_file_reproduces_warped_image_and_labels(
    which: str, shared_data: Path, fresh_stack_file: Path, visible_stack_file: Path, run_dlir: RunDlir, tmp_path: Path
) -> None:
    pair = shared_data / PAIR
    fixed = sitk.ReadImage(str(pair / "fixed.nii.gz"))
    moving = sitk.ReadImage(str(pair / "moving.nii.gz"), sitk.sitkFloat32)
    labels_path = tmp_path / "moving_labels.nii.gz"
    sitk.WriteImage(dense_labels(moving), str(labels_path))
    stack = fresh_stack_file if which == "fresh" else visible_stack_file
    out = tmp_path / "out"
    result = run_dlir("register", pair / "fixed.nii.gz", pair / "moving.nii.gz", "--stack", stack, "--out", out,
                      "--moving-labels", labels_path, "--device", "cpu", "--initial-alignment", "centre")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "result.json").read_text(encoding="utf-8"))["stack"] == ("fresh-small" if which == "fresh" else "visible-warp")

    transform = sitk.ReadTransform(str(out / "transform.h5"))
    engine = sitk.ReadImage(str(out / "warped.nii.gz"))
    for image in (engine, sitk.ReadImage(str(out / "labels.nii.gz")), sitk.ReadImage(str(out / "jacobian.nii.gz"))):
        assert Grid.from_image(image).same_as(Grid.from_image(fixed), tol=1e-5), "an output is not on the fixed grid"

    # the transform is compact: the stages (affines, fields on the coarse network grids), never a full-resolution grid
    parts = compact_parts(transform)  # initial alignment, then the small stack's affine and B-spline stages
    assert [p.GetName() for p in parts] == ["AffineTransform", "AffineTransform", "DisplacementFieldTransform"]
    stage_field = sitk.DisplacementFieldTransform(parts[2]).GetDisplacementField()
    assert stage_field.GetSpacing() == (4.0, 4.0, 4.0)  # the B-spline stage's network grid, whatever the fixed grid
    assert (out / "transform.h5").stat().st_size < 10e6
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                              fixed.GetSpacing(), fixed.GetDirection())

    ours = sitk.GetArrayFromImage(engine)
    itk = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    span = float(sitk.GetArrayViewFromImage(moving).max() - sitk.GetArrayViewFromImage(moving).min())
    error = float(np.abs(itk - ours).max()) / span
    assert error < 1e-3, f"ITK with transform.h5 differs from warped.nii.gz by {error:.2e} of the intensity range"

    label_map = sitk.ReadImage(str(labels_path))
    itk_labels = sitk.GetArrayFromImage(sitk.Resample(label_map, fixed, transform, sitk.sitkNearestNeighbor, 0))
    our_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz")))
    agreement = float((itk_labels == our_labels).mean())
    assert agreement >= 0.999, f"labels agree on {100 * agreement:.3f} % of voxels only"
    assert set(np.unique(our_labels)) == {0, 1, 2, 3, 4}

    displacement = sitk.GetArrayFromImage(field)
    still = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    if which == "fresh":  # untrained networks are the identity, and this pair shares one grid: nothing moves
        assert np.abs(displacement).max() < 1e-3
        assert np.abs(ours - still).max() / span < 1e-5
    else:  # the check above is about real warping: several mm, spatially varying, visibly different
        magnitude = np.linalg.norm(displacement, axis=-1)
        assert magnitude.max() > 5.0 and magnitude.std() > 0.5, (magnitude.max(), magnitude.std())
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz"))).std() > 2e-3
        assert np.abs(ours - still).max() / span > 0.2
        identity_labels = sitk.GetArrayFromImage(sitk.Resample(label_map, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        assert (identity_labels != our_labels).mean() > 0.05


# ------------------------------------------------------------------------ (b) analytic field, ITK-style
def oblique_grid(size, spacing, origin, angles) -> Grid:
    direction = rotation_matrix(torch.tensor([angles], dtype=torch.float64))[0].numpy()
    return Grid(tuple(size), tuple(spacing), tuple(origin), tuple(float(v) for v in direction.flatten()))


FIXED_GRID = oblique_grid((12, 10, 8), (1.3, 0.9, 2.1), (-7.5, 12.25, 30.2), (0.35, -0.2, 0.6))
OTHER_GRID = oblique_grid((11, 13, 9), (1.1, 1.2, 1.7), (-4.0, 9.0, 31.0), (-0.25, 0.4, 0.1))


def smooth_values(points: np.ndarray) -> np.ndarray:
    """A smooth analytic intensity (physical LPS mm -> value), range about [-2, 3]."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return np.sin(0.31 * x + 0.1 * z) + np.cos(0.23 * y - 0.05 * x) + 0.8 * np.sin(0.17 * z + 0.2 * y + 1.0) + 0.5


def known_displacement(points: np.ndarray) -> np.ndarray:
    """A smooth field (LPS mm), up to about 3 mm: enough to push border points out of the image."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return np.stack([2.2 * np.sin(0.21 * y + 0.13 * z),
                     1.8 * np.cos(0.19 * x - 0.3) - 0.6,
                     1.5 * np.sin(0.25 * z + 0.15 * x)], axis=-1)


def points_of(grid: Grid) -> np.ndarray:
    return grid.physical_points(dtype=torch.float64).numpy()  # [D, H, W, 3], float64


def image_on(grid: Grid, values: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(values, isVector=values.ndim == 4)
    return grid.apply_to(image)


def itk_field_transform(field: np.ndarray, grid: Grid) -> sitk.DisplacementFieldTransform:
    # the transform takes the image over (leaves it empty), so hand it a fresh one
    return sitk.DisplacementFieldTransform(image_on(grid, field.astype(np.float64)))


def itk_resample(moving: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """``sitk.Resample`` of ``moving`` onto FIXED_GRID (linear, 0 outside, float64), as an array [k, j, i]."""
    reference = image_on(FIXED_GRID, np.zeros(FIXED_GRID.shape))
    return sitk.GetArrayFromImage(sitk.Resample(moving, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64))


@pytest.mark.parametrize("moving_grid", [FIXED_GRID, OTHER_GRID],
                         ids=["moving on the fixed grid", "moving on another oblique grid"])
def test_warp_with_a_displacement_field_equals_itk(moving_grid: Grid) -> None:
    fixed_points = points_of(FIXED_GRID)
    field = known_displacement(fixed_points)  # on the fixed grid: T(x) = x + u(x), fixed -> moving
    moving = image_on(moving_grid, smooth_values(points_of(moving_grid)))  # float64

    itk = itk_resample(moving, itk_field_transform(field, FIXED_GRID))
    moving_t = image_to_tensor(moving)
    transform = DisplacementField(torch.from_numpy(field).permute(3, 0, 1, 2)[None].float(), FIXED_GRID)
    ours = warp(moving_t, moving_grid, transform, FIXED_GRID)[0, 0].double().numpy()
    direct = sample(moving_t, moving_grid, torch.from_numpy(fixed_points + field)[None].float())[0, 0].double().numpy()

    # where each fixed voxel lands in the moving image (continuous index, float64), shape [k, j, i, 3]
    mapped = fixed_points + field
    index = mapped @ moving_grid.physical_to_index()[:3, :3].T + moving_grid.physical_to_index()[:3, 3]
    size = np.asarray(moving_grid.size)
    outside = ((index < -0.5) | (index > size - 0.5)).any(axis=-1)  # ITK: the default value, 0
    outer_half_voxel = ~outside & ((index < 0) | (index > size - 1)).any(axis=-1)  # ITK: clamped to the border
    # a point within 1e-4 voxel of the buffer's edge may fall on either side in float32: not comparable
    on_edge = (np.abs(np.abs(index - (size - 1) / 2) - size / 2) < 1e-4).any(axis=-1)
    assert on_edge.sum() <= 2
    assert outside.sum() >= 10 and outer_half_voxel.sum() >= 10, "the field must exercise both kinds of border"

    span = float(itk.max() - itk.min())
    keep = ~on_edge
    for name, values in (("warp", ours), ("sample", direct)):
        error = np.abs(values - itk)[keep].max() / span
        assert error < 1e-4, f"{name} differs from ITK by {error:.2e} of the range"
        error = np.abs(values - itk)[keep & outer_half_voxel].max() / span
        assert error < 1e-4, f"{name} differs from ITK by {error:.2e} in the outer half voxel"
        assert np.all(values[keep & outside] == 0), f"{name} is not 0 where the point leaves the moving image"
    assert np.abs(itk - itk_resample(moving, sitk.Transform())).max() / span > 0.3  # the field really moves things


def test_displacement_field_interpolation_equals_itk_transform_point() -> None:
    """Between voxel centres (and in the outer half voxel) the field is trilinear, exactly as ITK's."""
    field = known_displacement(points_of(FIXED_GRID))
    tx = itk_field_transform(field, FIXED_GRID)
    rng = np.random.default_rng(0)
    # anywhere inside ITK's buffer: the voxel centres' box plus half a voxel on every side
    index = rng.uniform(-0.499, np.asarray(FIXED_GRID.size) - 0.501, size=(400, 3))
    index[:50, 0] = rng.uniform(-0.499, 0, 50)  # and plenty in the outer half voxel
    index[50:100, 2] = rng.uniform(FIXED_GRID.size[2] - 1, FIXED_GRID.size[2] - 0.501, 50)
    points = (np.c_[index, np.ones(len(index))] @ FIXED_GRID.index_to_physical().T)[:, :3]
    itk = np.array([tx.TransformPoint(tuple(p)) for p in points])
    ours = DisplacementField(torch.from_numpy(field).permute(3, 0, 1, 2)[None].double(), FIXED_GRID)(
        torch.from_numpy(points)[None])[0].numpy()
    error = np.abs(ours - itk).max()
    assert error < 1e-4 * np.abs(field).max(), f"the field differs from ITK's by {error:.2e} mm"
    assert np.abs(itk - points).max() > 1.0  # the points really move
