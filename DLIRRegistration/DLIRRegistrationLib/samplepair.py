"""The bundled sample pair (MNI152 brain, 2 mm, grey/white-matter labels) and the body of the self-test.

``DLIRRegistrationTest`` in Slicer loads the pair through the SampleData module; pytest on the
slicer-core wheel loads it with storage nodes (:func:`loadSamplePair`).  Both then call
:func:`runSampleRegistration`, which registers it and returns the list of problems found (empty
when the outputs are right), so the self-test's logic is exercised outside Slicer too.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: files of the pair in ``Resources/SampleData`` (beside the engine's ``Resources/Models``)
FIXED_FILE = "sample_fixed.nii.gz"
MOVING_FILE = "sample_moving.nii.gz"
MOVING_LABELS_FILE = "sample_moving_labels.nii.gz"
FIXED_LABELS_FILE = "sample_fixed_labels.nii.gz"
#: label value -> segment name of the sample labels
SEGMENT_NAMES = {1: "left grey matter", 2: "right grey matter", 3: "left white matter", 4: "right white matter"}


def sampleDataFolder() -> Path:
    """``Resources/SampleData`` of the extension (repository root in a checkout; beside the modules when installed)."""
    return Path(__file__).resolve().parents[2] / "Resources" / "SampleData"


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file (SampleData's checksum format is ``SHA256:<hex>``)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class SamplePair:
    """The sample pair's nodes in a scene."""

    fixedVolumeNode: object
    movingVolumeNode: object
    movingSegmentationNode: object


def loadSamplePair(scene) -> SamplePair:
    """Load the pair into ``scene`` with storage nodes (works without the Slicer application)."""
    import slicer

    folder = sampleDataFolder()
    fixed = _readVolume(scene, folder / FIXED_FILE, "DLIR sample fixed", "vtkMRMLScalarVolumeNode")
    moving = _readVolume(scene, folder / MOVING_FILE, "DLIR sample moving", "vtkMRMLScalarVolumeNode")
    labels = _readVolume(scene, folder / MOVING_LABELS_FILE, "DLIR sample moving labels", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "DLIR sample moving segmentation")
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    if not logic.ImportLabelmapToSegmentationNode(labels, segmentation):
        raise RuntimeError("the sample labels cannot be imported into a segmentation")
    scene.RemoveNode(labels)
    nameSegments(segmentation)
    return SamplePair(fixed, moving, segmentation)


def nameSegments(segmentationNode) -> None:
    """Give the sample segments their anatomical names (label value, or the number in names like "Label_3")."""
    segmentation = segmentationNode.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        digits = re.findall(r"\d+", segment.GetName())
        value = segment.GetLabelValue() if segment.GetLabelValue() in SEGMENT_NAMES else int(digits[-1]) if digits else 0
        if value in SEGMENT_NAMES:
            segment.SetName(SEGMENT_NAMES[value])


