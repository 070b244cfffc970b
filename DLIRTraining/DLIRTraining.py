"""DLIR Training: train a DLIR stage stack on one's own images without leaving Slicer.

The module runs ``dlir train`` as a separate process (Slicer's own Python), shows its progress
(per-stage progress bar with ETA, loss / NCC / bending / validation-Dice curves in a plot view,
the log), stops it gracefully (the trainer writes a checkpoint) and resumes it, lists past jobs
from their folders after a restart, and installs a finished stack into the model registry so DLIR
Registration lists it.

Everything but the GUI lives in the Qt-free ``DLIRTrainingLib`` (tested with pytest on the
slicer-core wheel); this file holds the Slicer module, its parameter node, a thin Widget, a thin
Logic and the in-Slicer self-test.
"""

import os
import pathlib
import sys
from typing import Annotated

import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from DLIRTrainingLib.job import JobState, formatDuration
from DLIRTrainingLib.settings import DataSource, Intensity, TrainingSettings

#: Slicer setting holding the jobs folder (the module's default when the GUI field is empty)
JOBS_FOLDER_SETTING = "DLIR/TrainingJobsFolder"


#
# DLIRTraining
#
class DLIRTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DLIR Training")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = ["DLIRRegistration"]  # its engine (dlir) and its stack chooser
        self.parent.contributors = ["DLIR contributors"]
        self.parent.helpText = _(
            "Train a DLIR (unsupervised deep-learning image registration, de Vos et al. 2019) stage stack on your own "
            "images: an affine stage (it finds 32 keypoints in each image and fits the affine to them), then B-spline stages "
            "coarse to fine. Training runs in a separate process; stop keeps "
            "the last checkpoint and resume continues it, also after a restart. A finished stack appears in DLIR Registration."
            "<br><br>Which pairs? <b>Synthetic pairs</b> deform one of your images (a stack for that anatomy and modality, "
            "intra-patient motion). <b>Synthetic shapes</b> are random label maps drawn with random contrasts (SynthMorph): "
            "they need no images and aim at registration itself, for anatomies and contrasts you have few images of (the "
            "bundled universal stack was trained on shapes alone); mixed into real images they add variety. <b>Dice weight</b> "
            "mixes the soft Dice of known labels into the similarity: shapes always have labels, and so do the synthetic "
            "pairs of images you give label maps. Use 1 for shapes alone, about 0.5 when the labels you give are the "
            "structures you will propagate, 0 without labels (NCC alone). A stack trained on a few subjects registers those well in one shot, "
            "not new ones: for a new patient, use DLIR Registration's Accurate mode, which reaches elastix from any stack."
        )
        self.parent.acknowledgementText = _(
            "Method: B.D. de Vos et al., A deep learning framework for unsupervised affine and deformable image "
            "registration, Medical Image Analysis 52 (2019) 128-143."
        )


#
# Parameter node
#
@parameterNodeWrapper
class DLIRTrainingParameterNode:
    """Every GUI choice; the same names as DLIRTrainingLib.settings.TrainingSettings, whose defaults (the
    engine's, ``dlir.training.config``) are these defaults.  The ranges only bound the widgets: the
    engine checks the values (``DLIRTrainingLib.settings.buildConfig``)."""

    dataSource: DataSource = TrainingSettings.dataSource
    dataFolder: pathlib.Path
    dataCsv: pathlib.Path
    validationCount: Annotated[int, WithinRange(0, 1000)] = TrainingSettings.validationCount
    intensity: Intensity = TrainingSettings.intensity
    affineStage: bool = TrainingSettings.affineStage
    affineIterations: Annotated[int, WithinRange(1, 1000000)] = TrainingSettings.affineIterations
    bsplineSpacings: str = TrainingSettings.bsplineSpacings
    bsplineIterations: Annotated[int, WithinRange(1, 1000000)] = TrainingSettings.bsplineIterations
    gridSpacing: Annotated[float, WithinRange(0.25, 32.0)] = TrainingSettings.gridSpacing
    patchSize: Annotated[int, WithinRange(8, 512)] = TrainingSettings.patchSize
    batchSize: Annotated[int, WithinRange(1, 256)] = TrainingSettings.batchSize
    alpha: Annotated[float, WithinRange(0.0, 100.0)] = TrainingSettings.alpha
    learningRate: Annotated[float, WithinRange(0.0, 1.0)] = TrainingSettings.learningRate
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = TrainingSettings.device
    seed: Annotated[int, Minimum(0)] = TrainingSettings.seed
    checkpointEvery: Annotated[int, WithinRange(1, 1000000)] = TrainingSettings.checkpointEvery
    validateEvery: Annotated[int, WithinRange(0, 1000000)] = TrainingSettings.validateEvery
    syntheticFraction: Annotated[float, WithinRange(0.0, 1.0)] = TrainingSettings.syntheticFraction
    shapesFraction: Annotated[float, WithinRange(0.0, 1.0)] = TrainingSettings.shapesFraction
    diceWeight: Annotated[float, WithinRange(0.0, 1.0)] = TrainingSettings.diceWeight
    channels: Annotated[int, WithinRange(1, 256)] = TrainingSettings.channels
    stackName: str = TrainingSettings.stackName
    description: str = TrainingSettings.description
    outputFolder: pathlib.Path
    jobsFolder: pathlib.Path


