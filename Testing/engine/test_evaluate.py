"""``dlir evaluate`` on a real development pair: every report file is written, and the
before-registration numbers equal an independent SimpleITK + NumPy computation."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dlir.cli import main
from dlir.evaluation.evaluate import stack_chooser
from dlir.pairs import Pair, read_pairs
from testdata import SHARED_DATA

PAIR = SHARED_DATA / "pairs" / "brain1_aniso_oblique"
pytestmark = pytest.mark.skipif(not PAIR.is_dir(), reason="../shared/data (development data) is absent")


@pytest.fixture(scope="module")
def report(coarse_stack_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluate")
    args = ["evaluate", "--pairs", str(PAIR), "--stack", str(coarse_stack_file), "--refine", "5", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    return out


def _rows(report: Path) -> list[dict[str, str]]:
    with (report / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_writes_the_tables_and_plots(report: Path) -> None:
    for name in ("metrics.csv", "timings.csv", "summary.md", "dice_boxplot.png", "tre.png", "jacobian_histograms.png",
                 "panels/brain1_aniso_oblique_dlir+refine5.png"):
        path = report / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (report / "summary.md").read_text(encoding="utf-8")
    assert "| Before registration |" in summary and "| DLIR + refine 5 |" in summary
    methods = {(r["method"], r["label"]) for r in _rows(report)}
    assert methods == {("identity", "1"), ("identity", "all"), ("dlir+refine5", "1"), ("dlir+refine5", "all")}
    with (report / "timings.csv").open(newline="") as f:
        steps = {r["step"] for r in csv.DictReader(f)}
    assert {"read", "preprocess", "refine (5 steps)", "warp", "jacobian"} <= steps


def test_identity_numbers_match_an_independent_simpleitk_computation(report: Path) -> None:
    fixed = sitk.ReadImage(str(PAIR / "fixed.nii.gz"))
    fixed_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(PAIR / "fixed_labels.nii.gz")))
    moving = sitk.ReadImage(str(PAIR / "moving_labels.nii.gz"))
    resampled = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    moving_labels = sitk.GetArrayFromImage(resampled)
    rows = {(r["method"], r["label"]): r for r in _rows(report)}
    for label in (int(v) for v in np.unique(fixed_labels) if v != 0):
        a, b = fixed_labels == label, moving_labels == label
        expected = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
        assert float(rows[("identity", str(label))]["dice"]) == pytest.approx(expected, abs=1e-5)

    with (PAIR / "landmarks.csv").open(newline="") as f:
        points = [[float(r[f"{side}_{axis}"]) for side in ("fixed", "moving") for axis in "xyz"] for r in csv.DictReader(f)]
    distances = np.linalg.norm(np.asarray(points)[:, :3] - np.asarray(points)[:, 3:], axis=1)
    identity = rows[("identity", "all")]
    assert float(identity["tre_mean"]) == pytest.approx(distances.mean(), rel=1e-5)
    assert float(identity["tre_max"]) == pytest.approx(distances.max(), rel=1e-5)

    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(PAIR / "gt_displacement.nii.gz")))
    assert float(identity["gt_error_mean"]) == pytest.approx(np.linalg.norm(truth, axis=-1).mean(), rel=1e-5)
    assert identity["folding_fraction"] == "" and identity["time_s"] == ""


def test_registered_rows_hold_every_number(report: Path) -> None:
    row = {(r["method"], r["label"]): r for r in _rows(report)}[("dlir+refine5", "all")]
    for column in ("dice", "hd", "hd95", "asd", "tre_mean", "tre_median", "tre_max", "gt_error_mean", "gt_error_max",
                   "gt_error_mask_mean", "folding_fraction", "jacobian_std", "time_s"):
        assert np.isfinite(float(row[column])), column
    assert 0 <= float(row["folding_fraction"]) <= 1 and float(row["time_s"]) > 0


def test_pairs_from_a_csv_equal_the_pair_folder(tmp_path: Path) -> None:
    columns = ["id", "fixed", "moving", "fixed_labels", "moving_labels", "landmarks", "gt_displacement"]
    names = ["fixed.nii.gz", "moving.nii.gz", "fixed_labels.nii.gz", "moving_labels.nii.gz", "landmarks.csv",
             "gt_displacement.nii.gz"]
    row = ["brain1_aniso_oblique", *(str(PAIR / n) for n in names)]
    (tmp_path / "pairs.csv").write_text(",".join(columns) + "\n" + ",".join(row) + "\n", encoding="utf-8")
    assert read_pairs(tmp_path / "pairs.csv") == read_pairs(PAIR)
    assert read_pairs(PAIR.parent)[0] == read_pairs(PAIR)[0]
    expected = Pair("brain1_aniso_oblique", *(PAIR / n for n in names[:4]), None, PAIR / names[4], PAIR / names[5])
    assert read_pairs(PAIR)[0] == expected


def test_stacks_are_chosen_by_pair_id(coarse_stack_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    other.write_bytes(coarse_stack_file.read_bytes())
    choose = stack_chooser([f"lung*={other}", str(coarse_stack_file)])
    assert choose("lung1_aniso") == other and choose("mni_iso2mm") == coarse_stack_file
