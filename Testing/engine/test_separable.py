"""The exported transform evaluated separably on the fixed grid, det J analytic (issue 28, :mod:`dlir.separable`).

* On an oblique, anisotropic pair the separable evaluation equals SimpleITK evaluating and resampling with the
  written ``transform.h5`` within float rounding: a constructed transform (an affine after a field on a grid
  along the fixed image, one axis flipped) and the transform the bundled ``brain-mri`` makes of a development pair.
* The analytic det J equals the det J of the transform's own derivative (tiny steps in double precision), and the
  engine's central differences of the sampled displacement wherever their three-voxel stencil stays inside one
  cell of the field; elsewhere within the stated bound on a development pair.
* Fast mode takes this path on any fixed image (the bundled stacks' fields merged along it), and so does accurate
  mode (the refinement's field lives on a grid along the fixed image, :func:`dlir.refine.displacement_grid`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dlir import fullres
from dlir.export import itk_transform
from dlir.fullres import full_resolution
from dlir.geometry import Grid
from dlir.register import register
from dlir.separable import SeparableTransform
from dlir.stack import load_stack
from dlir.transforms import AffineTransform, Composite, DisplacementField, covering_grid, jacobian_determinant

#: |separable - SimpleITK with transform.h5| (mm): float32 rounding of points 50-150 mm from the centre
DISPLACEMENT_TOLERANCE_MM = 1e-4
#: warped image: |separable - SimpleITK| relative to the moving image's range (float32 points and interpolation)
WARPED_TOLERANCE = 1e-4
#: analytic det J against central differences where their stencil lies in one cell (float32 rounding)
SAME_CELL_TOLERANCE = 1e-4
#: analytic det J against central differences everywhere, on brain-mri's transform of mni_oblique_aniso: they differ
#: only where a stencil straddles a cell face (measured mean 5.4e-3, 99.9th percentile 0.047, max 0.094; det J
#: 0.78-1.67, std 0.109 either way)
MEAN_BOUND, P999_BOUND = 0.01, 0.1

PAIR = "pairs/mni_oblique_aniso"  # oblique (-12 deg) and anisotropic (1.8 x 2.2 x 3.0 mm) fixed grid


def _oblique_grid(size, spacing, origin, angle: float) -> Grid:
    c, s = math.cos(angle), math.sin(angle)
    return Grid(size, spacing, origin, (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))


def _constructed() -> tuple[Grid, Grid, sitk.Image, Composite]:
    """An oblique anisotropic fixed grid; an axis-aligned anisotropic moving image; ``T = A o (x + u)`` with ``u`` smooth
    on a 4.5 mm grid along the fixed axes whose first axis is flipped."""
    fixed = _oblique_grid((57, 43, 19), (0.9, 1.3, 2.7), (-25.0, -20.0, -22.0), 0.3)
    along = covering_grid(fixed, 4.5)
    d = along.direction_matrix.copy()
    d[:, 0] *= -1  # the field's i axis runs against the fixed image's
    origin = np.asarray(along.origin) + along.direction_matrix[:, 0] * along.spacing[0] * (along.size[0] - 1)
    field_grid = Grid(along.size, along.spacing, tuple(origin.tolist()), tuple(d.ravel().tolist()))
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4, 4, generator=g, dtype=torch.float64) * 3,
                                        size=field_grid.shape, mode="trilinear")
    affine = AffineTransform(torch.tensor([[[1.05, 0.03, 0.0], [-0.02, 0.97, 0.01], [0.0, 0.02, 1.02]]], dtype=torch.float64),
                             torch.tensor([[1.5, -2.0, 0.7]], dtype=torch.float64))
    moving_grid = Grid((44, 42, 20), (1.3, 1.1, 2.2), (-30.0, -28.0, -22.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    rng = np.random.default_rng(1)
    coarse = sitk.GetImageFromArray(rng.normal(size=(6, 6, 6)))
    moving = sitk.Resample(coarse, list(moving_grid.size), sitk.Transform(), sitk.sitkBSpline, [0, 0, 0],
                           [5 / s for s in moving_grid.size], [1, 0, 0, 0, 1, 0, 0, 0, 1], 0.0, sitk.sitkFloat32)
    moving = moving_grid.apply_to(moving * 1000.0)
    return fixed, moving_grid, moving, Composite([affine, DisplacementField(u, field_grid)])


def _itk(transform: Composite, tmp_path: Path) -> sitk.Transform:
    """``transform`` as written to and read back from ``transform.h5``."""
    path = tmp_path / "transform.h5"
    sitk.WriteTransform(itk_transform([transform]), str(path))
    return sitk.ReadTransform(str(path))


def _itk_displacement(transform: sitk.Transform, grid: Grid) -> np.ndarray:
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, grid.size, grid.origin, grid.spacing, grid.direction)
    return sitk.GetArrayFromImage(field)


def _near_the_border(transform: sitk.Transform, fixed: Grid, moving: sitk.Image) -> np.ndarray:
    """Fixed voxels whose moving point lies within 1e-3 voxel of the moving image's inside limit (-0.5, size - 0.5):
    there float rounding decides between the border value and 0."""
    points = np.asarray(fixed.index_to_physical()[:3, :3] @ np.stack(np.meshgrid(
        *(np.arange(n) for n in fixed.size[::-1]), indexing="ij")[::-1]).reshape(3, -1) + np.asarray(fixed.origin)[:, None])
    mapped = points.T + _itk_displacement(transform, fixed).reshape(-1, 3)
    index = (np.asarray(Grid.from_image(moving).physical_to_index()) @ np.c_[mapped, np.ones(len(mapped))].T)[:3].T
    limits = np.asarray(moving.GetSize()) - 0.5
    close = (np.abs(index + 0.5) < 1e-3) | (np.abs(index - limits) < 1e-3)
    return close.any(axis=1).reshape(fixed.shape)


def test_separable_evaluation_equals_itk_with_the_transform_file_on_a_constructed_oblique_pair(tmp_path: Path) -> None:
    fixed, moving_grid, moving, transform = _constructed()
    assert SeparableTransform.of(transform, fixed, moving_grid, torch.device("cpu")) is not None
    out = full_resolution(transform, fixed, fixed, torch.device("cpu"), moving=sitk.GetArrayViewFromImage(moving),
                          moving_grid=moving_grid, displacement=True, chunk_voxels=3 * 57 * 43)  # several slabs
    itk = _itk(transform, tmp_path)
    ours = sitk.GetArrayFromImage(out.displacement)
    assert np.abs(ours - _itk_displacement(itk, fixed)).max() < DISPLACEMENT_TOLERANCE_MM
    reference = fixed.apply_to(sitk.Image(list(fixed.size), sitk.sitkFloat32))
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, reference, itk, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    near = _near_the_border(itk, fixed, moving)
    span = float(np.ptp(sitk.GetArrayViewFromImage(moving)))
    difference = np.abs(sitk.GetArrayFromImage(out.warped) - resampled)[~near]
    assert difference.max() < WARPED_TOLERANCE * span
    assert (resampled == 0).any() and (resampled != 0).any()  # points inside and outside the moving image were met


@pytest.fixture(scope="module")
def oblique_pair(shared_data: Path) -> tuple[sitk.Image, sitk.Image]:
    return tuple(sitk.ReadImage(str(shared_data / PAIR / f"{name}.nii.gz")) for name in ("fixed", "moving"))  # type: ignore[return-value]


@pytest.mark.parametrize("refine", [0, 8], ids=["one-shot", "refined"])
def test_a_development_pairs_registration_equals_itk_with_its_transform_file(oblique_pair, tmp_path: Path, refine: int) -> None:
    """One shot (the stages' fields merged along the fixed grid) and refined (8 steps of accurate mode's finest level:
    its one field on a 6 mm grid along the fixed image), both evaluated separably."""
    fixed, moving = oblique_pair
    reg = register(fixed, moving, load_stack("brain-mri"), device="cpu", outputs=("warped", "jacobian", "displacement"),
                   float_warped=True, refine=refine)
    assert (reg.refinement is not None) == (refine > 0)
    assert SeparableTransform.of(reg.transform, reg.grid, None, torch.device("cpu")) is not None
    path = tmp_path / "transform.h5"
    sitk.WriteTransform(reg.itk_transform(), str(path))
    itk = sitk.ReadTransform(str(path))
    grid = Grid.from_image(fixed)
    assert np.abs(sitk.GetArrayFromImage(reg.displacement) - _itk_displacement(itk, grid)).max() < DISPLACEMENT_TOLERANCE_MM
    resampled = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed, itk, sitk.sitkLinear, 0.0))
    near = _near_the_border(itk, grid, moving)
    span = float(np.ptp(sitk.GetArrayViewFromImage(moving)))
    assert np.abs(sitk.GetArrayFromImage(reg.warped) - resampled)[~near].max() < WARPED_TOLERANCE * span
    # det J: analytic against the engine's central differences of the same displacement
    analytic = sitk.GetArrayFromImage(reg.jacobian).astype(np.float64)
    u = torch.from_numpy(sitk.GetArrayFromImage(reg.displacement)).movedim(-1, 0)[None].double()
    central = jacobian_determinant(u, grid)[0].numpy()
    gap = np.abs(analytic - central)
    assert gap.mean() < MEAN_BOUND and np.quantile(gap, 0.999) < P999_BOUND


def _same_cell(separable: SeparableTransform | None) -> np.ndarray:
    """Fixed voxels ``[D, H, W]`` whose central-difference stencil (one voxel either way, one-sided at the border) lies
    in their own segment of the field along every axis."""
    assert separable is not None
    masks = []
    for axis in separable.axes:
        segment = axis.segment.numpy()
        before = np.r_[segment[:1], segment[:-1]]
        after = np.r_[segment[1:], segment[-1:]]
        masks.append((before == segment) & (after == segment))
    mi, mj, mk = masks
    return mk[:, None, None] & mj[None, :, None] & mi[None, None, :]


def test_analytic_det_j_is_the_derivative_of_the_transform_and_equals_central_differences_inside_cells() -> None:
    fixed, moving_grid, _, transform = _constructed()
    separable = SeparableTransform.of(transform, fixed, moving_grid, torch.device("cpu"))
    assert separable is not None
    det = separable.expand_det(separable.tables(0, fixed.shape[0], det=True).det).double()
    # the transform's own derivative: steps of 1e-5 voxel in double precision towards larger field index (the cell the
    # analytic det J takes at a node; backwards along the flipped axis)
    points = fixed.physical_points(dtype=torch.float64)[None]
    basis = torch.from_numpy(fixed.index_to_physical()[:3, :3])
    steps = [1e-5 * math.copysign(1.0, axis.slope) for axis in separable.axes]
    columns = [(transform(points + basis[:, a] * h) - transform(points))[0] / h for a, h in enumerate(steps)]
    derivative = torch.linalg.det(torch.stack(columns, dim=-1)) / torch.linalg.det(basis)
    assert float((det - derivative).abs().max()) < 1e-5
    u = (transform(points) - points).movedim(-1, 1)
    central = jacobian_determinant(u, fixed)[0]
    same = torch.from_numpy(_same_cell(separable))
    assert bool(same.any()) and float((det - central)[same].abs().max()) < SAME_CELL_TOLERANCE
    # through full_resolution: the statistics and the map come from the analytic det J, slab by slab as at once
    out = full_resolution(transform, fixed, fixed, torch.device("cpu"), jacobian=True, statistics=True, chunk_voxels=57 * 43)
    assert np.abs(sitk.GetArrayFromImage(out.jacobian) - det.numpy()).max() < 1e-5
    assert out.jacobian_std == pytest.approx(float(det.std()), rel=1e-4)


def test_accurate_mode_takes_the_separable_path_on_an_oblique_image(oblique_pair, fresh_stack_file: Path, monkeypatch) -> None:
    """The refinement's one field lives on a grid along the fixed image's axes (:func:`dlir.refine.displacement_grid`),
    so full resolution evaluates it separably on an oblique fixed image too."""
    fixed, moving = oblique_pair
    taken: list[bool] = []
    of = SeparableTransform.of

    def spy(*args, **kwargs):
        separable = of(*args, **kwargs)
        taken.append(separable is not None)
        return separable

    monkeypatch.setattr(fullres.SeparableTransform, "of", spy)
    result = register(fixed, moving, load_stack(fresh_stack_file), device="cpu", refine=2, outputs=("jacobian",))
    assert result.refinement is not None and taken == [True]
    field = Composite.of(result.transform).split_leading_affine()[1].transforms[0]
    assert isinstance(field, DisplacementField) and np.allclose(field.grid.direction, Grid.from_image(fixed).direction)
