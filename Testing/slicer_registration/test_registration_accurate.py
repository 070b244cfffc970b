"""Accurate mode, the fixed mask and the mode arguments of ``registerVolumes`` on the bundled sample pair
(MNI152, 2 mm, four grey/white-matter segments; ground truth on the fixed image) with the bundled
``brain-mri`` stack: every accurate run takes about two seconds on one CPU core."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from dlir_registration_helpers import (
    assert_same_state,
    ijk_to_ras,
    node_ids,
    segmentation_from_array,
    snapshot,
    volume_from_array,
    voxels,
)

#: the segments of the fixed mask segmentation: the brain, and a box of background away from it
BRAIN, CORNER = "brain", "corner"


@pytest.fixture(scope="module")
def sample():
    """The sample pair, the fixed ground truth, a fixed mask segmentation (brain, corner), a brain label map on a
    coarser grid, the brain-mri stack and the Dice of a fast run (one scene for the module)."""
    import slicer

    from dlir.stack import load_stack
    from DLIRRegistrationLib import samplepair
    from DLIRRegistrationLib.registration import registerVolumes

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    pair = samplepair.loadSamplePair(scene)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(samplepair.sampleDataFolder() / samplepair.FIXED_LABELS_FILE)))
    fixedMatrix = ijk_to_ras(pair.fixedVolumeNode)
    labels = np.zeros(truth.shape, np.uint8)
    labels[truth > 0] = 1
    labels[:12, :12, :12] = 2  # background only: the fixed image is 0 there
    assert not voxels(pair.fixedVolumeNode)[:12, :12, :12].any() and not truth[:12, :12, :12].any()
    maskSegmentation = segmentation_from_array(scene, labels, fixedMatrix, "fixed mask segmentation")
    segmentation = maskSegmentation.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        segment.SetName({1: BRAIN, 2: CORNER}[segment.GetLabelValue()])
    coarse = fixedMatrix.copy()
    coarse[:3, :3] *= 2.0  # every other voxel: a 4 mm grid whose voxel centres are fixed voxel centres
    labelVolume = slicer.util.addVolumeFromArray((truth[::2, ::2, ::2] > 0).astype(np.uint8), ijkToRAS=coarse,
                                                 name="fixed brain label map", nodeClassName="vtkMRMLLabelMapVolumeNode")
    stack = load_stack("brain-mri")
    fast = registerVolumes(scene, pair.fixedVolumeNode, pair.movingVolumeNode, stack,
                           movingSegmentationNode=pair.movingSegmentationNode, device="cpu", mode="fast")
    yield dict(scene=scene, pair=pair, truth=truth, maskSegmentation=maskSegmentation, labelVolume=labelVolume,
               stack=stack, fastDice=_dice(fast, truth))
    scene.Clear(1)


def _segmentId(segmentationNode, name: str) -> str:
    return segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(name)


def _dice(outputs, truth: np.ndarray) -> float:
    """Mean Dice of the four propagated sample segments against the fixed ground truth."""
    from DLIRRegistrationLib.samplepair import SEGMENT_NAMES
    from DLIRRegistrationLib.segmentations import segmentMask

    scores = []
    for value, name in SEGMENT_NAMES.items():
        mask = segmentMask(outputs.segmentationNode, _segmentId(outputs.segmentationNode, name))
        scores.append(2 * np.count_nonzero(mask & (truth == value)) / (np.count_nonzero(mask) + np.count_nonzero(truth == value)))
    return float(np.mean(scores))


def _inputs(sample) -> list:
    pair = sample["pair"]
    return [pair.fixedVolumeNode, pair.movingVolumeNode, pair.movingSegmentationNode, sample["maskSegmentation"],
            sample["labelVolume"]]


def _accurate(sample, progress=None, cancel=None, **mask):
    from DLIRRegistrationLib.registration import registerVolumes

    pair = sample["pair"]
    return registerVolumes(sample["scene"], pair.fixedVolumeNode, pair.movingVolumeNode, sample["stack"],
                           movingSegmentationNode=pair.movingSegmentationNode, device="cpu", mode="accurate",
                           progress=progress, cancel=cancel, **mask)


def _run(sample, **mask) -> dict:
    """One accurate run: its outputs, the progress steps it reported, and the inputs' state before and after."""
    before = [snapshot(node) for node in _inputs(sample)]
    steps: list[str] = []
    outputs = _accurate(sample, progress=lambda step, fraction: steps.append(step), **mask)
    return dict(outputs=outputs, steps=steps, before=before, after=[snapshot(node) for node in _inputs(sample)])


@pytest.fixture(scope="module")
def brain_segment_run(sample) -> dict:
    return _run(sample, fixedMaskNode=sample["maskSegmentation"],
                fixedMaskSegmentId=_segmentId(sample["maskSegmentation"], BRAIN))


