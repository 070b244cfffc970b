"""Fast mode tells when it failed (issue 25): a one-shot result that folds gets a warning in ``result.json``
(and on the command line), suggesting accurate mode; a good pair gets none.

The folding result comes from a stack made to fold (:func:`testdata.folding_stack`), so the test does not depend on
where a trained stack happens to fail; the good pair is the bundled sample pair with ``brain-mri``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dlir.quality import FOLDING_WARNING_ABOVE, result_warnings
from dlir.stack import save_stack
from testdata import folding_stack

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "SampleData"


@pytest.fixture(scope="module")
def folding_stack_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`testdata.folding_stack` saved once; tests must only read it."""
    return save_stack(folding_stack(), tmp_path_factory.mktemp("folding") / "folding.safetensors")


def test_a_folding_one_shot_result_warns_in_result_json(folding_stack_file: Path, run_dlir, tmp_path: Path) -> None:
    result = run_dlir("register", SAMPLE / "sample_fixed.nii.gz", SAMPLE / "sample_moving.nii.gz", "--stack", folding_stack_file,
                      "--out", tmp_path / "out", "--device", "cpu")
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
