"""ANTs SyN as the second conventional baseline of ``dlir bench``: its direction convention on a known
translation, its outputs scored end to end in quick mode, and the install hint when ``antspyx`` is missing."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dlir.cli import main
from dlir.evaluation.ants import AntsMissingError, AntsSettings, ants_available, require_ants
from dlir.evaluation.bench import ANTS, ants_settings
from dlir.evaluation.elastix import elastix_available

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"
NO_ANTS = "antspyx is not installed (pip install antspyx==0.6.3)"


def _texture(shape: tuple[int, int, int], seed: int = 3) -> np.ndarray:
    """Smoothed noise (sigma 3 voxels, float32, z y x) inside a box with soft edges, zero near the border."""
    noise = sitk.GetImageFromArray(np.random.default_rng(seed).uniform(0, 100, shape).astype(np.float32))
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, 3.0))
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    window = np.clip(10 * (0.8 - np.maximum(np.maximum(abs(z), abs(y)), abs(x))), 0, 1)
    return (smooth - smooth.min()) * window


def test_a_known_translation_gives_that_displacement() -> None:
    """moving(x + s) = fixed(x): fixed points map to moving points by +s, so u is about s (LPS mm), on an oblique grid."""
    pytest.importorskip("ants", reason=NO_ANTS)
    from dlir.evaluation.ants import register_ants

    fixed = sitk.GetImageFromArray(_texture((32, 48, 48)))
    fixed.SetSpacing((2.0, 2.0, 3.0))
    fixed.SetOrigin((-30.0, 12.0, 5.0))
    angle = np.deg2rad(15)
    fixed.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1))
    shift = np.array([4.0, -3.0, 2.5])
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(3, (-shift).tolist()), sitk.sitkLinear, 0.0)

    result = register_ants(fixed, moving, settings=AntsSettings.quick(threads=2))
    u = sitk.GetArrayFromImage(result.displacement)
    assert u.shape == (32, 48, 48, 3) and u.dtype == np.float32
    inside = sitk.GetArrayFromImage(fixed) > 1  # where the texture constrains the registration
    np.testing.assert_allclose(u[inside].mean(axis=0), shift, atol=0.5)
    # the transform file's transform is the same map
    point = fixed.TransformIndexToPhysicalPoint((20, 30, 12))
    np.testing.assert_allclose(np.subtract(result.transform.TransformPoint(point), point), u[12, 30, 20], atol=1e-3)


@pytest.mark.skipif(not elastix_available(), reason="itk-elastix is not installed (pip install itk-elastix==0.25.4)")
def test_bench_quick_scores_ants(fresh_stack_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ants", reason=NO_ANTS)
    out = tmp_path / "bench"
    argv = ["bench", "--quick", "--stack", str(fresh_stack_file), "--sizes", "--repeats", "1", "1", "--no-plots", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("| sample | ANTs SyN |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[2]) > 0.8 and cells[-1].endswith("x")  # Dice, speed vs elastix
    with (out / "metrics.csv").open(encoding="utf-8") as f:
        dice = {r["label"]: float(r["dice"]) for r in csv.DictReader(f) if r["method"] == ANTS}
    assert set(dice) == {"1", "2", "3", "4", "all"} and min(dice.values()) > 0.8
    assert "ANTs SyN: ANTsPy registration type SyN" in (out / "bench.md").read_text(encoding="utf-8")

    # transform.h5 (ANTs' composite, fixed -> moving) reproduces ANTs' own warped image and labels
    run = out / "runs" / "sample" / ANTS
    transform = sitk.ReadTransform(str(run / "transform.h5"))
    warped = sitk.ReadImage(str(run / "warped.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(SAMPLE / "sample_moving.nii.gz"), sitk.sitkFloat32)
    again = sitk.GetArrayFromImage(sitk.Resample(moving, warped, transform, sitk.sitkLinear, 0.0))
    assert np.abs(again - sitk.GetArrayFromImage(warped)).max() < 0.01 * float(again.max())
    labels = sitk.ReadImage(str(run / "labels.nii.gz"))
    moving_labels = sitk.ReadImage(str(SAMPLE / "sample_moving_labels.nii.gz"))
    through = sitk.Resample(moving_labels, labels, transform, sitk.sitkNearestNeighbor, 0)
    assert np.mean(sitk.GetArrayFromImage(through) == sitk.GetArrayFromImage(labels)) > 0.999


def test_without_antspyx_bench_skips_ants_and_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ants", None)  # as if antspyx were not installed
    assert not ants_available()
    with pytest.raises(AntsMissingError, match="pip install antspyx==0.6.3"):
        require_ants()
    lines: list[str] = []
    assert ants_settings(quick=True, threads=2, log=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("ANTs SyN skipped") and "pip install antspyx==0.6.3" in lines[0]
