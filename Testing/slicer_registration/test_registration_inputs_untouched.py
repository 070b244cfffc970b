"""Input nodes are never modified, and a failed or cancelled run leaves the scene as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dlir_registration_helpers import assert_same_state, blob, node_ids, segmentation_from_array, snapshot, volume_from_array


@pytest.fixture
def inputs(scene):
    """Fixed and moving blobs (moving under a linear transform) and a two-segment moving segmentation."""

    from DLIRRegistrationLib.volumes import vtkMatrix

    m = np.diag([3.0, 3.0, 4.0, 1.0])
    fixed = volume_from_array(scene, blob(), m, "fixed")
    moving = volume_from_array(scene, blob(shift=1.5), m, "moving")
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pre-alignment")
    pre = np.eye(4)
    pre[0, 3] = 2.0
    shift.SetMatrixTransformToParent(vtkMatrix(pre))
    moving.SetAndObserveTransformNodeID(shift.GetID())
    labels = np.zeros((12, 14, 16), np.uint8)
    labels[4:8, 5:9, 6:10] = 1
    labels[2:4, 2:4, 2:4] = 2
    return fixed, moving, segmentation_from_array(scene, labels, m, "moving segmentation")


def test_inputs_identical_after_a_run(scene, inputs, stack) -> None:
    from DLIRRegistrationLib.registration import registerVolumes

    before = [snapshot(n) for n in inputs]
    outputs = registerVolumes(scene, *inputs[:2], stack, movingSegmentationNode=inputs[2], device="cpu")
    for node, state in zip(inputs, before):
        assert_same_state(state, snapshot(node))
    assert outputs.segmentationNode.GetSegmentation().GetNumberOfSegments() == 2
    assert outputs.warpedVolumeNode.GetParentTransformNode() is None


def _failing_cases(scene, inputs, tmp_path: Path):
    import slicer

    from dlir.errors import CancelledError, InputError, StackError

    fixed, moving, segmentation = inputs
    flat = volume_from_array(scene, blob()[:1], np.eye(4), "a 2D image")
    nan = blob()
    nan[3, 3, 3] = np.nan
    with_nan = volume_from_array(scene, nan, np.eye(4), "NaN image")
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"this is not a stack at all")
    assert slicer.mrmlScene is scene
    return [
        (dict(fixedVolumeNode=flat), InputError, "single slice"),
        (dict(movingVolumeNode=with_nan), InputError, "NaN"),
        (dict(stack=str(garbage)), StackError, "not a valid safetensors"),
        (dict(cancel=lambda: True), CancelledError, "cancelled"),
    ]


def test_failed_and_cancelled_runs_leave_scene_and_inputs_as_they_were(scene, inputs, stack, tmp_path) -> None:
    from DLIRRegistrationLib.registration import registerVolumes

    for overrides, error, words in _failing_cases(scene, inputs, tmp_path):
        arguments = dict(scene=scene, fixedVolumeNode=inputs[0], movingVolumeNode=inputs[1], stack=stack,
                         movingSegmentationNode=inputs[2], device="cpu")
        arguments.update(overrides)
        nodes = [arguments["fixedVolumeNode"], arguments["movingVolumeNode"], inputs[2]]
        before, ids = [snapshot(n) for n in nodes], node_ids(scene)
        with pytest.raises(error, match=words):
            registerVolumes(**arguments)
        assert node_ids(scene) == ids, f"nodes left behind after {words}"
        for node, state in zip(nodes, before):
            assert_same_state(state, snapshot(node))


def test_failure_while_writing_outputs_removes_created_nodes(scene, inputs, stack, monkeypatch) -> None:
    from DLIRRegistrationLib import registration

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(registration, "fillSegmentation", broken)
    ids = node_ids(scene)
    with pytest.raises(RuntimeError, match="disk full"):
        registration.registerVolumes(scene, inputs[0], inputs[1], stack, movingSegmentationNode=inputs[2], device="cpu")
    assert node_ids(scene) == ids


def test_outputs_can_be_skipped_or_written_into_existing_nodes(scene, inputs, stack) -> None:
    from DLIRRegistrationLib.registration import OutputRequest, registerVolumes

    mine = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my warped")
    request = OutputRequest(transform=False, warpedVolume=mine, jacobianVolume=False, foldingSegmentation=False,
                            segmentation=False, show=False)
    ids = node_ids(scene)
    outputs = registerVolumes(scene, inputs[0], inputs[1], stack, movingSegmentationNode=inputs[2], device="cpu",
                              outputs=request)
    assert outputs.warpedVolumeNode is mine and mine.GetImageData() is not None
    assert (outputs.transformNode, outputs.jacobianVolumeNode, outputs.foldingSegmentationNode, outputs.segmentationNode) == (None,) * 4
    assert node_ids(scene) - ids <= {mine.GetDisplayNodeID()}