def _check_accurate_run(sample, run: dict) -> None:
    """Inputs untouched; transform, warped volume and propagated segmentation on the fixed grid; no folding;
    the optimisation reported by level and loss; Dice at least the fast mode's."""
    for before, after in zip(run["before"], run["after"]):
        assert_same_state(before, after)
    outputs, fixed = run["outputs"], sample["pair"].fixedVolumeNode
    assert outputs.transformNode is not None and outputs.transformNode.GetTransformFromParent() is not None
    for node in (outputs.warpedVolumeNode, outputs.jacobianVolumeNode):
        assert np.array_equal(ijk_to_ras(node), ijk_to_ras(fixed)) and voxels(node).shape == voxels(fixed).shape
    assert outputs.segmentationNode.GetSegmentation().GetNumberOfSegments() == 4
    assert outputs.masked and outputs.foldingPercent == 0.0 and outputs.foldingVolumeMm3 == 0.0
    assert voxels(outputs.jacobianVolumeNode).min() > 0
    refinement = outputs.registration.refinement
    assert len(refinement["steps"]) == 3, refinement
    assert "in the mask" in outputs.summary() and "optimised over 3 level(s)" in outputs.summary()
    levels = [step for step in run["steps"] if step.startswith("refine (accurate): level ")]
    assert len(levels) >= sum(refinement["steps"]) and "loss -0." in levels[-1] and "level 3/3" in levels[-1]
    assert _dice(outputs, sample["truth"]) >= sample["fastDice"]


def test_accurate_with_a_segment_as_fixed_mask(sample, brain_segment_run) -> None:
    _check_accurate_run(sample, brain_segment_run)


def test_accurate_with_a_label_map_on_another_grid_as_fixed_mask(sample) -> None:
    from DLIRRegistrationLib.registration import fixedMaskImage
    from DLIRRegistrationLib.volumes import volumeGeometry, volumeNodeToImage

    run = _run(sample, fixedMaskNode=sample["labelVolume"])
    _check_accurate_run(sample, run)
    # the 4 mm label map on the 2 mm fixed grid covers the brain, and the Jacobian's spread is taken there
    fixed = sample["pair"].fixedVolumeNode
    mask = sitk.GetArrayFromImage(fixedMaskImage(sample["scene"], sample["labelVolume"], None, volumeNodeToImage(fixed, "fixed"),
                                                 volumeGeometry(fixed, "fixed"), "fixed")) > 0
    brain = sample["truth"] > 0
    assert 2 * np.count_nonzero(mask & brain) / (np.count_nonzero(mask) + np.count_nonzero(brain)) > 0.9
    jacobian = sitk.GetArrayFromImage(run["outputs"].registration.jacobian)
    assert run["outputs"].jacobianStd == pytest.approx(float(np.std(jacobian[mask])), rel=1e-3)
    assert abs(run["outputs"].jacobianStd - float(np.std(jacobian))) > 1e-3


def test_a_mask_away_from_the_anatomy_changes_the_result(sample, brain_segment_run) -> None:
    """Only background inside the mask: accurate mode has nothing to match, so its result is far worse."""
    corner = _accurate(sample, fixedMaskNode=sample["maskSegmentation"],
                       fixedMaskSegmentId=_segmentId(sample["maskSegmentation"], CORNER))
    assert corner.foldingPercent == 0.0
    assert _dice(corner, sample["truth"]) < _dice(brain_segment_run["outputs"], sample["truth"]) - 0.1


def test_cancel_during_accurate_mode_leaves_the_scene_as_it_was(sample) -> None:
    from dlir.errors import CancelledError

    optimiserSteps: list[str] = []
    requested: list[float] = []

    def progress(step: str, fraction: float) -> None:
        if step.startswith("refine (accurate): level"):
            optimiserSteps.append(step)

    def cancel() -> bool:
        if len(optimiserSteps) >= 3 and not requested:
            requested.append(time.perf_counter())
        return bool(requested)

    nodes = _inputs(sample)
    before, ids = [snapshot(node) for node in nodes], node_ids(sample["scene"])
    with pytest.raises(CancelledError, match="cancelled"):
        _accurate(sample, progress=progress, cancel=cancel, fixedMaskNode=sample["maskSegmentation"],
                  fixedMaskSegmentId=_segmentId(sample["maskSegmentation"], BRAIN))
    assert time.perf_counter() - requested[0] < 1.0
    assert len(optimiserSteps) == 3, "the optimisation stops at the first poll after the request"
    assert node_ids(sample["scene"]) == ids
    for node, state in zip(nodes, before):
        assert_same_state(state, snapshot(node))


def _far_segmentation(sample):
    shifted = ijk_to_ras(sample["pair"].fixedVolumeNode)
    shifted[:3, 3] += 1000.0
    return segmentation_from_array(sample["scene"], np.ones((4, 4, 4), np.uint8), shifted, "far away")


