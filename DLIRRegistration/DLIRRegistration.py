"""DLIR Registration: register a moving volume onto a fixed one with a trained DLIR stage stack.

Two modes: Fast (the stack's networks, one shot) and Accurate (then the whole transform optimised
on the pair, coarse to fine, to convergence, never folding), with an optional fixed mask (a
segment or a label-map volume) and a choice of initial alignment.  Outputs (each optional): the
transform (fixed -> moving, from parent), the warped moving volume, the Jacobian-determinant map
shown over the fixed volume, folding as a red segment, and the moving segmentation propagated
onto the fixed volume.

Everything but the GUI lives in the Qt-free ``DLIRRegistrationLib`` (tested with pytest on the
slicer-core wheel); this file holds the Slicer module, its parameter node, a thin Widget, a thin
Logic and the in-Slicer self-test.  PyTorch comes from the PyTorch extension (SlicerPyTorch) and
the other engine dependencies from ``Resources/requirements.txt``, installed on first use.
"""

import enum
import os
import pathlib
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTransformNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from dlir.choices import ALIGNMENT_MODES, STACK_SUFFIX

#: oldest PyTorch the engine is meant for (installed through the PyTorch extension)
TORCH_REQUIREMENT = ">=2.1"
SAMPLE_CATEGORY = "DLIR"
SAMPLE_NAME = "DLIRSamplePair"


#
# DLIRRegistration
#
class DLIRRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DLIR Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["DLIR contributors"]
        self.parent.helpText = _(
            "Register a moving volume onto a fixed volume with a trained DLIR stage stack (unsupervised deep-learning "
            "image registration: an affine ConvNet, then B-spline ConvNets coarse to fine).<br>"
            "<b>Fast</b> runs the networks once (about a second per pair on a CPU, milliseconds on a GPU): for "
            "interactive work and for cohorts. <b>Accurate</b> then optimises the whole transform on this pair, coarse "
            "to fine until it converges, and never folds (a few seconds per pair on a CPU): for label propagation you "
            "must trust. An optional <b>fixed mask</b> (a segment, or a label-map volume) restricts the similarity "
            "measured in Accurate mode to the region you care about; the folding and Jacobian numbers are then taken "
            "inside it. <b>Contrast</b>: volumes of the same contrast are compared by their intensities, volumes of "
            "different contrasts (MR and CT, T1 and T2) by their local structure (MIND descriptors); Automatic decides "
            "from the volumes and the results line says which it chose.<br>"
            "Outputs: a transform (apply it to the moving volume or its segmentations), the warped volume, a "
            "Jacobian-determinant map (1: volume kept; folding, det &lt;= 0, as a red segment) and the moving "
            "segmentation propagated onto the fixed volume. <i>Advanced</i> holds the device, the initial alignment "
            "and, for experiments, a fixed number of optimiser steps. Documentation: "
            "<a href=\"https://github.com/dlir-slicer/SlicerDLIR\">SlicerDLIR</a>."
        )
        self.parent.acknowledgementText = _(
            "Method: B.D. de Vos, F.F. Berendsen, M.A. Viergever, H. Sokooti, M. Staring, I. Isgum, A deep learning "
            "framework for unsupervised affine and deformable image registration, Medical Image Analysis 52 (2019) "
            "128-143. Sample data: MNI ICBM152 2009a template (Fonov et al., NeuroImage 2011)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", observeSceneImports)


def observeSceneImports() -> None:
    """Saved DLIR results reload as they were saved: after every scene import, DLIR's transform nodes get their
    linear grid interpolation back (Slicer's reader would make it cubic; see gridtransform.restoreLinearInterpolation)."""
    from DLIRRegistrationLib import gridtransform

    gridtransform.observeSceneImports(slicer.mrmlScene)