#
# DLIRTrainingWidget
#
class DLIRTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the GUI to the parameter node and the Logic; no training logic here."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._selectedJob = None
        self._jobs = []
        self._shownLogLines = 0
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DLIRTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DLIRTrainingLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.refreshJobsButton.connect("clicked(bool)", self.refreshJobs)
        self.ui.showPlotsButton.connect("clicked(bool)", self.onShowPlots)
        self.ui.useInRegistrationButton.connect("clicked(bool)", self.onUseInRegistration)
        self.ui.jobsTableWidget.connect("itemSelectionChanged()", self.onJobSelected)
        self.ui.dataSourceComboBox.connect("currentIndexChanged(int)", self.updateDataSourceWidgets)

        self._timer = qt.QTimer()
        self._timer.setInterval(500)
        self._timer.connect("timeout()", self.onTimer)
        self._timer.start()
        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)

        self.initializeParameterNode()
        self.refreshJobs()

    def cleanup(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()
        self.onAboutToQuit()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.refreshJobs()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        self.logic.core.forgetCurves()
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onAboutToQuit(self) -> None:
        """Stop running jobs gracefully: each writes a checkpoint and can be resumed after the restart."""
        if self.logic is not None:
            self.logic.core.shutdown(timeout=30.0)

    # ------------------------------------------------------------------------------ parameters
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
        self.updateDataSourceWidgets()

    def updateDataSourceWidgets(self, *args) -> None:
        source = self._parameterNode.dataSource if self._parameterNode else DataSource.FOLDER
        for widget, label, shown in (
            (self.ui.dataFolderPathLineEdit, self.ui.dataFolderPathLineEditLabel, source == DataSource.FOLDER),
            (self.ui.dataCsvPathLineEdit, self.ui.dataCsvPathLineEditLabel, source == DataSource.CSV),
            (self.ui.sceneVolumesComboBox, self.ui.sceneVolumesComboBoxLabel, source == DataSource.SCENE),
            (self.ui.sceneLabelMapsComboBox, self.ui.sceneLabelMapsComboBoxLabel, source == DataSource.SCENE),
        ):
            widget.visible = shown
            label.visible = shown

    # ------------------------------------------------------------------------------ actions
    def onStart(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the training job."), waitCursor=True):
            settings = TrainingSettings.fromObject(self._parameterNode)
            volumes = self.ui.sceneVolumesComboBox.checkedNodes() if settings.dataSource == DataSource.SCENE else []
            labels = self.ui.sceneLabelMapsComboBox.checkedNodes() if settings.dataSource == DataSource.SCENE else []
            job = self.logic.start(settings, volumes, labels)
            self.refreshJobs(select=job)
            self.onShowPlots()

    def onStop(self) -> None:
        if self._selectedJob is not None:
            self.logic.core.stop(self._selectedJob)
            self.updateJobView()

    def onResume(self) -> None:
        if self._selectedJob is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to resume the training job."), waitCursor=True):
            self.logic.resume(self._selectedJob, self._parameterNode.outputFolder if self._parameterNode else None)
            self.refreshJobs(select=self._selectedJob)

    def onShowPlots(self) -> None:
        if self._selectedJob is None:
            return
        curves = self.logic.core.curves(self._selectedJob)
        slicer.modules.plots.logic().ShowChartInLayout(curves.lossChart)

    def onUseInRegistration(self) -> None:
        if self._selectedJob is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to open the stack in DLIR Registration."), waitCursor=True):
            self.logic.useInRegistration(self._selectedJob)

    def onTimer(self) -> None:
        if self.logic is None:
            return
        changed = self.logic.core.poll()
        if changed or (self._selectedJob is not None and self._selectedJob.state.active):
            self.updateJobsTable()
            self.updateJobView()

    # ------------------------------------------------------------------------------ jobs view
    def refreshJobs(self, *args, select=None) -> None:
        if self._parameterNode and str(self._parameterNode.jobsFolder) not in ("", "."):
            self.logic.core.setJobsRoot(self._parameterNode.jobsFolder)
        self._jobs = self.logic.core.jobs()
        self.updateJobsTable()
        if select is not None and select in self._jobs:
            self.ui.jobsTableWidget.selectRow(self._jobs.index(select))
        self.updateJobView()

    def updateJobsTable(self) -> None:
        jobs = self._jobs = self.logic.core.manager.list()
        table = self.ui.jobsTableWidget
        table.setRowCount(len(jobs))
        for row, job in enumerate(jobs):
            progress = f"{100 * job.progress.overallFraction:.0f} %" if job.progress.stage else ""
            for column, text in enumerate((job.name, job.state.value, progress, job.message)):
                item = table.item(row, column)
                if item is None:
                    item = qt.QTableWidgetItem()
                    table.setItem(row, column, item)
                item.setText(text)
                item.setToolTip(text if column == 3 else str(job.folder))

    def onJobSelected(self) -> None:
        rows = sorted({index.row() for index in self.ui.jobsTableWidget.selectedIndexes()})
        self._selectedJob = self._jobs[rows[0]] if rows and rows[0] < len(self._jobs) else None
        self._shownLogLines = 0
        self.ui.logTextEdit.clear()
        if self._selectedJob is not None:
            self.logic.core.curves(self._selectedJob)
            if not self._selectedJob.logLines and self._selectedJob.logPath.is_file():
                self.ui.logTextEdit.setPlainText(self._selectedJob.logPath.read_text(errors="replace")[-200000:])
        self.updateJobView()

    def updateJobView(self) -> None:
        job = self._selectedJob
        self.ui.stopButton.enabled = job is not None and job.state in (JobState.RUNNING, JobState.QUEUED)
        self.ui.resumeButton.enabled = job is not None and job.resumable
        self.ui.showPlotsButton.enabled = job is not None
        self.ui.useInRegistrationButton.enabled = job is not None and job.state == JobState.FINISHED
        if job is None:
            self.ui.statusLabel.text = _("No job selected.")
            self.ui.stageLabel.text = ""
            self.ui.stageProgressBar.value = 0
            self.ui.overallProgressBar.value = 0
            return
        self.ui.statusLabel.text = f"{job.name}: {job.state.value}. {job.message}"
        p = job.progress
        text = p.text()
        if p.totalEtaSeconds is not None and job.state.active:
            text += f"; about {formatDuration(p.totalEtaSeconds)} left in all"
        self.ui.stageLabel.text = text
        self.ui.stageProgressBar.value = int(round(100 * p.stageFraction))
        self.ui.overallProgressBar.value = 100 if job.state == JobState.FINISHED else int(round(100 * p.overallFraction))
        newLines = job.logLines[self._shownLogLines:]
        if newLines:
            self.ui.logTextEdit.appendPlainText("\n".join(newLines))
            self._shownLogLines = len(job.logLines)


#
# DLIRTrainingLogic
#
class DLIRTrainingLogic(ScriptedLoadableModuleLogic):
    """Thin: the parameter node, Slicer's Python and environment, and the hand-over to DLIR Registration.

    The work is done by ``DLIRTrainingLib.logic.TrainingLogic`` (``self.core``), which needs no Qt.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from DLIRTrainingLib.logic import TrainingLogic

        env = None
        if hasattr(slicer.util, "startupEnvironment"):
            env = dict(slicer.util.startupEnvironment())  # PythonSlicer (the launcher) adds Slicer's paths itself
        self.core = TrainingLogic(slicer.mrmlScene, self.jobsFolder(), python=sys.executable, env=env)

    def getParameterNode(self):
        return DLIRTrainingParameterNode(super().getParameterNode())

    @staticmethod
    def jobsFolder() -> pathlib.Path:
        from DLIRTrainingLib.jobs import defaultJobsRoot

        value = slicer.app.settings().value(JOBS_FOLDER_SETTING, "") if hasattr(slicer, "app") else ""
        return pathlib.Path(value) if value else defaultJobsRoot()

    def start(self, settings: TrainingSettings, volumes=(), labelMaps=()):
        job = self.core.start(settings, volumes, labelMaps)
        slicer.app.settings().setValue(JOBS_FOLDER_SETTING, str(self.core.jobsRoot))
        return job

    def resume(self, job, modelsFolder=None):
        folder = None if modelsFolder is None or str(modelsFolder) in ("", ".") else modelsFolder
        return self.core.resume(job, folder)

    def useInRegistration(self, job) -> None:
        """Open DLIR Registration with the job's stack selected (copied into the registry first if needed)."""
        stack = self.core.registryStackOf(job)
        slicer.util.selectModule("DLIRRegistration")
        slicer.modules.dlirregistration.widgetRepresentation().self().selectStack(str(stack))


#
# DLIRTrainingTest
#
class DLIRTrainingTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: a tiny two-stage job on a synthetic pair, stop and resume, and the GUI wiring."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_TinyJob()
        self.setUp()
        self.test_WidgetNames()

    def test_WidgetNames(self) -> None:
        self.delayDisplay("Checking the GUI")
        widget = slicer.modules.dlirtraining.widgetRepresentation().self()
        for name in ("startButton", "stopButton", "resumeButton", "jobsTableWidget", "stageProgressBar", "logTextEdit"):
            self.assertTrue(hasattr(widget.ui, name), name)
        self.delayDisplay("GUI ok")

    def test_TinyJob(self) -> None:
        import tempfile
        import time

        import numpy as np

        from DLIRTrainingLib.logic import TrainingLogic

        self.delayDisplay("Training a tiny stack")
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="dlir-training-test-"))
        volumes = []
        rng = np.random.default_rng(0)
        for k in range(2):
            z, y, x = np.mgrid[0:32, 0:32, 0:32]
            blob = np.exp(-(((x - 16 - 2 * k) ** 2 + (y - 16) ** 2 + (z - 16 + k) ** 2) / 60.0))
            array = (1000 * blob + 20 * rng.standard_normal(blob.shape)).astype(np.float32)
            ijkToRAS = np.diag([4.0, 4.0, 4.0, 1.0])
            volumes.append(slicer.util.addVolumeFromArray(array, ijkToRAS=ijkToRAS, name=f"tiny{k}"))
        env = dict(os.environ, DLIR_MODELS_DIR=str(tmp / "models"))
        core = TrainingLogic(slicer.mrmlScene, tmp / "jobs", python=sys.executable, env=env, stopTimeout=60)
        settings = TrainingSettings(dataSource=DataSource.SCENE, stackName="slicer-selftest", affineIterations=6,
                                    bsplineSpacings="16", bsplineIterations=6, gridSpacing=8.0, patchSize=16, channels=8,
                                    checkpointEvery=2, validateEvery=3, device="cpu", outputFolder=tmp / "models")
        job = core.start(settings, volumes)
        deadline = time.monotonic() + 600
        while job.state.active and time.monotonic() < deadline:
            core.poll()
            slicer.app.processEvents()
            time.sleep(0.2)
        core.poll()
        self.assertEqual(job.state, JobState.FINISHED, job.message)
        self.assertGreater(core.curves(job).rows, 0)
        self.assertTrue(core.stackOf(job).is_file())
        self.delayDisplay("Tiny job finished")
