"""Smoke test of the clinical-size benchmark (``Testing/benchmarks/clinical.py``): one tiny CT-shaped pair
in ``--quick`` mode (a few elastix iterations), all three tables printed; the pieces (grid shapes,
the known deformation, the cache) on their own.  Not numbers: the benchmark is run by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dlir.evaluation.elastix import INSTALL_HINT, elastix_available

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "clinical.py"


@pytest.fixture(scope="module")
def clinical():
    spec = importlib.util.spec_from_file_location("clinical_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["clinical_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("clinical_bench", None)


def test_grid_shapes(clinical) -> None:
    assert clinical.ct_shape(52) == clinical.ct_shape(52.4) == (512, 512, 200)
    for megavoxels in (1, 5, 20, 80):
        nx, ny, nz = clinical.ct_shape(megavoxels)
        assert nx == ny and abs(nx * ny * nz / 1e6 - megavoxels) / megavoxels < 0.03
        assert abs(nz / nx - 200 / 512) < 0.01


def test_the_pair_is_made_once_with_a_known_smooth_deformation(clinical, shared_data: Path, tmp_path: Path) -> None:
    pair = clinical.make_ct_pair(shared_data, (40, 40, 16), tmp_path, log=lambda _: None)
    fixed, moving = (sitk.ReadImage(str(pair.path(n))) for n in ("fixed", "moving"))
    assert fixed.GetPixelID() == moving.GetPixelID() == sitk.sitkInt16 and fixed.GetSize() == (40, 40, 16)
    ct = sitk.ReadImage(str(shared_data / "chest_ct_lung1" / "ct.nii.gz"))
    box = lambda im: np.asarray(im.GetSize()) * np.asarray(im.GetSpacing())  # noqa: E731
    np.testing.assert_allclose(box(fixed), box(ct), rtol=1e-6)  # the same physical box (NIfTI: float32 spacing)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(pair.path("moving_labels"))))
    assert set(np.unique(labels)) == {0, 1, 2}  # the lungs only
    before = clinical.lung_dice(pair.path("fixed_labels"), pair.path("moving_labels"))
    assert 0.6 < min(before.values()) < 0.99  # moved, not destroyed
    # the deformation is smooth and folds nowhere
    reference = clinical.resample_box(sitk.Cast(ct, sitk.sitkFloat32), (40, 40, 16), sitk.sitkLinear, sitk.sitkFloat32, 0)
    field = sitk.TransformToDisplacementField(clinical.known_deformation(ct), sitk.sitkVectorFloat64, reference.GetSize(),
                                              reference.GetOrigin(), reference.GetSpacing(), reference.GetDirection())
    det = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    assert 0.5 < det.min() and det.max() < 1.5
    # made once: a second call reuses the files
    stamp = pair.path("moving").stat().st_mtime_ns
    again = clinical.make_ct_pair(shared_data, (40, 40, 16), tmp_path, log=lambda _: pytest.fail("remade"))
    assert again.path("moving").stat().st_mtime_ns == stamp and again.spacing == pair.spacing
    assert json.loads((pair.folder / "pair.json").read_text(encoding="utf-8"))["recipe"]["seed"] == clinical.SEED


@pytest.mark.skipif(not elastix_available(), reason=f"itk-elastix is not installed: {INSTALL_HINT}")
def test_quick_run_prints_the_three_tables(clinical, shared_data: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "clinical"
    assert clinical.main(["--quick", "--sizes", "0.02", "--data", str(shared_data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for row in ("## The CT pair", "| before registration |", "| DLIR | ", "| elastix | ", "## Scaling", "| 37x37x14 | 0.019 |",
                "## Cohort", "| all 1, sum |", "Per-pair speed"):
        assert row in printed, row
    assert (out / "clinical.md").read_text(encoding="utf-8").strip() == printed.strip()
    for method in ("dlir", "elastix"):
        for name in ("transform.h5", "warped.nii.gz", "jacobian.nii.gz", "labels.nii.gz", "measurement.json"):
            assert (out / "runs" / "37x37x14" / method / name).is_file(), (method, name)
    assert (out / "runs" / "cohort" / "summary.csv").is_file()


def test_without_elastix_it_says_how_to_install_it(clinical, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(clinical, "elastix_available", lambda: False)
    assert clinical.main(["--quick", "--out", str(tmp_path)]) == 2
    assert "pip install itk-elastix==0.25.4" in capsys.readouterr().err
