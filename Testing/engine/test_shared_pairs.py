"""The development pairs of ../shared/data run end to end through `dlir register` (plumbing, with a
freshly initialised stack), and the real inter-subject pair overlaps after the centre alignment."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dlir.metrics import dice
from dlir.recipe import Recipe, StageSpec
from dlir.register import register
from dlir.stack import Manifest, build_stack, save_stack

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")


def fresh_stack():
    recipe = Recipe(stages=(
        StageSpec("affine", spacing_mm=(8.0, 8.0, 8.0), depth=3, channels=8),
        StageSpec("bspline", spacing_mm=(4.0, 4.0, 4.0), control_point_spacing=8, channels=8, alpha=1.0),
    ))
    return build_stack(Manifest("fresh", recipe), seed=0)


def test_every_pair_runs_through_the_cohort_command(tmp_path: Path) -> None:
    pairs = sorted(p for p in (DATA / "pairs").iterdir() if (p / "fixed.nii.gz").is_file())
    assert len(pairs) >= 4
    table = tmp_path / "pairs.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "fixed", "moving", "moving_labels", "fixed_labels"])
        for p in pairs:
            writer.writerow([p.name, p / "fixed.nii.gz", p / "moving.nii.gz", p / "moving_labels.nii.gz", p / "fixed_labels.nii.gz"])
    stack = save_stack(fresh_stack(), tmp_path / "fresh.safetensors")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "dlir", "register", "--pairs", str(table), "--stack", str(stack), "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["id"] for r in rows] == [p.name for p in pairs] and all(r["status"] == "ok" for r in rows)
    for p in pairs:
        for name in ("warped.nii.gz", "transform.h5", "jacobian.nii.gz", "labels.nii.gz", "result.json"):
            assert (out / p.name / name).is_file(), f"{p.name}/{name}"
        warped = sitk.ReadImage(str(out / p.name / "warped.nii.gz"))
        fixed = sitk.ReadImage(str(p / "fixed.nii.gz"))
        assert warped.GetSize() == fixed.GetSize() and np.allclose(warped.GetDirection(), fixed.GetDirection())


def test_initial_alignment_on_the_real_inter_subject_pair() -> None:
    """brain2 -> brain1: far apart in scanner space (here: 250 mm, as between sessions), aligned by the centres.

    In their stored coordinates the two heads already overlap (Dice about 0.89); moving the moving
    image's origin by 250 mm, as another scanner session would, separates them completely, and the
    centre alignment (default) must bring them back; the centre of mass does at least as well as
    the stored coordinates.
    """
    fixed = sitk.ReadImage(str(DATA / "brain_mr_tumor1" / "t1.nii.gz"))
    moving = sitk.ReadImage(str(DATA / "brain_mr_tumor2" / "t1.nii.gz"))
    fixed_mask = sitk.ReadImage(str(DATA / "brain_mr_tumor1" / "head_mask.nii.gz"))
    moving_mask = sitk.ReadImage(str(DATA / "brain_mr_tumor2" / "head_mask.nii.gz"))
    for image in (moving, moving_mask):
        image.SetOrigin(tuple(o + d for o, d in zip(image.GetOrigin(), (250.0, -120.0, 80.0))))
    stack = fresh_stack()  # near-identity networks: what moves the image is the initial alignment
    overlap = {}
    for mode in ("none", "centre", "com"):
        result = register(fixed, moving, stack, moving_labels=moving_mask, device="cpu", initial_alignment=mode)
        overlap[mode] = dice(fixed_mask, result.warped_labels)[1]
    assert overlap["none"] == 0.0, overlap
    assert overlap["centre"] > 0.8 and overlap["com"] > 0.88, overlap
