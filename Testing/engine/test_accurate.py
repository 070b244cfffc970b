"""Accurate mode (``refine="auto"``, ``dlir register --refine auto``): instance optimisation of the whole
transform, coarse to fine, to convergence, without folding.

(a) On a development pair (real brain MR, oblique, 6.5 mm slices) with the bundled stack: Dice of the
    propagated label above the one-shot result, no folded voxel, and ``transform.h5`` reproduces
    ``warped``, ``labels`` and ``jacobian`` in SimpleITK.
(b) A large known deformation that compresses parts of the image to a third of their volume
    (folding-prone: an optimiser without a guard folds there): det J > 0 everywhere in the mask.
(c) Convergence stopping: an already aligned pair stops each level after a few steps; ``refine=N``
    runs exactly N steps (finest level only); a known smooth field is recovered to a fraction of a voxel
    (see also test_recovery.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dlir.errors import InputError
from dlir.geometry import Grid, image_to_tensor
from dlir.refine import RefineSettings
from dlir.register import register
from dlir.transforms import DisplacementField, warp
from testdata import identity_bspline_stack

PAIR = "pairs/brain1_aniso_oblique"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def test_accurate_mode_beats_one_shot_without_folding_and_itk_reproduces_it(shared_data: Path, run_dlir, tmp_path: Path) -> None:
    pair = shared_data / PAIR
    results = {}
    for mode in ("0", "auto"):
        out = tmp_path / mode
        run = run_dlir("register", pair / "fixed.nii.gz", pair / "moving.nii.gz", "--stack", "brain-mri", "--out", out,
                       "--moving-labels", pair / "moving_labels.nii.gz", "--fixed-labels", pair / "fixed_labels.nii.gz",
                       "--refine", mode, "--device", "cpu")
        assert run.returncode == 0, run.stderr
        results[mode] = json.loads((out / "result.json").read_text(encoding="utf-8"))
    fixed_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(pair / "fixed_labels.nii.gz"))) > 0
    scores = {mode: dice(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / mode / "labels.nii.gz"))) > 0, fixed_labels)
              for mode in results}
    assert scores["auto"] > scores["0"] + 0.05, scores  # measured 0.74 -> 0.99
    accurate = results["auto"]
    assert accurate["folding_fraction"] == 0.0
    assert len(accurate["refinement"]["steps"]) == 3 and all(n >= RefineSettings().min_steps for n in accurate["refinement"]["steps"])

    out = tmp_path / "auto"
    fixed = sitk.ReadImage(str(pair / "fixed.nii.gz"))
    moving = sitk.ReadImage(str(pair / "moving.nii.gz"), sitk.sitkFloat32)
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    assert (out / "transform.h5").stat().st_size < 5e6  # one affine and one 6 mm field
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz"), sitk.sitkFloat32))
    itk = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    span = float(np.ptp(sitk.GetArrayViewFromImage(moving)))
    assert np.abs(np.round(itk) - ours).max() / span < 2e-3  # warped is written in the moving image's integer type
    labels = sitk.ReadImage(str(pair / "moving_labels.nii.gz"))
    itk_labels = sitk.GetArrayFromImage(sitk.Resample(labels, fixed, transform, sitk.sitkNearestNeighbor, 0))
    assert float((itk_labels == sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz")))).mean()) >= 0.999
    # det J of ITK's transform, its own derivative: steps of 1e-3 voxel along the fixed axes (SimpleITK's Jacobian
    # filter ignores the oblique direction).  The engine's det J is the transform's analytic derivative (its field
    # lives on a grid along the fixed image, dlir.separable), which central differences over 6.5 mm slices on a 6 mm
    # field would only approximate.
    basis = np.asarray(fixed.GetDirection()).reshape(3, 3) @ np.diag(fixed.GetSpacing())

    def displacement(shift: np.ndarray) -> np.ndarray:
        field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, fixed.GetSize(),
                                                  tuple(np.asarray(fixed.GetOrigin()) + shift), fixed.GetSpacing(),
                                                  fixed.GetDirection())
        return sitk.GetArrayFromImage(field)

    step = 1e-3
    at_voxels = displacement(np.zeros(3))
    columns = [basis[:, a] + (displacement(step * basis[:, a]) - at_voxels) / step for a in range(3)]
    itk_jacobian = np.linalg.det(np.stack(columns, axis=-1)) / np.linalg.det(basis)
    our_jacobian = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
    assert np.abs(itk_jacobian - our_jacobian).max() < 1e-5  # measured 2.5e-7


def test_a_folding_prone_deformation_stays_invertible(template_4mm: sitk.Image) -> None:
    """fixed(x) = moving(x + u(x)) with u a strong swirl-and-squeeze (det J of the truth from 0.3 to 2.6)."""
    grid = Grid.from_image(template_4mm)
    q = grid.physical_points(dtype=torch.float64) - torch.tensor(grid.centre())
    a = 9.0
    truth = torch.stack([a * torch.sin(q[..., 1] / 9), a * torch.sin(q[..., 2] / 9), a * torch.sin(q[..., 0] / 9)]).float()[None]
    fixed_t = warp(image_to_tensor(template_4mm), grid, DisplacementField(truth, grid), grid)
    fixed = sitk.GetImageFromArray(fixed_t[0, 0].numpy())
    fixed.CopyInformation(template_4mm)
    mask = sitk.Cast(fixed > 40, sitk.sitkUInt8)

    result = register(fixed, template_4mm, identity_bspline_stack(), fixed_mask=mask, refine="auto", device="cpu")
    jacobian = sitk.GetArrayFromImage(result.jacobian)[sitk.GetArrayFromImage(mask) > 0]
    assert result.folding_fraction == 0.0
    assert jacobian.min() > 0.0, jacobian.min()
    assert result.refinement is not None and sum(result.refinement["steps"]) > 60  # it worked at it, it did not give up


def test_an_aligned_pair_stops_early_and_refine_n_runs_n_steps(template_4mm: sitk.Image) -> None:
    settings = RefineSettings()
    aligned = register(template_4mm, template_4mm, identity_bspline_stack(), refine="auto", device="cpu")
    steps = aligned.refinement["steps"]
    assert len(steps) == len(settings.level_spacings_mm)
    assert all(n < settings.max_steps[k] for k, n in enumerate(steps)), steps  # converged, not capped
    assert sum(steps) <= 3 * (settings.min_steps + 2 * settings.window), steps
    displacement = sitk.GetArrayFromImage(aligned.displacement)
    assert np.abs(displacement).max() < 0.5  # mm: it stayed where it started

    exact = register(template_4mm, template_4mm, identity_bspline_stack(), refine=7, device="cpu")
    assert exact.refinement["steps"] == [7.0]
    assert "refine (7 steps)" in exact.timings


@pytest.mark.parametrize("value", [-1, 2.5, "fast", True])
def test_a_bad_refinement_value_is_one_sentence(template_4mm: sitk.Image, value) -> None:
    with pytest.raises(InputError, match="refinement must be 'auto'"):
        register(template_4mm, template_4mm, identity_bspline_stack(), refine=value, device="cpu")
