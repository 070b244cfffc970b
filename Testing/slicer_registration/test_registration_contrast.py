"""The contrast choice of ``registerVolumes`` on slicer-core: a T2-like fixed volume made from the MNI152 template's
tissue probabilities (4 mm) against the T1 template under a known affine, registered in accurate mode as
"Different contrasts": input nodes untouched, outputs consistent (the propagated segments on the fixed grid agree with
the engine's own label warp, the summary names the choice)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dlir_registration_helpers import assert_same_state, ijk_to_ras, snapshot, voxels


def _lps_to_ras_volume(scene, image: sitk.Image, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A volume node with the voxels and geometry of an LPS SimpleITK image (through Slicer's own NIfTI reader)."""
    import tempfile

    import slicer

    node = scene.AddNewNodeByClass(class_name, name)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "volume.nii.gz"
        sitk.WriteImage(image, str(path))
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        assert storage.ReadData(node)
    return node


def _at_4mm(shared_data: Path, name: str, interpolator: int = sitk.sitkLinear, pixel: int = sitk.sitkFloat32) -> sitk.Image:
    image = sitk.ReadImage(str(shared_data / "mni152_2009a_sym" / name), pixel)
    size = [int(n * s / 4.0) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), [4.0] * 3, image.GetDirection())


def test_different_contrasts_in_slicer_inputs_untouched_outputs_consistent(scene, shared_data: Path) -> None:
    from dlir_registration_helpers import segmentation_from_array
    from DLIRRegistrationLib.registration import registerVolumes
    from DLIRRegistrationLib.segmentations import segmentMask
    from testdata import identity_bspline_stack

    t1 = _at_4mm(shared_data, "t1.nii.gz")
    gm, wm, brain = (_at_4mm(shared_data, f"{n}.nii.gz") for n in ("gm_prob", "wm_prob", "brain_mask"))
    labels = _at_4mm(shared_data, "labels.nii.gz", sitk.sitkNearestNeighbor, sitk.sitkUInt8)
    t2like = 200.0 * sitk.Clamp(brain - gm - wm, sitk.sitkFloat32, 0.0, 1.0) + 120.0 * gm + 50.0 * wm
    centre = t1.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in t1.GetSize()])
    known = sitk.Euler3DTransform(centre, *np.radians((5.0, -4.0, 6.0)), (4.0, -3.0, 3.0))
    fixed = _lps_to_ras_volume(scene, sitk.Resample(t2like, t1, known, sitk.sitkLinear, 0.0), "T2-like fixed")
    moving = _lps_to_ras_volume(scene, t1, "T1 moving")
    truth = sitk.GetArrayFromImage(sitk.Resample(labels, t1, known, sitk.sitkNearestNeighbor, 0))
    segmentation = segmentation_from_array(scene, sitk.GetArrayFromImage(labels), ijk_to_ras(moving), "tissues")
    inputs = [fixed, moving, segmentation]
    before = [snapshot(node) for node in inputs]

    outputs = registerVolumes(scene, fixed, moving, identity_bspline_stack(), movingSegmentationNode=segmentation,
                              device="cpu", mode="accurate", similarity="different")

    for node, state in zip(inputs, before):
        assert_same_state(state, snapshot(node))
    assert "different contrasts (as asked); similarity MIND-SSC" in outputs.summary()
    assert outputs.foldingPercent == 0.0
    ids = outputs.segmentationNode.GetSegmentation().GetSegmentIDs()
    assert len(ids) == 4
    dice = []
    for segmentId in ids:
        value = outputs.segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
        mask = segmentMask(outputs.segmentationNode, segmentId)
        assert mask.shape == voxels(fixed).shape  # on the fixed grid
        dice.append(2 * np.count_nonzero(mask & (truth == value)) / (np.count_nonzero(mask) + np.count_nonzero(truth == value)))
    assert np.mean(dice) > 0.8
    warped = voxels(outputs.warpedVolumeNode)
    assert warped.shape == voxels(fixed).shape and np.isfinite(warped).all()
