"""Segmentation nodes <-> label maps for propagation moving -> fixed, and new segmentations on the fixed grid.

A moving segmentation becomes one label map per *layer* of its binary labelmap representation
(segments of one layer never overlap; overlapping segments live in different layers), each on the
moving volume's world grid, label ``n`` = the layer's n-th segment.  The export reads a temporary
copy of the segmentation through Slicer's own segmentation logic (``vtkSlicerSegmentationsModuleLogic``,
present in slicer-core), so the input node is never converted or otherwise modified.

Warped label maps come back as segments built directly as binary-labelmap representations on the
fixed world grid: each keeps its source segment's ID, name, colour and tags (terminology included,
``vtkSegment.DeepCopyMetadata``); the segmentation's reference geometry is the fixed grid.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import SimpleITK as sitk
import vtk

from .scene import SceneChanges
from .volumes import VolumeGeometry, setImageGeometry


@dataclass
class LabelLayer:
    """One layer of a segmentation as a label map: ``image`` (LPS, moving grid), label n = ``segmentIds[n - 1]``."""

    image: sitk.Image
    segmentIds: list[str]


def exportLayers(scene, segmentationNode, geometry: VolumeGeometry) -> list[LabelLayer]:
    """The segmentation as label maps on ``geometry`` (world RAS), one per layer; the node is only read.

    The segmentation's own parent transform is honoured by Slicer's export.  Temporary nodes (and
    the display and colour nodes Slicer adds for them) are removed before returning, also on failure.
    """
    with _exporter(scene, segmentationNode, geometry) as (segmentation, export):
        layers = []
        for layer in range(segmentation.GetNumberOfLayers()):
            ids = [str(i) for i in segmentation.GetSegmentIDsForLayer(layer)]
            if ids:
                layers.append(LabelLayer(export(ids), ids))
        return layers


def exportMask(scene, segmentationNode, segmentIds: list[str], geometry: VolumeGeometry) -> np.ndarray:
    """The union of segments ``segmentIds`` as a boolean (K, J, I) mask on ``geometry`` (world RAS).

    Exported by Slicer's segmentation logic exactly as :func:`exportLayers` (parent transform
    honoured, nearest neighbour onto ``geometry``); the node is only read.  A segment outside
    ``geometry`` gives no voxel (the caller decides whether an empty mask is an error).
    """
    with _exporter(scene, segmentationNode, geometry) as (_, export):
        return sitk.GetArrayFromImage(export(segmentIds)) != 0


@contextmanager
def _exporter(scene, segmentationNode, geometry: VolumeGeometry) -> Iterator[tuple[object, Callable[[list[str]], sitk.Image]]]:
    """(a temporary copy of the node's ``vtkSegmentation`` in binary labelmap form, a function ``segment IDs ->
    label image`` (LPS, on ``geometry``; label n = the n-th ID)).

    The copy carries the representation, so the input node is never converted; the export goes
    onto a temporary reference volume of ``geometry``.  Every temporary node is removed on leaving
    the context, also on failure.
    """
    import slicer

    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    temporary = SceneChanges(scene)
    try:
        copy = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "DLIR temporary segmentation")
        copy.GetSegmentation().DeepCopy(segmentationNode.GetSegmentation())
        copy.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())
        labelmapName = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        if not copy.GetSegmentation().CreateRepresentation(labelmapName):
            raise RuntimeError(f"the segmentation '{segmentationNode.GetName()}' cannot be converted to a binary labelmap")
        reference = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "DLIR temporary reference")
        referenceImage = vtk.vtkImageData()
        referenceImage.SetDimensions(*geometry.dimensions)
        referenceImage.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        reference.SetAndObserveImageData(referenceImage)
        geometry.applyTo(reference)
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "DLIR temporary labelmap")

        def export(segmentIds: list[str]) -> sitk.Image:
            names = vtk.vtkStringArray()
            for segmentId in segmentIds:
                names.InsertNextValue(segmentId)
            if not logic.ExportSegmentsToLabelmapNode(copy, names, labelmap, reference):
                raise RuntimeError(f"the segments of '{segmentationNode.GetName()}' cannot be exported to a label map")
            return _labelImage(labelmap, geometry)

        yield copy.GetSegmentation(), export
    finally:
        temporary.undo()


def _labelImage(labelmapNode, geometry: VolumeGeometry) -> sitk.Image:
    """The labelmap node's voxels as an unsigned label image on ``geometry`` (the export's reference)."""
    from vtk.util.numpy_support import vtk_to_numpy

    i, j, k = geometry.dimensions
    array = vtk_to_numpy(labelmapNode.GetImageData().GetPointData().GetScalars()).reshape(k, j, i)
    image = sitk.GetImageFromArray(array.astype(np.uint16))
    setImageGeometry(image, geometry)
    return image


def newSegment(name: str, rgb: tuple[float, float, float]):
    """A ``vtkSegment`` holding only a name and a colour (metadata for :func:`fillSegmentation`)."""
    import slicer

    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.SetColor(*rgb)
    return segment


def fillSegmentation(segmentationNode, layers: list[tuple[np.ndarray, list[tuple[str, object, int]]]],
                     geometry: VolumeGeometry) -> None:
    """Replace the segments of ``segmentationNode`` with label maps on ``geometry`` (world RAS).

    ``layers``: (label array (K, J, I) on ``geometry``, [(segment ID, ``vtkSegment`` whose name,
    colour and tags are copied, label value of the segment in that array)]).  The segments of one
    layer share one binary-labelmap image, as Slicer stores non-overlapping segments.  The node is
    put in world space; its reference geometry is ``geometry``.
    """
    import slicer

    labelmapName = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    segmentationNode.SetAndObserveTransformNodeID(None)
    segmentation = segmentationNode.GetSegmentation()
    segmentation.RemoveAllSegments()
    segmentation.SetSourceRepresentationName(labelmapName)
    empty = geometry.toOrientedImageData(np.zeros(geometry.dimensions[::-1], np.uint8))
    segmentation.SetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                                        slicer.vtkSegmentationConverter.SerializeImageGeometry(empty))
    for labels, segments in layers:
        image = geometry.toOrientedImageData(labels.astype(np.uint8 if len(segments) < 256 else np.uint16))
        for segmentId, metadata, value in segments:
            segment = slicer.vtkSegment()
            segment.DeepCopyMetadata(metadata)
            segment.SetLabelValue(value)
            segment.AddRepresentation(labelmapName, image)
            segmentation.AddSegment(segment, segmentId)


def segmentMask(segmentationNode, segmentId: str) -> np.ndarray:
    """The boolean (K, J, I) mask of a segment built by :func:`fillSegmentation` (on its full reference grid)."""
    import slicer
    from vtk.util.numpy_support import vtk_to_numpy

    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName())
    i, j, k = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i) == segment.GetLabelValue()
