"""``registerVolumes``: register two volume nodes with a stage stack and put the results in the scene.

Runs in Slicer, in Slicer's Python console and in pytest on the slicer-core wheel: it uses the
scene and nodes it is given, never ``slicer.app``, ``slicer.modules`` or Qt.

Two modes: *fast* runs the stack's networks once (about a second on a CPU); *accurate* then
optimises the whole transform on the pair itself, coarse to fine, to convergence, without folding
(the engine's ``refine="auto"``: a few seconds per pair on a CPU).  An optional fixed mask (a
segment of a segmentation, or a label-map volume, on any grid) is carried onto the fixed volume's
grid; accurate mode measures similarity only inside it, and the folding and Jacobian numbers are
taken inside it.

Guarantees: the input nodes (volumes, segmentations, mask) are only read; an unknown mode, a mask
that does not overlap the fixed volume and volumes the engine cannot use (zero, negative or NaN
spacing, NaN origin, a direction matrix that is not orthonormal, NaN or infinite voxels, a
constant or empty image) are refused with one sentence before anything touches the scene; the
engine runs before any output node is touched, and if anything fails or the user cancels, every
node this call created is removed again (existing nodes passed as outputs are written only after
the engine succeeded).
"""

from __future__ import annotations

import numbers
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
from .segmentations import LabelLayer, exportLayers, exportMask, fillSegmentation, newSegment
from .stacks import modalityWarning
from .volumes import VolumeGeometry, imageToVolumeNode, maskOnGrid, volumeGeometry, volumeNodeToImage

#: True: create a new node; False: skip this output; a node: write the output into it
OutputTarget = Union[bool, object]
FOLDING_SEGMENT_NAME = "Folding"
FOLDING_SEGMENT_ID = "Folding"
#: ``fast``: the networks alone, one shot; ``accurate``: then instance optimisation to convergence
MODES = ("fast", "accurate")


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
    foldingPercent: float  # share of fixed voxels (inside the fixed mask when given) with det J <= 0, in %
    foldingVolumeMm3: float
    jacobianStd: float  # inside the fixed mask when given
    warnings: list[str] = field(default_factory=list)
    registration: object | None = None  # the engine's dlir.register.Registration (LPS images)
    masked: bool = False  # the numbers are taken inside a fixed mask

    def summary(self) -> str:
        """The results line of the GUI (with the optimisation's levels, steps and final loss in accurate mode)."""
        where = " in the mask" if self.masked else ""
        line = (f"{self.seconds:.1f} s on {self.device}; folding{where} {self.foldingPercent:.3f} % "
                f"({self.foldingVolumeMm3:.1f} mm³); std of Jacobian{where} {self.jacobianStd:.3f}")
        contrast = getattr(self.registration, "contrast", None)
        if contrast is not None:
            line += f"; {contrast.sentence()}"
        refinement = getattr(self.registration, "refinement", None)
        if refinement:
            line += (f"; optimised over {len(refinement['steps'])} level(s) in {int(sum(refinement['steps']))} steps, "
                     f"final loss {refinement['loss'][-1]:.4f}")
        return line


