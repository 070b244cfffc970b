"""The Slicer logic carries a one-shot result's warnings (issue 25): a folding result says so in
``registerVolumes``' outputs (shown under the results in the module), a good pair says nothing."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from dlir_registration_helpers import read_volume

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"


def test_a_folding_result_warns_and_a_good_one_does_not(shared_data: Path, tmp_path: Path) -> None:
    import slicer

    from DLIRRegistrationLib.registration import registerVolumes

    mni = sitk.ReadImage(str(shared_data / "mni152_2009a_sym" / "t1.nii.gz"), sitk.sitkFloat32)
    size = [int(s * p / 2) for s, p in zip(mni.GetSize(), mni.GetSpacing())]
    sitk.WriteImage(sitk.Resample(mni, size, sitk.Transform(), sitk.sitkLinear, mni.GetOrigin(), [2.0] * 3,
                                  mni.GetDirection()), str(tmp_path / "mni_2mm.nii.gz"))
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    try:
        fixed = read_volume(scene, shared_data / "brain_mr_tumor1" / "t1.nii.gz", "brain1")
        moving = read_volume(scene, tmp_path / "mni_2mm.nii.gz", "MNI")
        outputs = registerVolumes(scene, fixed, moving, "brain-mri", device="cpu")
        assert any("folds" in w and "Accurate" in w for w in outputs.warnings), outputs.warnings
        fixed = read_volume(scene, SAMPLE / "sample_fixed.nii.gz", "sample fixed")
        moving = read_volume(scene, SAMPLE / "sample_moving.nii.gz", "sample moving")
        assert registerVolumes(scene, fixed, moving, "brain-mri", device="cpu").warnings == []
    finally:
        scene.Clear(1)
