"""The page's logic without the page: chosen inputs as nodes, one registration at a time, its files, the views.

Everything that touches the scene runs on the server's event loop (the thread that owns the
scene and renders the views); only the engine and the file writer run on a worker thread
(:meth:`Session.register`).  Registration itself is ``DLIRRegistrationLib.registration``'s
``prepareRegistration`` -> ``RegistrationJob.compute`` -> ``addToScene``, exactly what
``registerVolumes`` does in Slicer; the result files are written by the engine's own writer
(``dlir.outputs.write_pair``), the one ``dlir register`` uses.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from dlir.choices import FILE_OUTPUTS
from dlir.errors import DLIRError, InputError

from . import inputs

#: the inputs a user chooses, and what the engine's messages call them
ROLES = {"fixed": "fixed image", "moving": "moving image", "movingLabels": "moving label map",
         "fixedMask": "fixed mask", "fixedLabels": "fixed label map"}
#: what the views show: the pair as given, the fixed with the warped moving, the Jacobian map with folding
VIEWS = ("before", "after", "jacobian")
BUSY = "a registration is running; wait for it to finish or press Cancel"
#: the contrast choice (the engine's ``similarity``, :data:`dlir.choices.SIMILARITY_CHOICES`) and its words, those of
#: the DLIR Registration module's chooser
CONTRASTS = {"auto": "Automatic", "same": "Same contrast", "different": "Different contrasts"}


@dataclass
class Result:
    """The last registration: its nodes (``DLIRRegistrationLib.registration.RegistrationOutputs``), files and numbers."""

    outputs: object
    folder: Path
    files: list[str]
    summary: str
    dice: dict[str, dict[str, float]] = field(default_factory=dict)


class Session:
    """The chosen inputs, the running registration and its result, in one scene."""

    def __init__(self, scene, files: inputs.InputFiles, resultsFolder: Path, modelDirs: tuple[Path, ...] = (),
                 resetViews: Callable[[], None] = lambda: None) -> None:
        from DLIRRegistrationLib.stacks import StackCache

        self.scene = scene
        self.files = files
        self.resultsFolder = resultsFolder
        self.modelDirs = modelDirs
        self.resetViews = resetViews
        self.keys: dict[str, str] = {}  # role -> chosen key
        self.nodes: dict[str, object] = {}  # role -> node
        self.images: dict[str, sitk.Image] = {}  # label roles -> image as read (for Dice in result.json)
        self.stacks = StackCache()
        self.running = False
        self.cancelRequested = False
        self.result: Result | None = None
        self._runs = itertools.count(1)

    # ------------------------------------------------------------------ inputs
    def stackChoices(self) -> list[dict[str, str]]:
        """The registry's stacks: ``{"title": one-line summary, "value": file path, "description": the manifest's}``."""
        from DLIRRegistrationLib.stacks import listStacks, stackSummary

        return [{"title": stackSummary(info), "value": str(info.path), "description": info.manifest.description}
                for info in listStacks(self.modelDirs)]

    def choose(self, role: str, key: str | None) -> None:
        """Read ``key``'s file as ``role`` into the scene (replacing the earlier choice; None clears it).

        Refused with the command line's sentence when the file is not a usable image; the earlier
        result is removed, since it no longer belongs to the inputs.
        """
        if self.running:
            raise InputError(BUSY)
        if role not in ROLES:
            raise InputError(f"unknown input {role!r}")
        try:
            node, labels = self._read(role, key)
        except DLIRError as error:
            raise InputError(self.files.asShown(str(error))) from error
        self.clearResult()
        old = self.nodes.pop(role, None)
        if old is not None and self.scene.IsNodePresent(old):
            self.scene.RemoveNode(old)
        self.keys.pop(role, None)
        self.images.pop(role, None)
        if key:
            self.keys[role] = key
        if node is not None:
            self.nodes[role] = node
        if labels is not None:
            self.images[role] = labels
        if role in ("fixed", "moving") and "fixed" in self.nodes:
            self.show("before", 0.5)
            if role == "fixed":
                self.resetViews()

    def _read(self, role: str, key: str | None) -> tuple[object | None, sitk.Image | None]:
        """(node, label image) of ``key``'s file read as ``role``; (None, None) for no key."""
        node, labels = None, None
        if key:
            path = self.files.path(key)
            what = ROLES[role]
            if role in ("fixed", "moving"):
                node = inputs.volumeNode(self.scene, inputs.readVolume(path, what), f"{role} {path.name}")
            else:
                labels = inputs.readLabels(path, what)
                if role == "movingLabels":
                    node = inputs.segmentationNode(self.scene, labels, f"moving segmentation {path.name}",
                                                   sampleNames=key.startswith("sample:"))
                elif role == "fixedMask":
                    node = inputs.volumeNode(self.scene, labels, f"fixed mask {path.name}", "vtkMRMLLabelMapVolumeNode")
        return node, labels

    def chooseSamplePair(self) -> None:
        """The bundled pair: fixed, moving, the moving labels (propagated) and the fixed labels (Dice)."""
        for role, key in (("fixed", inputs.SAMPLE_FIXED), ("moving", inputs.SAMPLE_MOVING),
                          ("movingLabels", inputs.SAMPLE_MOVING_LABELS), ("fixedLabels", inputs.SAMPLE_FIXED_LABELS),
                          ("fixedMask", None)):
            self.choose(role, key)

    # ------------------------------------------------------------------ registering
    async def register(self, stack: str, mode: str, progress: Callable[[str, float], None], contrast: str = "auto") -> Result:
        """Register the chosen pair with ``stack`` (a registry path or name) in ``mode`` (fast / accurate), comparing the
        images as ``contrast`` says (a key of :data:`CONTRASTS`: automatic, the same or different contrasts).

        One at a time: a second call while one runs is refused with a sentence.  The engine and the
        file writer run on a worker thread; ``progress(step, fraction)`` is called on the event
        loop.  Cancel with :meth:`cancel` (:class:`dlir.errors.CancelledError`, nothing left behind).
        """
        from DLIRRegistrationLib.registration import OutputRequest, prepareRegistration

        if self.running:
            raise InputError(BUSY)
        if "fixed" not in self.nodes or "moving" not in self.nodes:
            raise InputError("choose a fixed and a moving image first (or the sample pair)")
        if "fixedLabels" in self.images and "movingLabels" not in self.nodes:
            raise InputError("fixed labels give Dice only with moving labels; choose a moving label map too")
        if contrast not in CONTRASTS:
            raise InputError(f"unknown contrast choice {contrast!r}: choose {', '.join(CONTRASTS)}")
        self.running, self.cancelRequested = True, False
        try:
            self.clearResult()
            job = prepareRegistration(self.scene, self.nodes["fixed"], self.nodes["moving"],
                                      self.stacks.get(stack, self.modelDirs), self.nodes.get("movingLabels"),
                                      device="auto", mode=mode, fixedMaskNode=self.nodes.get("fixedMask"),
                                      outputs=OutputRequest(show=False), similarity=contrast)
            folder = self.resultsFolder / f"run-{next(self._runs)}"
            folder.mkdir()
            loop = asyncio.get_running_loop()

            def report(step: str, fraction: float) -> None:
                loop.call_soon_threadsafe(progress, step, fraction)

            def work() -> dict:
                job.compute(report, lambda: self.cancelRequested)
                return self._writeFiles(job, folder)

            written = await loop.run_in_executor(None, work)
            outputs = job.addToScene()
        finally:
            self.running = False
        self.result = Result(outputs, folder, sorted(p.name for p in folder.iterdir()), outputs.summary(),
                             dict(written.get("dice", {})))
        return self.result

    def cancel(self) -> None:
        """Ask the running registration to stop at its next step."""
        self.cancelRequested = True

    def _writeFiles(self, job, folder: Path) -> dict:
        """The downloads, written by ``dlir register``'s writer; returns ``result.json``'s contents.

        The Lib numbers the moving segments 1..n for the engine; ``labels.nii.gz`` (and Dice) get the label values
        of the moving label map back, as ``dlir register`` keeps them.
        """
        from dlir.outputs import ComputedPair, write_pair

        registration = job.result
        if registration.warped_labels is not None and job.layers:
            segmentation = self.nodes["movingLabels"].GetSegmentation()
            values = [segmentation.GetSegment(i).GetLabelValue() for i in job.layers[0].segmentIds]
            registration = replace(registration, warped_labels=relabelled(registration.warped_labels, values,
                                                                                          self.images["movingLabels"]))
        pair = ComputedPair(registration, self.files.path(self.keys["fixed"]).name,
                            self.files.path(self.keys["moving"]).name, FILE_OUTPUTS, 0.0,
                            self.images.get("movingLabels"), self.images.get("fixedLabels"))
        return write_pair(folder, pair)

    def clearResult(self) -> None:
        """Remove the last result's nodes (its files stay until the server stops)."""
        if self.result is None:
            return
        outputs = self.result.outputs
        for node in (outputs.transformNode, outputs.warpedVolumeNode, outputs.jacobianVolumeNode,
                     outputs.foldingSegmentationNode, outputs.segmentationNode):
            if node is not None and self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
        self.result = None

    # ------------------------------------------------------------------ views
    def show(self, view: str, opacity: float) -> None:
        """Set the slice views: ``before`` (moving over fixed), ``after`` (warped over fixed, propagated segment
        outlines) or ``jacobian`` (the Lib's Jacobian overlay with folding in red and the outlines), the overlay at
        ``opacity`` (0..1; the Jacobian keeps the module's opacity)."""
        from DLIRRegistrationLib import display

        fixed = self.nodes.get("fixed")
        if fixed is None or view not in VIEWS:
            return
        outputs = self.result.outputs if self.result is not None else None
        if outputs is None or view == "before":
            display.showInSliceViews(self.scene, fixed, self.nodes.get("moving"), [n for n in [self.nodes.get("movingLabels")] if n])
            segmentations, overlayOpacity = [self.nodes.get("movingLabels")], opacity
        elif view == "after":
            display.showInSliceViews(self.scene, fixed, outputs.warpedVolumeNode, [outputs.segmentationNode] if outputs.segmentationNode else [],
                                     self.nodes.get("movingLabels") if outputs.segmentationNode else None)
            segmentations, overlayOpacity = [outputs.segmentationNode], opacity
        else:
            shown = [n for n in (outputs.foldingSegmentationNode, outputs.segmentationNode) if n is not None]
            display.showInSliceViews(self.scene, fixed, outputs.jacobianVolumeNode, shown,
                                     self.nodes.get("movingLabels") if outputs.segmentationNode else None)
            segmentations, overlayOpacity = shown, display.FOREGROUND_OPACITY
        self._setOpacity(overlayOpacity)
        self._showOnly(segmentations)

    def show3D(self) -> None:
        """The propagated segments as surfaces in the 3D view (Slicer's closed-surface representation)."""
        node = self.result.outputs.segmentationNode if self.result is not None else None
        if node is not None:
            node.CreateClosedSurfaceRepresentation()
            node.GetDisplayNode().SetVisibility3D(True)

    def _setOpacity(self, opacity: float) -> None:
        composites = self.scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        for index in range(composites.GetNumberOfItems()):
            composites.GetItemAsObject(index).SetForegroundOpacity(min(max(float(opacity), 0.0), 1.0))

    def _showOnly(self, segmentations: list) -> None:
        """Show these segmentation nodes (as styled by the Lib) and hide every other one in the slice views."""
        nodes = self.scene.GetNodesByClass("vtkMRMLSegmentationNode")
        for index in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(index)
            if node.GetDisplayNode() is not None:
                node.GetDisplayNode().SetVisibility2D(node.GetID() in {n.GetID() for n in segmentations if n is not None})

    def segmentLegend(self) -> list[dict[str, object]]:
        """The propagated segments' names and colours (0..255 RGB), for the page's legend."""
        node = self.result.outputs.segmentationNode if self.result is not None else None
        if node is None:
            return []
        segmentation = node.GetSegmentation()
        legend = []
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            legend.append({"name": segment.GetName(), "rgb": [round(255 * c) for c in segment.GetColor()]})
        return legend

    def numbers(self) -> dict[str, object]:
        """The result's numbers for the page: the module's results line, and Dice before -> after per label."""
        if self.result is None:
            return {}
        return {"summary": self.result.summary, "dice": dict(self.result.dice)}


def relabelled(labels: sitk.Image, values: list[int], like: sitk.Image) -> sitk.Image:
    """``labels`` (0, 1..n) with label k replaced by ``values[k - 1]`` (0 stays 0), in the voxel type of the label map
    ``like`` the values come from (as the engine keeps it); same geometry."""
    lookup = np.array([0, *values], dtype=sitk.GetArrayViewFromImage(like).dtype)
    image = sitk.GetImageFromArray(lookup[sitk.GetArrayViewFromImage(labels).astype(np.int64)])
    image.CopyInformation(labels)
    return image
