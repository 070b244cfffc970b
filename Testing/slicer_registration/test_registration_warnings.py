"""The Slicer logic carries a one-shot result's warnings (issue 25): a folding result says so in
``registerVolumes``' outputs (shown under the results in the module), a good pair says nothing."""

from __future__ import annotations

from pathlib import Path

from dlir.stack import save_stack
from dlir_registration_helpers import read_volume
from testdata import folding_stack

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"


def test_a_folding_result_warns_and_a_good_one_does_not(tmp_path: Path) -> None:
    import slicer

    from DLIRRegistrationLib.registration import registerVolumes

    folding = save_stack(folding_stack(), tmp_path / "folding.safetensors")
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    try:
        fixed = read_volume(scene, SAMPLE / "sample_fixed.nii.gz", "sample fixed")
        moving = read_volume(scene, SAMPLE / "sample_moving.nii.gz", "sample moving")
        outputs = registerVolumes(scene, fixed, moving, str(folding), device="cpu")
        assert any("folds" in w and "Accurate" in w for w in outputs.warnings), outputs.warnings
        assert registerVolumes(scene, fixed, moving, "brain-mri", device="cpu").warnings == []
    finally:
        scene.Clear(1)
