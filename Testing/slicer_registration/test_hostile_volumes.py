"""``registerVolumes`` with volumes the engine cannot use: one sentence, and the scene exactly as it was.

Each case spoils one input volume (NaN or infinite voxels, zero / negative / NaN spacing, NaN or
absurdly far origin, a direction matrix that is not orthonormal, no image data, a constant image)
and checks the contract: a :class:`dlir.errors.InputError` whose message is one sentence naming
the problem, no node added or removed (the same node ids), and every input node (voxels, IJK to
RAS matrix, name, parent transform, segments) as it was.  A last case checks that a pair that
does not overlap is registered with a warning in the results.
"""

from __future__ import annotations

import numpy as np
import pytest

from dlir_registration_helpers import assert_same_state, blob, node_ids, segmentation_from_array, snapshot, volume_from_array

SHAPE = (10, 12, 14)  # (K, J, I)


@pytest.fixture
def inputs(scene):
    """A good fixed and moving volume and a one-segment moving segmentation."""

    m = np.diag([3.0, 3.0, 4.0, 1.0])
    fixed = volume_from_array(scene, blob(SHAPE), m, "fixed")
    moving = volume_from_array(scene, blob(SHAPE, 1.5), m, "moving")
    labels = np.zeros(SHAPE, np.uint8)
    labels[3:7, 4:8, 5:9] = 1
    return fixed, moving, segmentation_from_array(scene, labels, m, "moving segmentation")


def _spoil(scene, case: str):
    """A new volume node spoiled as ``case`` says, and the words its refusal must contain."""
    from DLIRRegistrationLib.volumes import vtkMatrix

    m = np.diag([3.0, 3.0, 4.0, 1.0])
    if case == "nan voxels":
        array = blob(SHAPE)
        array[2, 3, 4] = np.nan
        return volume_from_array(scene, array, m, "NaN volume"), "NaN or infinite voxels"
    if case == "infinite voxels":
        array = blob(SHAPE)
        array[1, 1, 1], array[5, 5, 5] = np.inf, -np.inf
        return volume_from_array(scene, array, m, "Inf volume"), "NaN or infinite voxels"
    if case == "constant":
        return volume_from_array(scene, np.full(SHAPE, 7.0, np.float32), m, "constant volume"), "constant"
    if case == "no image data":
        return scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty volume"), "no image data"
    node = volume_from_array(scene, blob(SHAPE), m, f"volume with {case}")
    if case == "zero spacing":
        node.SetSpacing(0.0, 3.0, 4.0)
        return node, "spacing"
    if case == "negative spacing":
        node.SetSpacing(3.0, -3.0, 4.0)
        return node, "spacing"
    if case == "nan spacing":
        node.SetSpacing(3.0, float("nan"), 4.0)
        return node, "spacing"
    if case == "nan origin":
        node.SetOrigin(float("nan"), 0.0, 0.0)
        return node, "origin"
    if case == "origin 1e11 mm away":
        node.SetOrigin(1e11, 0.0, 0.0)
        return node, "origin"
    if case in ("sheared directions", "direction columns not unit length", "nan direction"):
        directions = np.eye(4)
        if case == "sheared directions":
            directions[0, 1] = 0.3
        elif case == "direction columns not unit length":
            directions[2, 2] = 2.0
        else:
            directions[1, 1] = np.nan
        node.SetIJKToRASDirectionMatrix(vtkMatrix(directions))
        return node, "direction matrix"
    raise AssertionError(case)


CASES = ["nan voxels", "infinite voxels", "constant", "no image data", "zero spacing", "negative spacing", "nan spacing",
         "nan origin", "origin 1e11 mm away", "sheared directions", "direction columns not unit length", "nan direction"]


@pytest.mark.parametrize("role", ["fixed", "moving"])
@pytest.mark.parametrize("case", CASES)
def test_hostile_volume_is_refused_with_one_sentence_and_the_scene_is_untouched(scene, inputs, stack, case, role) -> None:
    from dlir.errors import InputError
    from DLIRRegistrationLib.registration import registerVolumes

    fixed, moving, segmentation = inputs
    spoiled, words = _spoil(scene, case)
    arguments = dict(fixedVolumeNode=spoiled if role == "fixed" else fixed,
                     movingVolumeNode=spoiled if role == "moving" else moving)
    nodes = [arguments["fixedVolumeNode"], arguments["movingVolumeNode"], segmentation]
    before = [snapshot(n) if n.IsA("vtkMRMLSegmentationNode") or n.GetImageData() is not None else n.GetName() for n in nodes]
    ids = node_ids(scene)
    with pytest.raises(InputError) as raised:
        registerVolumes(scene, stack=stack, movingSegmentationNode=segmentation, device="cpu", **arguments)
    message = str(raised.value)
    assert words in message and f"{role} volume" in message, message
    assert "\n" not in message and message.count("; ") <= 2, message
    assert node_ids(scene) == ids, f"nodes added or removed after refusing {case}"
    for node, state in zip(nodes, before):
        if isinstance(state, str):
            assert node.GetName() == state and node.GetImageData() is None
        else:
            assert_same_state(state, snapshot(node))


def test_a_pair_that_does_not_overlap_is_registered_with_a_warning(scene, stack) -> None:
    """A moving volume 2 m away from the fixed one and no initial alignment: registered, but the results say so."""
    from DLIRRegistrationLib.registration import OutputRequest, registerVolumes

    fixed = volume_from_array(scene, blob(SHAPE), np.diag([3.0, 3.0, 4.0, 1.0]), "fixed")
    far = np.diag([3.0, 3.0, 4.0, 1.0])
    far[0, 3] = 2000.0
    moving = volume_from_array(scene, blob(SHAPE), far, "moving far away")
    outputs = registerVolumes(scene, fixed, moving, stack, device="cpu", outputs=OutputRequest(show=False),
                              initialAlignment="none")
    assert any("do not overlap" in w for w in outputs.warnings), outputs.warnings
    assert outputs.registration.summary()["no_overlap"] is True


def test_a_transform_that_maps_the_fixed_volume_out_of_the_moving_one_is_registered_with_a_warning(scene) -> None:
    """A stack whose B-spline stage moves every point 48 mm, out of a 42 mm wide pair: the results say so (issue 26)."""
    import torch

    from DLIRRegistrationLib.registration import OutputRequest, registerVolumes
    from testdata import small_stack

    shifting = small_stack()
    with torch.no_grad():
        shifting.stages[1].net.output.weight.zero_()
        shifting.stages[1].net.output.bias.copy_(torch.tensor([12.0, 0.0, 0.0]))  # voxels of its 4 mm grid, along x
    m = np.diag([3.0, 3.0, 4.0, 1.0])
    fixed, moving = volume_from_array(scene, blob(SHAPE), m, "fixed"), volume_from_array(scene, blob(SHAPE, 1.5), m, "moving")
    outputs = registerVolumes(scene, fixed, moving, shifting, device="cpu", outputs=OutputRequest(show=False),
                              initialAlignment="none")
    assert any(w.startswith("the registered transform maps only 0.0 % of the fixed image inside the moving image")
               for w in outputs.warnings), outputs.warnings
    assert outputs.registration.summary()["registered_overlap_fraction"] == 0.0