#
# Sample data
#
def registerSampleData() -> None:
    """Register the bundled sample pair (fixed, moving, moving segmentation; local files) in Sample Data."""
    import SampleData

    from DLIRRegistrationLib import samplepair

    folder = samplepair.sampleDataFolder()
    files = [samplepair.FIXED_FILE, samplepair.MOVING_FILE, samplepair.MOVING_LABELS_FILE]
    if not all((folder / name).is_file() for name in files):
        return
    SampleData.SampleDataLogic.registerCustomSampleDataCategory(SAMPLE_CATEGORY, title=_("DLIR"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName=SAMPLE_NAME,
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons", "DLIRRegistration.png"),
        uris=[(folder / name).as_uri() for name in files],
        fileNames=[f"DLIR-{name}" for name in files],
        nodeNames=["DLIR sample fixed", "DLIR sample moving", "DLIR sample moving segmentation"],
        loadFileTypes=["VolumeFile", "VolumeFile", "SegmentationFile"],
        checksums=[f"SHA256:{samplepair.sha256(folder / name)}" for name in files],
    )


#
# Parameter node
#
class RegistrationMode(enum.Enum):
    """The main choice; the value is ``registerVolumes``' ``mode``."""

    FAST = "fast"
    ACCURATE = "accurate"

    def label(self) -> str:
        """The text in the mode chooser."""
        return _("Fast (one shot)") if self is RegistrationMode.FAST else _("Accurate (optimised on this pair)")


class Contrast(enum.Enum):
    """Same or different contrasts; the value is ``registerVolumes``' ``similarity`` (``dlir.choices.SIMILARITY_CHOICES``)."""

    AUTO = "auto"
    SAME = "same"
    DIFFERENT = "different"

    def label(self) -> str:
        """The text in the contrast chooser."""
        return {"auto": _("Automatic"), "same": _("Same contrast"), "different": _("Different contrasts")}[self.value]


class _AlignmentChoice(enum.Enum):
    """The behaviour of :data:`InitialAlignment`, whose members are made from the engine's list."""

    def label(self) -> str:
        """The text in the initial-alignment chooser (the engine's name for a mode this list does not know)."""
        return {
            "search": _("Automatic (search: any position, two subjects)"),
            "centre": _("Image centres"),
            "com": _("Centres of mass"),
            "moments": _("Centres of mass and principal axes"),
            "none": _("None (as placed)"),
        }.get(self.value, self.value)

    def engineValue(self) -> str:
        """The engine's name of the alignment."""
        return self.value


#: How the moving volume is placed before the networks: one member per ``dlir.choices.ALIGNMENT_MODES`` (SEARCH,
#: CENTRE, COM, MOMENTS, NONE); ``engineValue`` is ``registerVolumes``' ``initialAlignment``.
InitialAlignment = _AlignmentChoice(
    "InitialAlignment", [(mode.upper(), mode) for mode in ALIGNMENT_MODES], module=__name__)


@parameterNodeWrapper
class DLIRRegistrationParameterNode:
    """The GUI's state, saved with the scene. Output nodes left empty are created at each run.

    ``fixedMaskSegmentId`` is the segment of ``fixedMask`` when that is a segmentation (kept in step
    with the segment selector by the Widget; empty: every segment).
    """

    mode: RegistrationMode = RegistrationMode.FAST
    contrast: Contrast = Contrast.AUTO
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    movingSegmentation: vtkMRMLSegmentationNode
    fixedMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    fixedMaskSegmentId: str = ""
    stackPath: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    initialAlignment: InitialAlignment = InitialAlignment.SEARCH
    refineSteps: Annotated[int, WithinRange(0, 1000)] = 0
    createTransform: bool = True
    createWarpedVolume: bool = True
    createJacobian: bool = True
    createFolding: bool = True
    createSegmentation: bool = True
    outputTransform: vtkMRMLTransformNode
    outputWarpedVolume: vtkMRMLScalarVolumeNode
    outputJacobianVolume: vtkMRMLScalarVolumeNode
    outputFoldingSegmentation: vtkMRMLSegmentationNode
    outputSegmentation: vtkMRMLSegmentationNode


#
# DLIRRegistrationWidget
#
class DLIRRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the GUI to the parameter node and the Logic; no registration logic here."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DLIRRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DLIRRegistrationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.refreshStacksButton.connect("clicked(bool)", self.onRefreshStacks)
        self.ui.addStackButton.connect("clicked(bool)", self.onAddStack)
        self.ui.stackComboBox.connect("currentIndexChanged(int)", self.onStackChanged)
        self.ui.fixedMaskSegmentSelector.connect("currentSegmentChanged(QString)", self.onFixedMaskSegmentChanged)

        self.initializeParameterNode()
        if self.logic.dependenciesInstalled():
            self.refreshStacks()
        else:
            self.ui.stackDetailsLabel.text = _("PyTorch and the DLIR engine's packages are installed when you press Refresh or Apply.")
        self.updateButtons()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------------------ parameters
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.selectStack(self._parameterNode.stackPath)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self.updateFixedMaskSegmentSelector()
        self.updateButtons()

    def updateFixedMaskSegmentSelector(self) -> None:
        """Show the segment selector only for a segmentation mask, on that segmentation and the saved segment."""
        p = self._parameterNode
        segmentation = p.fixedMask if p and p.fixedMask is not None and p.fixedMask.IsA("vtkMRMLSegmentationNode") else None
        selector = self.ui.fixedMaskSegmentSelector
        selector.visible = segmentation is not None
        self.ui.fixedMaskSegmentSelectorLabel.visible = segmentation is not None
        wasBlocked = selector.blockSignals(True)  # setting the node selects its first segment: keep the saved one
        selector.setCurrentNode(segmentation)
        if segmentation is not None and p.fixedMaskSegmentId:
            selector.setCurrentSegmentID(p.fixedMaskSegmentId)  # ignored when the segment is gone
        selector.blockSignals(wasBlocked)
        self.onFixedMaskSegmentChanged(selector.currentSegmentID())

    def onFixedMaskSegmentChanged(self, segmentId: str) -> None:
        """Keep the parameter node's mask segment in step with the selector (empty unless the mask is a segmentation)."""
        p = self._parameterNode
        if p is None:
            return
        isSegmentation = p.fixedMask is not None and p.fixedMask.IsA("vtkMRMLSegmentationNode")
        wanted = (segmentId or "") if isSegmentation else ""
        if p.fixedMaskSegmentId != wanted:
            p.fixedMaskSegmentId = wanted

    def updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        ready = bool(p and p.fixedVolume and p.movingVolume and p.stackPath)
        self.ui.applyButton.enabled = ready and not self._running
        self.ui.applyButton.toolTip = _("Register the moving volume onto the fixed volume") if ready else _(
            "Choose a fixed volume, a moving volume and a stack")
        self.ui.cancelButton.enabled = self._running

    # ------------------------------------------------------------------------------ stacks
    def refreshStacks(self) -> None:
        """Fill the stack chooser from the registry and re-select the parameter node's stack."""
        self._fillStackComboBox()
        self.selectStack(self._parameterNode.stackPath if self._parameterNode else "")
        if self.ui.stackComboBox.count == 0:
            self.ui.stackDetailsLabel.text = _("No stack found: add one from a file, or train one in DLIR Training.")

    def _fillStackComboBox(self) -> None:
        """Registry stacks: name as text, file as item data, the full manifest as tooltip."""
        combo = self.ui.stackComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for info in self.logic.stacks():
            combo.addItem(info.name, str(info.path))
            combo.setItemData(combo.count - 1, self.logic.stackDetails(info), qt.Qt.ToolTipRole)
        combo.blockSignals(wasBlocked)

    def selectStack(self, path: str) -> None:
        """Select the stack of file ``path`` (also called by DLIR Training when a job's stack is installed)."""
        combo = self.ui.stackComboBox
        index = combo.findData(str(path)) if path else -1
        if path and index < 0 and self.logic.dependenciesInstalled():
            self._fillStackComboBox()
            index = combo.findData(str(path))
        if index < 0 and combo.count > 0:
            index = 0
        combo.currentIndex = index
        self.onStackChanged(index)

    def onStackChanged(self, index: int) -> None:
        combo = self.ui.stackComboBox
        path = combo.itemData(index) if index >= 0 else ""
        if self._parameterNode and self._parameterNode.stackPath != (path or ""):
            self._parameterNode.stackPath = path or ""
        self.ui.stackDetailsLabel.text = self.logic.stackSummary(path) if path else ""

    def onRefreshStacks(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to list the stacks."), waitCursor=True):
            self.logic.ensureDependencies(self.resourcePath("requirements.txt"))
            self.refreshStacks()

    def onAddStack(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Add a DLIR stack"), "", _("DLIR stacks") + f" (*{STACK_SUFFIX})")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to add the stack."), waitCursor=True):
            self.logic.ensureDependencies(self.resourcePath("requirements.txt"))
            info = self.logic.addStackFromFile(path)
            self.selectStack(str(info.path))

    # ------------------------------------------------------------------------------ run
    def onCancel(self) -> None:
        self._cancelRequested = True
        self.ui.statusLabel.text = _("Cancelling after the current step...")

    def _progress(self, step: str, fraction: float) -> None:
        """The engine's step as status (in Accurate mode: level, step and loss of the optimisation)."""
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = step
        slicer.app.processEvents()  # lets the Cancel button be clicked between steps (every optimiser step in Accurate mode)

    def onApply(self) -> None:
        p = self._parameterNode
        self._running, self._cancelRequested = True, False
        self.updateButtons()
        self.ui.progressBar.value = 0
        self.ui.resultsLabel.text = ""
        try:
            with slicer.util.tryWithErrorDisplay(_("Registration failed."), waitCursor=True):
                self.logic.ensureDependencies(self.resourcePath("requirements.txt"))
                outputs = self.logic.registerVolumes(
                    p.fixedVolume, p.movingVolume, p.stackPath,
                    movingSegmentationNode=p.movingSegmentation if p.createSegmentation else None,
                    device=p.device, mode=p.mode.value, refineSteps=p.refineSteps,
                    fixedMaskNode=p.fixedMask, fixedMaskSegmentId=p.fixedMaskSegmentId or None,
                    initialAlignment=p.initialAlignment.engineValue(), similarity=p.contrast.value,
                    progress=self._progress, cancel=lambda: self._cancelRequested,
                    outputs=self.logic.outputRequest(p))
                self.ui.progressBar.value = 100
                self.ui.statusLabel.text = _("Done.")
                self.ui.resultsLabel.text = "\n".join([outputs.summary()] + [_("Warning: ") + w for w in outputs.warnings])
                self.ui.deviceLabel.text = outputs.device
        finally:
            if self.ui.statusLabel.text != _("Done."):
                self.ui.statusLabel.text = _("Stopped; the scene is as it was.")
            self._running = False
            self.updateButtons()


#
# DLIRRegistrationLogic
#
class DLIRRegistrationLogic(ScriptedLoadableModuleLogic):
    """Thin: dependencies, the parameter node and the stack cache; the work is ``DLIRRegistrationLib``'s."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._stackCache = None

    def getParameterNode(self):
        return DLIRRegistrationParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------------------ dependencies
    @staticmethod
    def dependenciesInstalled() -> bool:
        """True when PyTorch and the engine's packages import (nothing is installed here)."""
        import importlib.util

        return all(importlib.util.find_spec(name) is not None for name in ("torch", "safetensors", "SimpleITK", "numpy"))

    @staticmethod
    def ensureDependencies(requirementsFile: str) -> None:
        """Install PyTorch (through the PyTorch extension, after asking) and the engine's packages, on first use."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError as exc:
            raise RuntimeError(_("DLIR Registration needs the PyTorch extension: install 'PyTorch' in the Extensions "
                                 "Manager and restart Slicer.")) from exc
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            slicer.util.showStatusMessage(_("Installing PyTorch (one time, may take minutes)..."))
            if torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT) is None:
                raise RuntimeError(_("DLIR Registration cannot run without PyTorch (installation declined)."))
        import importlib.util

        if importlib.util.find_spec("slicer.packaging") is not None:  # Slicer >= 5.9
            from slicer import packaging  # not "import slicer.packaging": that would make slicer local here

            packaging.pip_ensure(packaging.load_requirements(requirementsFile), requester="DLIRRegistration")
            return
        missing = DLIRRegistrationLogic._missingRequirements(requirementsFile)
        if missing:
            if not slicer.util.confirmOkCancelDisplay(
                    _("DLIR Registration will install these Python packages: {packages}").format(packages=", ".join(missing))):
                raise RuntimeError(_("DLIR Registration cannot run without {packages}.").format(packages=", ".join(missing)))
            slicer.util.pip_install(missing)

    @staticmethod
    def _missingRequirements(requirementsFile: str) -> list:
        """Requirement lines whose distribution is absent (for Slicer versions without slicer.packaging)."""
        import importlib.metadata
        import re

        missing = []
        for line in pathlib.Path(requirementsFile).read_text(encoding="utf-8").splitlines():
            line = line.split("#")[0].strip()
            if not line:
                continue
            try:
                importlib.metadata.version(re.split(r"[<>=!~ \[;]", line, maxsplit=1)[0])
            except importlib.metadata.PackageNotFoundError:
                missing.append(line)
        return missing

    # ------------------------------------------------------------------------------ stacks
    def stacks(self) -> list:
        from DLIRRegistrationLib.stacks import listStacks

        return listStacks()

    def stackDetails(self, info) -> str:
        from DLIRRegistrationLib.stacks import stackDetails

        return stackDetails(info)

    def stackSummary(self, path: str) -> str:
        from DLIRRegistrationLib.stacks import stackSummary

        for info in self.stacks():
            if str(info.path) == str(path):
                return stackSummary(info)
        return str(path)

    def addStackFromFile(self, path: str):
        from DLIRRegistrationLib.stacks import addStackFromFile

        return addStackFromFile(path)

    # ------------------------------------------------------------------------------ registration
    @staticmethod
    def outputRequest(p):
        """The outputs chosen in the parameter node: a chosen node, else a new one, or none when unchecked."""
        from DLIRRegistrationLib.registration import OutputRequest

        def target(create, node):
            return (node or True) if create else False

        return OutputRequest(
            transform=target(p.createTransform, p.outputTransform),
            warpedVolume=target(p.createWarpedVolume, p.outputWarpedVolume),
            jacobianVolume=target(p.createJacobian, p.outputJacobianVolume),
            foldingSegmentation=target(p.createFolding, p.outputFoldingSegmentation),
            segmentation=target(p.createSegmentation, p.outputSegmentation),
        )

    def registerVolumes(self, fixedVolumeNode, movingVolumeNode, stack, movingSegmentationNode=None, device: str = "auto",
                        mode: str = "fast", refineSteps: int = 0, fixedMaskNode=None, fixedMaskSegmentId: Optional[str] = None,
                        initialAlignment: Optional[str] = None, progress=None, cancel=None, outputs=None,
                        similarity: str = "auto"):
        """``DLIRRegistrationLib.registration.registerVolumes`` (same arguments) in the application's scene.

        ``stack`` is a file path or registry name (kept loaded between runs) or a loaded stack.
        ``mode``: ``fast`` or ``accurate``; ``refineSteps`` > 0 overrides the mode with that many
        optimiser steps; ``fixedMaskNode``: a segmentation (segment ``fixedMaskSegmentId``, None =
        all) or a label-map volume; ``initialAlignment``: ``centre``, ``com``, ``moments``, ``none`` or None (the
        stack's recipe); ``similarity``: ``same``, ``different`` or ``auto`` (contrasts).  Outputs in world RAS on the fixed grid; the transform maps fixed -> moving
        (from parent).
        """
        from DLIRRegistrationLib.registration import registerVolumes
        from DLIRRegistrationLib.stacks import StackCache

        if isinstance(stack, (str, pathlib.Path)):
            if self._stackCache is None:
                self._stackCache = StackCache()
            stack = self._stackCache.get(stack)
        return registerVolumes(slicer.mrmlScene, fixedVolumeNode, movingVolumeNode, stack,
                               movingSegmentationNode=movingSegmentationNode, device=device, mode=mode,
                               refineSteps=refineSteps, fixedMaskNode=fixedMaskNode, fixedMaskSegmentId=fixedMaskSegmentId,
                               initialAlignment=initialAlignment, progress=progress, cancel=cancel, outputs=outputs,
                               similarity=similarity)


#
# DLIRRegistrationTest
#
class DLIRRegistrationTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: the sample pair from Sample Data registered end to end through the Logic."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_SamplePair()
        self.setUp()
        self.test_WidgetNames()

    def test_SamplePair(self) -> None:
        import SampleData

        from DLIRRegistrationLib import samplepair

        logic = DLIRRegistrationLogic()
        logic.ensureDependencies(os.path.join(os.path.dirname(__file__), "Resources", "requirements.txt"))
        self.delayDisplay("Loading the sample pair")
        registerSampleData()
        fixed, moving, segmentation = SampleData.downloadSamples(SAMPLE_NAME)
        samplepair.nameSegments(segmentation)
        pair = samplepair.SamplePair(fixed, moving, segmentation)
        for mode in ("fast", "accurate"):
            self.delayDisplay(f"Registering ({mode})")
            outputs, problems = samplepair.runSampleRegistration(slicer.mrmlScene, pair, samplepair.selfTestStack(),
                                                                 device="auto", mode=mode)
            self.assertEqual(problems, [])
            self.delayDisplay(f"Registered ({mode}): " + outputs.summary())

    def test_WidgetNames(self) -> None:
        self.delayDisplay("Checking the GUI")
        widget = slicer.modules.dlirregistration.widgetRepresentation().self()
        for name in ("modeComboBox", "fixedVolumeSelector", "movingVolumeSelector", "fixedMaskSelector", "fixedMaskSegmentSelector",
                     "stackComboBox", "initialAlignmentComboBox", "applyButton", "cancelButton", "progressBar"):
            self.assertTrue(hasattr(widget.ui, name), name)
        self.delayDisplay("GUI ok")
