"""Real data from ../shared/data end to end.

1. Every development pair (``pairs/*``) goes through the cohort command ``dlir register --pairs``
   with a freshly initialised stack: all five outputs per pair and a summary.  This tests the
   plumbing, not accuracy; but untrained networks are exactly the identity (their output layers
   start at zero), so the result must be exactly the initial centre alignment, which is checked
   against SimpleITK on every pair (oblique, anisotropic, CT and MR, different fixed/moving grids).
2. The real inter-subject pair ``real_pairs/brain_2to1``: the head masks overlap after the centre
   alignment and better after the capture search (the default), also when the two scans' coordinates are far
   apart (as between scanner sessions).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dlir.alignment import initial_alignment
from dlir.geometry import Grid
from dlir.pipeline import PreparedImage
from dlir.recipe import IntensitySpec
from dlir.register import register
from dlir.stack import load_stack

RunDlir = Callable[..., subprocess.CompletedProcess]
OUTPUTS = ("warped.nii.gz", "transform.h5", "jacobian.nii.gz", "labels.nii.gz", "result.json")


def dice(a: sitk.Image, b: sitk.Image) -> float:
    """Dice of the non-zero voxels of two masks on the same grid (computed here, not with dlir.metrics)."""
    x, y = sitk.GetArrayViewFromImage(a) > 0, sitk.GetArrayViewFromImage(b) > 0
    return float(2 * np.count_nonzero(x & y) / (np.count_nonzero(x) + np.count_nonzero(y)))


def centre_shift(fixed: sitk.Image, moving: sitk.Image) -> np.ndarray:
    """Centre of the moving grid minus centre of the fixed grid (LPS mm), from SimpleITK alone."""
    def centre(image: sitk.Image) -> np.ndarray:
        return np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))

    return centre(moving) - centre(fixed)


# ----------------------------------------------------------------------------------- 1. cohort
@pytest.fixture(scope="module")
def cohort(shared_data: Path, fresh_stack_file: Path, run_dlir: RunDlir, tmp_path_factory: pytest.TempPathFactory):
    pairs = sorted(p for p in (shared_data / "pairs").iterdir() if (p / "fixed.nii.gz").is_file())
    root = tmp_path_factory.mktemp("cohort")
    table = root / "pairs.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "fixed", "moving", "moving_labels", "fixed_labels"])
        for p in pairs:
            files = ("fixed", "moving", "moving_labels", "fixed_labels")
            writer.writerow([p.name, *(p / f"{name}.nii.gz" for name in files)])
    out = root / "out"
    result = run_dlir("register", "--pairs", table, "--stack", fresh_stack_file, "--out", out, "--device", "cpu",
                      "--initial-alignment", "centre", timeout=600)
    return pairs, out, result


def test_every_pair_runs_through_the_cohort_command(cohort) -> None:
    pairs, out, result = cohort
    assert len(pairs) >= 4, [p.name for p in pairs]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{len(pairs)} of {len(pairs)} pairs registered" in result.stdout
    with (out / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [p.name for p in pairs]
    for row in rows:
        assert row["status"] == "ok", row
        assert float(row["folding_fraction"]) == 0.0 and float(row["jacobian_std"]) < 1e-3, row
        assert float(row["total_s"]) > 0
    for p in pairs:
        for name in OUTPUTS:
            assert (out / p.name / name).is_file(), f"{p.name}/{name} missing"
        report = json.loads((out / p.name / "result.json").read_text(encoding="utf-8"))
        assert report["stack"] == "fresh-small" and report["device"] == "cpu"
        steps = {"read", "preprocess", "stage 1/2 (affine)", "stage 2/2 (bspline)", "warp", "jacobian", "write"}
        assert steps <= set(report["timings_s"]), report["timings_s"]
        fixed_labels = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(p / "fixed_labels.nii.gz"))))
        assert sorted(report["dice"]) == sorted(str(v) for v in fixed_labels if v != 0)


def _displacement_on(path: Path, grid: sitk.Image) -> np.ndarray:
    """The transform in a transform file sampled at every voxel of ``grid``: ``[k, j, i, 3]`` LPS mm."""
    field = sitk.TransformToDisplacementField(sitk.ReadTransform(str(path)), sitk.sitkVectorFloat64, grid.GetSize(),
                                              grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection())
    return sitk.GetArrayFromImage(field)


@pytest.mark.parametrize("name", ["brain1_aniso_oblique", "lung1_aniso", "mni_iso2mm", "mni_oblique_aniso"])
def test_fresh_stack_result_is_exactly_the_centre_alignment(cohort, name: str) -> None:
    """Untrained networks: T(x) = x + (moving centre - fixed centre); checked with SimpleITK on the pair's own grids."""
    pairs, out, result = cohort
    assert result.returncode == 0, result.stderr
    pair = next((p for p in pairs if p.name == name), None)
    if pair is None:
        pytest.skip(f"the shared data has no pair {name}")
    folder = out / name
    fixed = sitk.ReadImage(str(pair / "fixed.nii.gz"))
    moving = sitk.ReadImage(str(pair / "moving.nii.gz"), sitk.sitkFloat32)
    shift = centre_shift(fixed, moving)
    expected = sitk.TranslationTransform(3, shift.tolist())

    warped = sitk.ReadImage(str(folder / "warped.nii.gz"))
    assert Grid.from_image(warped).same_as(Grid.from_image(fixed), tol=1e-5)
    ours = sitk.GetArrayFromImage(warped)
    itk = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, expected, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    span = float(sitk.GetArrayViewFromImage(moving).max() - sitk.GetArrayViewFromImage(moving).min())
    error = float(np.abs(ours - itk).max()) / span
    assert error < 1e-3, f"{name}: warped differs from the centre-aligned moving image by {error:.2e} of the range"

    field = _displacement_on(folder / "transform.h5", fixed)
    assert np.abs(field - shift).max() < 1e-3, f"{name}: displacement is not the centre shift {shift}"
    jacobian = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "jacobian.nii.gz")))
    assert np.abs(jacobian - 1).max() < 1e-4

    moving_labels = sitk.ReadImage(str(pair / "moving_labels.nii.gz"))
    labels = sitk.ReadImage(str(folder / "labels.nii.gz"))
    assert labels.GetPixelID() == moving_labels.GetPixelID()
    itk_labels = sitk.GetArrayFromImage(sitk.Resample(moving_labels, fixed, expected, sitk.sitkNearestNeighbor, 0))
    assert (sitk.GetArrayFromImage(labels) == itk_labels).mean() >= 0.999
    report = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    if np.abs(shift).max() < 1e-6:  # same grid: nothing moves, so Dice after = Dice before
        assert all(abs(d["after"] - d["before"]) < 1e-9 for d in report["dice"].values()), report["dice"]