REFUSALS = {
    "unknown mode": (dict(mode="precise"), "unknown registration mode 'precise'"),
    "negative steps": (dict(refineSteps=-2), "refinement steps must be a whole number"),
    "segment away from the fixed volume": (dict(fixedMaskNode=_far_segmentation), "does not overlap the fixed volume"),
    "missing segment": (dict(fixedMaskNode=lambda sample: sample["maskSegmentation"], fixedMaskSegmentId="nope"),
                        "has no segment 'nope'"),
    "not a mask": (dict(fixedMaskNode=lambda sample: sample["scene"].AddNewNodeByClass("vtkMRMLLinearTransformNode", "a transform")),
                   "neither a segmentation nor a label-map volume"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_with_one_sentence_and_nothing_added(sample, case) -> None:
    from dlir.errors import DLIRError
    from DLIRRegistrationLib.registration import registerVolumes

    arguments, words = REFUSALS[case]
    arguments = {key: value(sample) if callable(value) else value for key, value in arguments.items()}
    pair, scene = sample["pair"], sample["scene"]
    nodes = _inputs(sample)
    before, ids = [snapshot(node) for node in nodes], node_ids(scene)
    with pytest.raises(DLIRError) as raised:
        registerVolumes(scene, pair.fixedVolumeNode, pair.movingVolumeNode, sample["stack"],
                        movingSegmentationNode=pair.movingSegmentationNode, device="cpu", **arguments)
    message = str(raised.value)
    assert words in message and "\n" not in message, message
    assert node_ids(scene) == ids
    for node, state in zip(nodes, before):
        assert_same_state(state, snapshot(node))


def test_masks_land_on_the_fixed_grid_in_world_coordinates(scene) -> None:
    """A label map and a segment on an oblique, anisotropic grid under a linear transform, onto a fixed grid with
    LPS-like axes: the mask is the same box in world RAS (a left-right or RAS/LPS flip would put it on the other side)."""
    import slicer

    from DLIRRegistrationLib.registration import fixedMaskImage
    from DLIRRegistrationLib.volumes import volumeGeometry, volumeNodeToImage, vtkMatrix

    fixedMatrix = np.diag([-2.0, -2.0, 2.0, 1.0])
    fixedMatrix[:3, 3] = (30.0, 30.0, -30.0)
    fixed = volume_from_array(scene, np.random.default_rng(0).random((30, 30, 30)).astype(np.float32), fixedMatrix, "fixed")
    box = (np.array([8.0, -20.0, -14.0]), np.array([24.0, 6.0, 10.0]))  # world RAS mm, right of the midline

    angle = np.radians(30.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    sourceMatrix = np.eye(4)
    sourceMatrix[:3, :3] = rotation @ np.diag([1.5, 2.5, 3.0])
    sourceMatrix[:3, 3] = (-40.0, -45.0, -35.0)
    parent = np.eye(4)
    parent[:3, 3] = (5.0, -3.0, 2.0)
    shape = (28, 40, 60)
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    world = np.stack([i, j, k, np.ones(shape)], -1) @ (parent @ sourceMatrix).T
    labels = np.all((world[..., :3] >= box[0]) & (world[..., :3] <= box[1]), axis=-1).astype(np.uint8)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    transform.SetMatrixTransformToParent(vtkMatrix(parent))
    labelVolume = slicer.util.addVolumeFromArray(labels, ijkToRAS=sourceMatrix, name="label map",
                                                 nodeClassName="vtkMRMLLabelMapVolumeNode")
    segmentation = segmentation_from_array(scene, labels, sourceMatrix, "segmentation")
    for node in (labelVolume, segmentation):
        node.SetAndObserveTransformNodeID(transform.GetID())

    fixedImage, geometry = volumeNodeToImage(fixed, "fixed volume"), volumeGeometry(fixed, "fixed volume")
    k, j, i = np.meshgrid(*(np.arange(n) for n in (30, 30, 30)), indexing="ij")
    centres = (np.stack([i, j, k, np.ones((30, 30, 30))], -1) @ fixedMatrix.T)[..., :3]
    margin = 0.5 * np.linalg.norm([1.5, 2.5, 3.0])  # half a source voxel's diagonal
    surely_in = np.all((centres >= box[0] + margin) & (centres <= box[1] - margin), axis=-1)
    surely_out = ~np.all((centres >= box[0] - margin) & (centres <= box[1] + margin), axis=-1)
    assert surely_in.sum() > 300
    for node, segmentId in ((labelVolume, None), (segmentation, segmentation.GetSegmentation().GetNthSegmentID(0))):
        mask = fixedMaskImage(scene, node, segmentId, fixedImage, geometry, "fixed")
        assert mask.GetOrigin() == fixedImage.GetOrigin() and mask.GetDirection() == fixedImage.GetDirection()
        inside = sitk.GetArrayFromImage(mask) > 0
        assert inside[surely_in].all() and not inside[surely_out].any(), node.GetName()

