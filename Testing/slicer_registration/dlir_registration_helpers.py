"""Helpers of the DLIR Registration tests: nodes from files and arrays, snapshots of input nodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import vtk


def blob(shape: tuple[int, int, int] = (12, 14, 16), shift: float = 0.0) -> np.ndarray:
    """A Gaussian blob ``[K, J, I]`` (float32, peak 100) at the centre of ``shape``, moved ``shift`` voxels along i."""
    k, j, i = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    ck, cj, ci = (s // 2 for s in shape)
    return (100 * np.exp(-((i - ci - shift) ** 2 + (j - cj) ** 2 + (k - ck) ** 2) / 20.0)).astype(np.float32)


def read_volume(scene, path: Path, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A volume node read from a file by Slicer's own storage node (its own RAS <-> LPS handling)."""
    import slicer

    node = scene.AddNewNodeByClass(class_name, name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), path
    return node


def segmentation_from_labels(scene, path: Path, name: str):
    """A segmentation node with one segment per label of a label-map file (segment names ``Label_N``)."""
    return _segmentation_of(scene, read_volume(scene, path, name + " labels", "vtkMRMLLabelMapVolumeNode"), name)


def segmentation_from_array(scene, labels: np.ndarray, ijk_to_ras: np.ndarray, name: str):
    """A segmentation node with one segment per label of a (K, J, I) label array on a 4x4 IJK-to-RAS grid."""
    import slicer

    labelmap = slicer.util.addVolumeFromArray(labels, ijkToRAS=ijk_to_ras, name=name + " labels",
                                              nodeClassName="vtkMRMLLabelMapVolumeNode")
    return _segmentation_of(scene, labelmap, name)


def _segmentation_of(scene, labelmap, name: str):
    """``labelmap`` imported into a new segmentation node ``name``; the label-map node is removed."""
    import slicer

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    assert logic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    return segmentation


def volume_from_array(scene, array: np.ndarray, ijk_to_ras: np.ndarray, name: str):
    """A scalar volume node with a (K, J, I) array and a 4x4 IJK-to-RAS matrix."""
    import slicer

    slicer.mrmlScene = scene
    return slicer.util.addVolumeFromArray(array, ijkToRAS=ijk_to_ras, name=name)


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def voxels(node) -> np.ndarray:
    from vtk.util.numpy_support import vtk_to_numpy

    i, j, k = node.GetImageData().GetDimensions()
    return vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(k, j, i).copy()


def snapshot(node) -> dict:
    """Everything of an input node that a registration must leave alone."""
    state = {"name": node.GetName(), "parent": node.GetTransformNodeID(), "mtime_image": None}
    if node.IsA("vtkMRMLVolumeNode"):
        state.update(array=voxels(node), matrix=ijk_to_ras(node), mtime_image=node.GetImageData().GetMTime())
    if node.IsA("vtkMRMLSegmentationNode"):
        segmentation = node.GetSegmentation()
        state.update(
            segments=[(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName(),
                       segmentation.GetNthSegment(i).GetColor()) for i in range(segmentation.GetNumberOfSegments())],
            representations=[_representations(segmentation.GetNthSegment(i)) for i in range(segmentation.GetNumberOfSegments())],
            source=segmentation.GetSourceRepresentationName(),
        )
    return state


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, after[key], equal_nan=value.dtype.kind == "f"), key
        else:
            assert value == after[key], key


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}




def _representations(segment) -> tuple[str, ...]:
    names: list[str] = []
    segment.GetContainedRepresentationNames(names)
    return tuple(names)