# ----------------------------------------------------------------------------------- 2. real pair
def real_pair_files(shared_data: Path) -> dict[str, Path]:
    """The fixed and moving images and head masks of brain_2to1, as its README names them."""
    folder = shared_data / "real_pairs" / "brain_2to1"
    readme = (folder / "README.md").read_text(encoding="utf-8")
    found = {}
    for role in ("fixed", "moving"):
        match = re.search(rf"^{role}\s*=\s*`([^`]+)`\s*\(labels:\s*`([^`]+)`", readme, re.MULTILINE)
        assert match, f"the README of {folder} does not name the {role} image"
        image = (folder / match.group(1)).resolve()
        found[role], found[f"{role}_mask"] = image, image.parent / match.group(2)
    for path in found.values():
        assert path.is_file(), path
    return found


#: a plausible difference between two scanner sessions' coordinates (table position, another site)
SESSION_SHIFT = (35.0, -60.0, 210.0)


@pytest.mark.parametrize("shift", [(0.0, 0.0, 0.0), SESSION_SHIFT], ids=["stored coordinates", "another session"])
def test_real_pair_head_masks_overlap_after_centre_alignment(shared_data: Path, fresh_stack_file: Path, shift) -> None:
    files = real_pair_files(shared_data)
    fixed, fixed_mask = sitk.ReadImage(str(files["fixed"])), sitk.ReadImage(str(files["fixed_mask"]))
    moving, moving_mask = sitk.ReadImage(str(files["moving"])), sitk.ReadImage(str(files["moving_mask"]))
    for image in (moving, moving_mask):  # the moving scan's coordinates, as another session could have them
        image.SetOrigin(tuple(o + s for o, s in zip(image.GetOrigin(), shift)))

    before = dice(fixed_mask, sitk.Resample(moving_mask, fixed_mask, sitk.Transform(), sitk.sitkNearestNeighbor, 0))

    # the engine's initial alignment, applied with SimpleITK
    spec = IntensitySpec()
    fixed_p = PreparedImage.from_array(sitk.GetArrayViewFromImage(fixed), Grid.from_image(fixed), spec)
    moving_p = PreparedImage.from_array(sitk.GetArrayViewFromImage(moving), Grid.from_image(moving), spec)
    overlap, offsets = {}, {}
    for mode in ("centre", "com", "search"):
        t0 = initial_alignment(mode, fixed_p, moving_p)
        if mode != "search":
            assert torch.equal(t0.matrix[0], torch.eye(3)), "the initial alignment is a pure translation"
        offsets[mode] = t0.offset[0].double().numpy()
        affine = sitk.AffineTransform(t0.matrix[0].double().numpy().ravel().tolist(), offsets[mode].tolist())
        aligned = sitk.Resample(moving_mask, fixed_mask, affine, sitk.sitkNearestNeighbor, 0)
        overlap[mode] = dice(fixed_mask, aligned)
    expected = centre_shift(fixed, moving)
    assert np.allclose(offsets["centre"], expected, atol=1e-3), f"centre alignment {offsets['centre']}, expected {expected}"

    # and through register() with a fresh stack, the head mask as the moving labels
    result = register(fixed, moving, load_stack(fresh_stack_file), moving_labels=moving_mask, device="cpu",
                      initial_alignment="centre")
    registered = dice(fixed_mask, result.warped_labels)

    numbers = (f"head-mask Dice: before {before:.3f}, centre alignment {overlap['centre']:.3f}, "
               f"register() {registered:.3f}, centre of mass {overlap['com']:.3f}, search {overlap['search']:.3f}; "
               f"shift {shift} mm")
    print(numbers)
    assert abs(registered - overlap["centre"]) < 0.005, numbers
    # the centre alignment does not depend on where the scanner put the coordinates (measured: 0.869)
    assert overlap["centre"] > 0.8 and overlap["com"] > 0.85, numbers
    # the capture search (an affine from several starts) beats both (measured: 0.953 in both coordinate sets)
    assert overlap["search"] > 0.94, numbers
    if shift == SESSION_SHIFT:
        # measured: 0.000 before; the scans do not even touch in physical space
        assert before < 0.3 and overlap["centre"] > before + 0.5, numbers
    else:
        # in their stored coordinates these two scans already overlap (measured 0.892): the
        # alignment must not lose much of that (measured 0.869 with centres, 0.906 with centres of mass)
        assert before > 0.8 and overlap["centre"] > before - 0.05, numbers


def test_accurate_mode_registers_two_patients_plausibly(shared_data: Path) -> None:
    """The real inter-subject pair in accurate mode with the bundled brain-mri: the head masks match as elastix's do
    (elastix with the paper's settings: 0.982, folding 0.12 %, std det J 0.39 in the head), without a fold, with
    det J as plausible (measured: 0.981, no fold, std 0.38)."""
    files = real_pair_files(shared_data)
    fixed, fixed_mask = sitk.ReadImage(str(files["fixed"])), sitk.ReadImage(str(files["fixed_mask"]))
    moving, moving_mask = sitk.ReadImage(str(files["moving"])), sitk.ReadImage(str(files["moving_mask"]))
    result = register(fixed, moving, load_stack("brain-mri"), moving_labels=moving_mask, refine="auto", device="cpu")
    head = sitk.GetArrayViewFromImage(fixed_mask) > 0
    det = sitk.GetArrayFromImage(result.jacobian)[head]
    score = dice(fixed_mask, result.warped_labels)
    numbers = f"head Dice {score:.3f}, folded {int((det <= 0).sum())} voxels, std det J {det.std():.3f} in the head"
    assert score > 0.97 and int((det <= 0).sum()) == 0 and det.std() < 0.5, numbers