def registerVolumes(
    scene,
    fixedVolumeNode,
    movingVolumeNode,
    stack,
    movingSegmentationNode=None,
    device: str = "auto",
    mode: str = "fast",
    refineSteps: int = 0,
    fixedMaskNode=None,
    fixedMaskSegmentId: str | None = None,
    initialAlignment: str | None = None,
    progress: Callable[[str, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    outputs: OutputRequest | None = None,
    similarity: str = "auto",
) -> RegistrationOutputs:
    """Register ``movingVolumeNode`` onto ``fixedVolumeNode`` and add the requested outputs to ``scene``.

    ``stack``: a loaded ``dlir.stack.Stack``, or a stack file path / registry name.
    ``device``: ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``.
    ``mode``: ``fast`` (the networks, one shot) or ``accurate`` (then instance optimisation of the
    whole transform, coarse to fine, to convergence, never folding).  ``refineSteps`` (for
    experiments): 0 follows ``mode``; N > 0 runs N optimiser steps at the finest level instead.
    ``fixedMaskNode``: optional segmentation (``fixedMaskSegmentId`` = its segment, None = the
    union of all its segments) or label-map volume (non-zero = inside), on any grid, in world
    coordinates; see :func:`fixedMaskImage`.
    ``initialAlignment``: one of ``dlir.choices.ALIGNMENT_MODES`` (None = the engine's default, ``search``: the
    capture search of ``dlir.alignment``).  ``progress(step, fraction)`` is called between steps, and in
    accurate mode after every optimiser step with a step like ``refine (accurate): level 2/3,
    step 14, loss -0.9981``; ``cancel()`` is polled there (True -> :class:`dlir.errors.CancelledError`).
    ``similarity``: one of ``dlir.choices.SIMILARITY_CHOICES``: ``same`` (one contrast: NCC), ``different`` (MR and
    CT, T1 and T2: MIND-SSC) or ``auto`` (decided from the volumes; the choice and why are in the summary line).

    Outputs, all on the fixed volume's world grid, in world RAS: a grid transform (fixed -> moving,
    *from parent*, so that it aligns the moving volume when set as its parent transform), the
    warped moving volume (linear), the Jacobian determinant map, a segmentation with a red
    "Folding" segment (det J <= 0), and the moving segmentation propagated (nearest neighbour).
    Errors are :class:`dlir.errors.DLIRError` subclasses with one sentence.
    """
    job = prepareRegistration(scene, fixedVolumeNode, movingVolumeNode, stack, movingSegmentationNode, device, mode,
                              refineSteps, fixedMaskNode, fixedMaskSegmentId, initialAlignment, outputs, similarity)
    job.compute(progress, cancel)
    return job.addToScene()


@dataclass
class RegistrationJob:
    """One registration in three steps, for front ends that run the engine off their event loop.

    :func:`prepareRegistration` (reads the scene: checks, mask, segment layers) and
    :meth:`addToScene` (writes it) run on the thread that owns the scene; :meth:`compute` (the
    engine, seconds to minutes) touches no node and may run on a worker thread in between.
    :func:`registerVolumes` is the three steps in a row.
    """

    scene: object
    fixedVolumeNode: object
    movingVolumeNode: object
    movingSegmentationNode: object
    request: OutputRequest
    fixedImage: sitk.Image
    movingImage: sitk.Image
    fixedGeometry: VolumeGeometry
    mask: sitk.Image | None
    stack: object  # the loaded dlir.stack.Stack
    layers: list[LabelLayer]
    refine: int | str
    device: str
    initialAlignment: str | None
    warnings: list[str]
    start: float
    similarity: str = "auto"  # dlir.choices.SIMILARITY_CHOICES
    result: object | None = None  # the engine's dlir.register.Registration, once computed

    def compute(self, progress: Callable[[str, float], None] | None = None, cancel: Callable[[], bool] | None = None) -> None:
        """Run the engine (no scene access); ``progress``/``cancel`` as for :func:`registerVolumes`."""
        from dlir.register import register

        self.result = register(self.fixedImage, self.movingImage, self.stack,
                               moving_labels=self.layers[0].image if self.layers else None, fixed_mask=self.mask,
                               device=self.device, refine=self.refine, initial_alignment=self.initialAlignment,
                               similarity=self.similarity,
                               progress=progress, cancel=cancel, outputs=_engineOutputs(self.request, bool(self.layers)))

    def addToScene(self) -> RegistrationOutputs:
        """Write the computed result into the scene as :func:`registerVolumes` does (all or nothing)."""
        if self.result is None:
            raise RuntimeError("addToScene() before compute()")
        result = self.result
        created = SceneChanges(self.scene)
        try:
            nodes = _writeOutputs(self.scene, self.request, result, self.layers, self.fixedGeometry, self.fixedVolumeNode,
                                  self.movingVolumeNode, self.movingSegmentationNode)
        except BaseException:
            created.undo()
            raise
        foldedVoxels = round(result.folding_fraction * _countedVoxels(self.fixedImage, self.mask))  # no Jacobian image needed
        return RegistrationOutputs(
            **nodes,
            device=result.device,
            seconds=time.perf_counter() - self.start,
            foldingPercent=100.0 * result.folding_fraction,
            foldingVolumeMm3=float(foldedVoxels) * self.fixedGeometry.voxelVolumeMm3(),
            jacobianStd=result.jacobian_std,
            warnings=self.warnings + list(result.warnings),
            registration=result,
            masked=self.mask is not None,
        )


def prepareRegistration(
    scene,
    fixedVolumeNode,
    movingVolumeNode,
    stack,
    movingSegmentationNode=None,
    device: str = "auto",
    mode: str = "fast",
    refineSteps: int = 0,
    fixedMaskNode=None,
    fixedMaskSegmentId: str | None = None,
    initialAlignment: str | None = None,
    outputs: OutputRequest | None = None,
    similarity: str = "auto",
) -> RegistrationJob:
    """The first step of :func:`registerVolumes` (same arguments): check the inputs, load the stack, export the mask
    and the moving segments; refuses what the engine cannot use with one sentence, and leaves the scene as it was."""
    request = outputs or OutputRequest()
    start = time.perf_counter()
    refine = engineRefinement(mode, refineSteps)
    fixedImage, movingImage, fixedGeometry = _checkedVolumes(fixedVolumeNode, movingVolumeNode)
    mask = None
    if fixedMaskNode is not None:
        mask = fixedMaskImage(scene, fixedMaskNode, fixedMaskSegmentId, fixedImage, fixedGeometry, fixedVolumeNode.GetName())
    loaded = _loadStack(stack)
    warnings = [w for w in (modalityWarning(loaded.manifest.modality, fixedImage, "fixed volume"),
                            modalityWarning(loaded.manifest.modality, movingImage, "moving volume")) if w]
    layers = _movingLayers(scene, movingSegmentationNode, movingVolumeNode)
    return RegistrationJob(scene, fixedVolumeNode, movingVolumeNode, movingSegmentationNode, request, fixedImage,
                           movingImage, fixedGeometry, mask, loaded, layers, refine, device, initialAlignment, warnings, start,
                           similarity)


def _checkedVolumes(fixedVolumeNode, movingVolumeNode) -> tuple[sitk.Image, sitk.Image, VolumeGeometry]:
    """(fixed image, moving image, fixed volume's world RAS geometry): the volumes as LPS images, refused with one
    sentence when missing or unusable by the engine (NaN voxels, constant image, ...), before anything touches the
    scene."""
    if fixedVolumeNode is None or movingVolumeNode is None:
        raise InputError("choose a fixed and a moving volume")
    fixedImage = volumeNodeToImage(fixedVolumeNode, "fixed volume")
    movingImage = volumeNodeToImage(movingVolumeNode, "moving volume")
    check_image(fixedImage, f"fixed volume '{fixedVolumeNode.GetName()}'")
    check_image(movingImage, f"moving volume '{movingVolumeNode.GetName()}'")
    return fixedImage, movingImage, volumeGeometry(fixedVolumeNode, "fixed volume")


def _movingLayers(scene, movingSegmentationNode, movingVolumeNode) -> list[LabelLayer]:
    """The moving segmentation as label layers on the moving volume's grid; none without segments."""
    if movingSegmentationNode is None or movingSegmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
        return []
    return exportLayers(scene, movingSegmentationNode, volumeGeometry(movingVolumeNode, "moving volume"))


def _countedVoxels(fixedImage: sitk.Image, mask: sitk.Image | None) -> int:
    """The fixed voxels the folding fraction counts: all of them, or those inside the mask."""
    if mask is None:
        return int(np.prod(fixedImage.GetSize()))
    return int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))


