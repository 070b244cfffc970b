"""``dlir bench``: end to end in quick mode when itk-elastix is installed, a clear install hint
when it is not, and the pieces (cubic resampling, the tables) on known inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dlir.cli import main
from dlir.evaluation.bench import ELASTIX, ScalingRow, comparison_table, resample_cubic, scaling_table
from dlir.evaluation.elastix import ElastixMissingError, elastix_available, require_elastix
from dlir.evaluation.measure import Measurement
from dlir.evaluation.scores import IDENTITY, Score


def test_bench_says_how_to_install_elastix(
    coarse_stack_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "itk", None)  # as if itk-elastix were not installed
    assert not elastix_available()
    with pytest.raises(ElastixMissingError):
        require_elastix()
    assert main(["bench", "--quick", "--stack", str(coarse_stack_file), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install itk-elastix==0.25.4" in err


@pytest.mark.skipif(not elastix_available(), reason="itk-elastix is not installed (pip install itk-elastix==0.25.4)")
def test_bench_quick_runs_end_to_end(coarse_stack_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--stack", str(coarse_stack_file), "--sizes", "24", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for row in ("| sample | Before registration |", "| sample | DLIR |", "| sample | elastix |", "| 24³", "| 32³"):
        assert row in printed, row
    for name in ("bench.md", "summary.md", "metrics.csv", "timings.csv", "dice_boxplot.png", "panels/sample_elastix.png",
                 "panels/sample_dlir.png", "runs/sample/elastix/measurement.json"):
        assert (out / name).is_file(), name

    # elastix's labels (transformix, nearest neighbour) equal the moving labels resampled through the
    # displacement field it is scored with: the field is elastix's own transform, fixed -> moving
    run = out / "runs" / "sample" / ELASTIX
    field = sitk.DisplacementFieldTransform(sitk.ReadTransform(str(run / "transform.h5")))
    labels = sitk.ReadImage(str(run / "labels.nii.gz"))
    sample = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"
    moving_labels = sitk.ReadImage(str(sample / "sample_moving_labels.nii.gz"))
    through_field = sitk.Resample(moving_labels, labels, field, sitk.sitkNearestNeighbor, 0)
    agree = np.mean(sitk.GetArrayFromImage(through_field) == sitk.GetArrayFromImage(labels))
    assert agree > 0.999


def test_bench_adds_elastix_with_mutual_information(coarse_stack_file: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``--mutual-information``: elastix also runs with Mattes mutual information (the baseline for different
    contrasts), a row of its own; ``--similarity`` reaches DLIR's runs; ``--no-ants`` leaves ANTs SyN out."""
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--mutual-information", "--similarity", "same", "--stack", str(coarse_stack_file),
                 "--sizes", "--no-plots", "--repeats", "1", "1", "--no-ants", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| sample | elastix |" in printed and "| sample | elastix MI |" in printed
    assert "ANTs" not in printed and not (out / "runs" / "sample" / "ants").exists()
    report = (out / "bench.md").read_text(encoding="utf-8")
    assert "elastix MI: affine + B-spline (final grid 10 mm), AdvancedMattesMutualInformation" in report
    assert "similarity same" in report
    result = json.loads((out / "runs" / "sample" / "dlir" / "result.json").read_text(encoding="utf-8"))
    assert result["contrast"]["asked"] == "same"


def test_cubic_resampling_keeps_the_physical_box() -> None:
    image = sitk.Image([10, 20, 5], sitk.sitkFloat32)
    image.SetSpacing([2.0, 1.0, 6.0])
    image.SetOrigin([5.0, -3.0, 7.0])
    angle = np.deg2rad(20)
    image.SetDirection([np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1])
    cubic = resample_cubic(image, 16, sitk.sitkLinear)
    assert cubic.GetSize() == (16, 16, 16) and cubic.GetDirection() == image.GetDirection()

    def box(im: sitk.Image) -> np.ndarray:  # physical positions of the outer voxel edges
        size = np.asarray(im.GetSize())
        return np.array([im.TransformContinuousIndexToPhysicalPoint(list(c)) for c in (-0.5 * np.ones(3), size - 0.5)])

    np.testing.assert_allclose(box(cubic), box(image), atol=1e-9)


def _score(pair: str, method: str, dice: float) -> Score:
    return Score(pair, method, {1: {"dice": dice, "hd": 5.0, "hd95": 4.0, "asd": 1.0}}, np.array([2.0, 4.0]), {}, 0.01, 0.01, 0.2,
                 None, {}, 1.0)


def _measurement(seconds: float) -> Measurement:
    return Measurement("x", 0.0, seconds + 1, seconds, {"read": 0.1, "write": 0.2}, 300.0, 500.0)


def test_tables_report_the_speed_ratio() -> None:
    scores = [_score(p, m, d) for p in ("a", "b") for m, d in ((IDENTITY, 0.5), ("dlir", 0.8), (ELASTIX, 0.9))]
    measurements = {("a", "dlir"): _measurement(0.5), ("a", ELASTIX): _measurement(20.0),
                    ("b", "dlir"): _measurement(1.5), ("b", ELASTIX): _measurement(40.0)}
    lines = comparison_table(scores, measurements)
    assert "| a | DLIR | 0.800 | 4.00 | 3.00 | 1.000 | 0.200 | 0.50 | 0.20 | 1.50 | 500 | 40.0x |" in lines
    mean = next(line for line in lines if line.startswith("| mean of 2 | DLIR |"))
    assert mean.endswith("| 1.00 | 0.70 | 2.00 | 500 | 30.0x |")
    assert "| a | Before registration | 0.500 | 4.00 | 3.00 | – | – | – | – | – | – | – |" in lines
    assert all(line.count("|") == lines[0].count("|") for line in lines)

    rows = [ScalingRow(64, "dlir", 0.5, 400.0, 300.0), ScalingRow(64, ELASTIX, 10.0, 900.0, 800.0)]
    table = scaling_table(rows)
    assert table[2] == "| 64³ = 0.26 M | 0.50 | 400 | 10.00 | 900 | 20.0x |"
