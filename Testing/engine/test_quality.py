"""Fast mode tells when it failed (issue 25): a one-shot result that folds gets a warning in ``result.json``
(and on the command line), suggesting accurate mode; a good pair gets none.

The folding pair is a real one the bundled ``brain-mri`` meets badly: the (skull-stripped) MNI152 template at
2 mm onto a tumour patient's thick-slice T1 (its networks fold about 4 % of the fixed voxels).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import SimpleITK as sitk

from dlir.quality import FOLDING_WARNING_ABOVE, result_warnings

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "SampleData"


@pytest.fixture(scope="module")
def folding_pair(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(fixed, moving) files: brain1's T1, the MNI template at 2 mm."""
    mni = sitk.ReadImage(str(shared_data / "mni152_2009a_sym" / "t1.nii.gz"), sitk.sitkFloat32)
    size = [int(s * p / 2) for s, p in zip(mni.GetSize(), mni.GetSpacing())]
    moving = tmp_path_factory.mktemp("pair") / "mni_2mm.nii.gz"
    sitk.WriteImage(sitk.Resample(mni, size, sitk.Transform(), sitk.sitkLinear, mni.GetOrigin(), [2.0] * 3,
                                  mni.GetDirection()), str(moving))
    return shared_data / "brain_mr_tumor1" / "t1.nii.gz", moving


def test_a_folding_one_shot_result_warns_in_result_json(folding_pair, run_dlir, tmp_path: Path) -> None:
    fixed, moving = folding_pair
    result = run_dlir("register", fixed, moving, "--stack", "brain-mri", "--out", tmp_path / "out", "--device", "cpu",
                      "--outputs", "jacobian")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "result.json").read_text())
    assert report["folding_fraction"] > FOLDING_WARNING_ABOVE
    folds = [w for w in report["warnings"] if "folds" in w]
    assert folds and "accurate mode" in folds[0], report["warnings"]
    assert "folds" in result.stderr + result.stdout, "the warning reaches the terminal"


def test_a_good_pair_gets_no_warning(run_dlir, tmp_path: Path) -> None:
    result = run_dlir("register", SAMPLE / "sample_fixed.nii.gz", SAMPLE / "sample_moving.nii.gz", "--stack", "brain-mri",
                      "--out", tmp_path / "out", "--device", "cpu", "--outputs", "jacobian")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "result.json").read_text())
    assert report["warnings"] == [], report["warnings"]
    assert report["similarity"]["registered"] >= report["similarity"]["initial"]


def test_the_warnings_name_folding_and_lost_similarity_and_the_remedy() -> None:
    assert result_warnings(False, 0.0, 0.9, 0.95) == []
    fold, worse = result_warnings(False, 0.02, 0.9, 0.8)
    assert "2.00 %" in fold and "accurate mode" in fold
    assert "0.800 against 0.900" in worse
    accurate = result_warnings(True, 0.02, 0.9, 0.95)
    assert len(accurate) == 1 and "accurate mode" not in accurate[0]