def _readVolume(scene, path: Path, name: str, className: str):
    import slicer

    node = scene.AddNewNodeByClass(className, name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise RuntimeError(f"cannot read the sample file {path}")
    return node


def selfTestStack():
    """The first bundled stack when the extension ships one, else a freshly initialised small stack.

    A fresh stack (seeded) checks the plumbing and geometry, not accuracy.
    """
    from dlir.recipe import Recipe, StageSpec
    from dlir.stack import Manifest, build_stack, bundled_models_dir, list_stacks, load_stack

    bundled = [info for info in list_stacks() if info.path.parent == bundled_models_dir()]
    if bundled:
        return load_stack(bundled[0].path)
    recipe = Recipe(stages=(
        StageSpec("affine", spacing_mm=(8.0, 8.0, 8.0), depth=2, channels=8),
        StageSpec("bspline", spacing_mm=(4.0, 4.0, 4.0), control_point_spacing=4, depth=2, channels=8, alpha=0.05),
    ))
    return build_stack(Manifest("selftest-untrained", recipe, description="freshly initialised self-test stack"), seed=0)


def runSampleRegistration(scene, pair: SamplePair, stack, device: str = "cpu", mode: str = "fast"):
    """Register the sample pair with every output in ``mode`` (``fast`` or ``accurate``); returns ``(outputs, problems)``,
    problems empty when all is right."""
    from .registration import registerVolumes

    outputs = registerVolumes(scene, pair.fixedVolumeNode, pair.movingVolumeNode, stack,
                              movingSegmentationNode=pair.movingSegmentationNode, device=device, mode=mode)
    return outputs, checkOutputs(pair, outputs, stack)


def checkOutputs(pair: SamplePair, outputs, stack) -> list[str]:
    """Sentences naming what is wrong with a sample-pair run's outputs (empty: all right)."""
    import slicer

    problems = []
    fixed = pair.fixedVolumeNode
    transform = outputs.transformNode
    if transform is None or transform.GetTransformFromParent() is None:
        problems.append("no transform from parent in the transform node")
    else:
        if transform.GetNodeReferenceID(transform.GetFixedNodeReferenceRole()) != fixed.GetID():
            problems.append("the transform does not reference the fixed volume")
        if transform.GetNodeReferenceID(transform.GetMovingNodeReferenceRole()) != pair.movingVolumeNode.GetID():
            problems.append("the transform does not reference the moving volume")
    for label, node in (("warped volume", outputs.warpedVolumeNode), ("Jacobian", outputs.jacobianVolumeNode)):
        if node is None or not _sameGrid(node, fixed):
            problems.append(f"the {label} is missing or not on the fixed grid")
    if outputs.jacobianVolumeNode is not None:
        jacobian = slicer.util.arrayFromVolume(outputs.jacobianVolumeNode)
        if not np.isfinite(jacobian).all() or float(np.median(jacobian)) <= 0:
            problems.append("the Jacobian map is not finite or mostly folded")
    folding = outputs.foldingSegmentationNode
    if folding is None or folding.GetSegmentation().GetSegment("Folding") is None:
        problems.append("no Folding segment")
    source = pair.movingSegmentationNode.GetSegmentation()
    propagated = outputs.segmentationNode.GetSegmentation() if outputs.segmentationNode is not None else None
    if propagated is None or propagated.GetNumberOfSegments() != source.GetNumberOfSegments():
        problems.append("the propagated segmentation does not have every segment")
    else:
        for index in range(source.GetNumberOfSegments()):
            segmentId = source.GetNthSegmentID(index)
            original, copy = source.GetSegment(segmentId), propagated.GetSegment(segmentId)
            if copy is None or copy.GetName() != original.GetName() or copy.GetColor() != original.GetColor():
                problems.append(f"segment {original.GetName()} lost its name or colour")
    if outputs.device != "cpu" and not outputs.device.startswith("cuda"):
        problems.append(f"unexpected device {outputs.device}")
    if not 0.0 <= outputs.foldingPercent <= 100.0:
        problems.append(f"folding {outputs.foldingPercent} % is not a percentage")
    if stack.manifest.training:
        problems += _accuracyProblems(pair, outputs)
    return problems


def _accuracyProblems(pair: SamplePair, outputs) -> list[str]:
    """A trained stack must raise the mean Dice of the named sample segments (ground truth on the fixed image)."""
    import SimpleITK as sitk

    from .segmentations import segmentMask

    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(sampleDataFolder() / FIXED_LABELS_FILE)))
    moving = sitk.GetArrayFromImage(sitk.ReadImage(str(sampleDataFolder() / MOVING_LABELS_FILE)))
    propagated = outputs.segmentationNode.GetSegmentation()
    before, after = [], []
    for value, name in SEGMENT_NAMES.items():
        segmentId = propagated.GetSegmentIdBySegmentName(name)
        if not segmentId:
            return [f"the propagated segmentation has no segment {name}"]
        before.append(_dice(moving == value, truth == value))
        after.append(_dice(segmentMask(outputs.segmentationNode, segmentId), truth == value))
    if np.mean(after) > np.mean(before):
        return []
    return [f"the trained stack did not improve the sample Dice ({np.mean(before):.3f} -> {np.mean(after):.3f})"]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 2.0 * int(np.count_nonzero(a & b)) / total if total else 1.0


def _sameGrid(a, b) -> bool:
    import vtk

    ma, mb = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    a.GetIJKToRASMatrix(ma)
    b.GetIJKToRASMatrix(mb)
    same = all(abs(ma.GetElement(r, c) - mb.GetElement(r, c)) < 1e-6 for r in range(4) for c in range(4))
    return same and a.GetImageData().GetDimensions() == b.GetImageData().GetDimensions()
