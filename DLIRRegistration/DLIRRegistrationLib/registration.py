"""``registerVolumes``: register two volume nodes with a stage stack and put the results in the scene.

Runs in Slicer, in Slicer's Python console and in pytest on the slicer-core wheel: it uses the
scene and nodes it is given, never ``slicer.app``, ``slicer.modules`` or Qt.

Guarantees: the input nodes (volumes, segmentation) are only read; volumes the engine cannot use
(zero, negative or NaN spacing, NaN origin, a direction matrix that is not orthonormal, NaN or
infinite voxels, a constant or empty image) are refused with one sentence before anything touches
the scene; the engine runs before any output node is touched, and if anything fails or the user
cancels, every node this call created is removed again (existing nodes passed as outputs are
written only after the engine succeeded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
import SimpleITK as sitk

from dlir.errors import InputError
from dlir.io import check_image

from . import display
from .gridtransform import setRegistrationResult
from .scene import SceneChanges
from .segmentations import LabelLayer, exportLayers, fillSegmentation, newSegment
from .stacks import modalityWarning
from .volumes import VolumeGeometry, imageToVolumeNode, volumeGeometry, volumeNodeToImage

#: True: create a new node; False: skip this output; a node: write the output into it
OutputTarget = Union[bool, object]
FOLDING_SEGMENT_NAME = "Folding"
FOLDING_SEGMENT_ID = "Folding"


@dataclass
class OutputRequest:
    """Which outputs to produce (each True = new node, False = none, or an existing node to overwrite)."""

    transform: OutputTarget = True
    warpedVolume: OutputTarget = True
    jacobianVolume: OutputTarget = True
    foldingSegmentation: OutputTarget = True
    segmentation: OutputTarget = True  # only with a moving segmentation
    show: bool = True  # fixed in the background, Jacobian as foreground, segmentations visible


@dataclass
class RegistrationOutputs:
    """The nodes of one run (None where not asked for) and its numbers."""

    transformNode: object | None
    warpedVolumeNode: object | None
    jacobianVolumeNode: object | None
    foldingSegmentationNode: object | None
    segmentationNode: object | None
    device: str
    seconds: float
    foldingPercent: float  # share of fixed voxels with det J <= 0, in %
    foldingVolumeMm3: float
    jacobianStd: float
    warnings: list[str] = field(default_factory=list)
    registration: object | None = None  # the engine's dlir.register.Registration (LPS images)

    def summary(self) -> str:
        """The results line of the GUI."""
        return (f"{self.seconds:.1f} s on {self.device}; folding {self.foldingPercent:.3f} % "
                f"({self.foldingVolumeMm3:.1f} mm³); std of Jacobian {self.jacobianStd:.3f}")


def registerVolumes(
    scene,
    fixedVolumeNode,
    movingVolumeNode,
    stack,
    movingSegmentationNode=None,
    device: str = "auto",
    refineSteps: int = 0,
    progress: Callable[[str, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    outputs: OutputRequest | None = None,
    initialAlignment: str | None = None,
) -> RegistrationOutputs:
    """Register ``movingVolumeNode`` onto ``fixedVolumeNode`` and add the requested outputs to ``scene``.

    ``stack``: a loaded ``dlir.stack.Stack``, or a stack file path / registry name.
    ``device``: ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``.  ``refineSteps``:
    test-time optimiser steps after the networks.  ``progress(step, fraction)`` is called between
    steps and ``cancel()`` polled there (True -> :class:`dlir.errors.CancelledError`).
    ``initialAlignment`` (``centre``, ``com`` or ``none``) overrides the stack's initial alignment.

    Outputs, all on the fixed volume's world grid, in world RAS: a grid transform (fixed -> moving,
    *from parent*, so that it aligns the moving volume when set as its parent transform), the
    warped moving volume (linear), the Jacobian determinant map, a segmentation with a red
    "Folding" segment (det J <= 0), and the moving segmentation propagated (nearest neighbour).
    Errors are :class:`dlir.errors.DLIRError` subclasses with one sentence.
    """
    from dlir.register import register

    request = outputs or OutputRequest()
    start = time.perf_counter()
    if fixedVolumeNode is None or movingVolumeNode is None:
        raise InputError("choose a fixed and a moving volume")
    fixedImage = volumeNodeToImage(fixedVolumeNode, "fixed volume")
    movingImage = volumeNodeToImage(movingVolumeNode, "moving volume")
    # the engine's checks (NaN voxels, constant image, ...) before anything touches the scene
    check_image(fixedImage, f"fixed volume '{fixedVolumeNode.GetName()}'")
    check_image(movingImage, f"moving volume '{movingVolumeNode.GetName()}'")
    fixedGeometry = volumeGeometry(fixedVolumeNode, "fixed volume")
    loaded = _loadStack(stack)
    warnings = [w for w in (modalityWarning(loaded.manifest.modality, fixedImage, "fixed volume"),
                            modalityWarning(loaded.manifest.modality, movingImage, "moving volume")) if w]
    layers: list[LabelLayer] = []
    if movingSegmentationNode is not None and movingSegmentationNode.GetSegmentation().GetNumberOfSegments() > 0:
        layers = exportLayers(scene, movingSegmentationNode, volumeGeometry(movingVolumeNode, "moving volume"))

    result = register(fixedImage, movingImage, loaded, moving_labels=layers[0].image if layers else None,
                      device=device, refine=refine, initial_alignment=initialAlignment,
                      progress=progress, cancel=cancel, outputs=_engineOutputs(request, bool(layers)))

    created = SceneChanges(scene)
    try:
        nodes = _writeOutputs(scene, request, result, layers, fixedGeometry, fixedVolumeNode,
                              movingVolumeNode, movingSegmentationNode)
    except BaseException:
        created.undo()
        raise
    foldedVoxels = round(result.folding_fraction * int(np.prod(fixedImage.GetSize())))  # no Jacobian image needed
    return RegistrationOutputs(
        **nodes,
        device=result.device,
        seconds=time.perf_counter() - start,
        foldingPercent=100.0 * result.folding_fraction,
        foldingVolumeMm3=float(foldedVoxels) * fixedGeometry.voxelVolumeMm3(),
        jacobianStd=result.jacobian_std,
        warnings=warnings + list(result.warnings),
        registration=result,
    )


def _engineOutputs(request: OutputRequest, hasSegments: bool) -> list[str]:
    """What the engine computes for the ticked outputs (nothing else at full resolution)."""
    wanted = []
    if _asked(request.warpedVolume):
        wanted.append("warped")
    if hasSegments and _asked(request.segmentation):
        wanted.append("labels")
    if _asked(request.jacobianVolume) or _asked(request.foldingSegmentation):
        wanted.append("jacobian")
    return wanted  # the transform node is the compact transform: nothing at full resolution


def _asked(target: OutputTarget) -> bool:
    return target is not False and target is not None


def _loadStack(stack):
    from dlir.stack import Stack, load_stack

    if isinstance(stack, Stack):
        return stack
    if stack is None or str(stack) in ("", "."):
        raise InputError("choose a stage stack (none is selected)")
    return load_stack(stack)


def _outputNode(scene, target: OutputTarget, className: str, name: str):
    """The existing node ``target``, or a new node of ``className`` named ``name``; None when not asked for."""
    if target is False or target is None:
        return None
    if target is True:
        return scene.AddNewNodeByClass(className, name)
    return target


def _writeOutputs(scene, request: OutputRequest, result, layers: list[LabelLayer],
                  fixedGeometry: VolumeGeometry, fixedVolumeNode, movingVolumeNode, movingSegmentationNode) -> dict:
    moving, fixed = movingVolumeNode.GetName(), fixedVolumeNode.GetName()
    transformNode = _outputNode(scene, request.transform, "vtkMRMLTransformNode", f"{moving} to {fixed} (DLIR)")
    if transformNode is not None:
        setRegistrationResult(transformNode, result.itk_transform(), fixedVolumeNode, movingVolumeNode)

    warpedNode = _outputNode(scene, request.warpedVolume, "vtkMRMLScalarVolumeNode", f"{moving} warped (DLIR)")
    if warpedNode is not None:
        imageToVolumeNode(result.warped, warpedNode)
        if warpedNode.GetDisplayNode() is None:
            warpedNode.CreateDefaultDisplayNodes()

    jacobianNode = _outputNode(scene, request.jacobianVolume, "vtkMRMLScalarVolumeNode", f"{moving} Jacobian (DLIR)")
    if jacobianNode is not None:
        imageToVolumeNode(result.jacobian, jacobianNode)
        display.styleJacobian(jacobianNode, display.jacobianColorNode(scene))

    foldingNode = _outputNode(scene, request.foldingSegmentation, "vtkMRMLSegmentationNode", f"{moving} folding (DLIR)")
    if foldingNode is not None:
        folding = [(FOLDING_SEGMENT_ID, newSegment(FOLDING_SEGMENT_NAME, display.FOLDING_COLOR), 1)]
        fillSegmentation(foldingNode, [((sitk.GetArrayFromImage(result.jacobian) <= 0), folding)], fixedGeometry)

    segmentationNode = None
    if layers:
        name = f"{movingSegmentationNode.GetName()} on {fixed} (DLIR)"
        segmentationNode = _outputNode(scene, request.segmentation, "vtkMRMLSegmentationNode", name)
    if segmentationNode is not None:
        fillSegmentation(segmentationNode, _propagatedSegments(result, layers, movingSegmentationNode, fixedVolumeNode),
                         fixedGeometry)

    if request.show:
        display.showInSliceViews(scene, fixedVolumeNode, jacobianNode,
                                 [n for n in (foldingNode, segmentationNode) if n is not None])
    return {"transformNode": transformNode, "warpedVolumeNode": warpedNode, "jacobianVolumeNode": jacobianNode,
            "foldingSegmentationNode": foldingNode, "segmentationNode": segmentationNode}


def _propagatedSegments(result, layers: list[LabelLayer], movingSegmentationNode, fixedVolumeNode) -> list[tuple[np.ndarray, list]]:
    """Every layer warped onto the fixed grid, with (segment ID, source segment, label) of its segments.

    Layer 0 is the engine's own label warp; further layers (overlapping segments) are warped with
    the same displacement by ITK's nearest-neighbour resampling.
    """
    source = movingSegmentationNode.GetSegmentation()
    reference = result.warped_labels if result.warped_labels is not None else volumeNodeToImage(fixedVolumeNode, "fixed volume")
    warpedLayers = []
    for index, layer in enumerate(layers):
        if index == 0:
            warped = result.warped_labels
        else:
            warped = sitk.Resample(layer.image, reference, result.itk_transform(), sitk.sitkNearestNeighbor, 0)
        segments = [(segmentId, source.GetSegment(segmentId), value) for value, segmentId in enumerate(layer.segmentIds, start=1)]
        warpedLayers.append((sitk.GetArrayFromImage(warped), segments))
    return warpedLayers