def engineRefinement(mode: str, refineSteps: int = 0) -> int | str:
    """The engine's ``refine`` for a mode: 0 (fast), ``"auto"`` (accurate), or ``refineSteps`` when > 0."""
    if mode not in MODES:
        raise InputError(f"unknown registration mode {mode!r}: choose 'fast' or 'accurate'")
    if isinstance(refineSteps, bool) or not isinstance(refineSteps, numbers.Integral) or refineSteps < 0:
        raise InputError(f"the refinement steps must be a whole number >= 0 (0: as the mode says), not {refineSteps!r}")
    if refineSteps > 0:
        return int(refineSteps)
    return "auto" if mode == "accurate" else 0


def fixedMaskImage(scene, maskNode, segmentId: str | None, fixedImage: sitk.Image, fixedGeometry: VolumeGeometry,
                   fixedName: str) -> sitk.Image:
    """The fixed mask as a 0/1 image on the fixed grid (LPS, ``fixedImage``'s geometry), for ``register(fixed_mask=...)``.

    ``maskNode``: a segmentation (segment ``segmentId``; None = the union of all its segments),
    exported by Slicer's segmentation logic onto the fixed volume's world RAS grid
    ``fixedGeometry``; or a label-map volume (non-zero = inside) on any grid, resampled
    (nearest neighbour, world coordinates) onto ``fixedImage``'s grid.  Parent transforms of the
    mask node are honoured as for the volumes.  A mask with no voxel in the fixed volume is refused
    with one sentence.  The node is only read; temporary nodes are removed again.
    """
    name = maskNode.GetName()
    if maskNode.IsA("vtkMRMLSegmentationNode"):
        segmentation = maskNode.GetSegmentation()
        if segmentId:
            if segmentation.GetSegment(segmentId) is None:
                raise InputError(f"the fixed mask '{name}' has no segment '{segmentId}'; choose one of its segments")
            segmentIds = [segmentId]
            what = f"segment '{segmentation.GetSegment(segmentId).GetName()}' of the fixed mask '{name}'"
        else:
            segmentIds = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
            what = f"fixed mask '{name}'"
        if not segmentIds:
            raise InputError(f"the fixed mask '{name}' has no segment; draw one on the fixed volume or choose no mask")
        inside = exportMask(scene, maskNode, segmentIds, fixedGeometry)
    elif maskNode.IsA("vtkMRMLScalarVolumeNode"):
        what = f"fixed mask '{name}'"
        inside = maskOnGrid(maskNode, fixedImage, "fixed mask")
    else:
        raise InputError(f"the fixed mask '{name}' is neither a segmentation nor a label-map volume")
    if not inside.any():
        raise InputError(f"the {what} does not overlap the fixed volume '{fixedName}'; "
                         "choose a mask drawn on the fixed volume, or none")
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(fixedImage)
    return mask


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
                                 [n for n in (foldingNode, segmentationNode) if n is not None],
                                 movingSegmentationNode if segmentationNode is not None else None)
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
