"""The DLIR Training logic without Qt: settings -> job folder -> ``dlir train`` -> curves -> registry.

:class:`TrainingLogic` is what the module's Logic delegates to (and what tests, scripts and a
web front end use directly)::

    logic = TrainingLogic(scene, jobsRoot, python=sys.executable)
    job = logic.start(settings)            # folder, data, request.toml, process (or queue)
    while job.state.active: logic.poll(); time.sleep(0.5)   # the module: a QTimer
    logic.installed[job.folder]            # the stack, now in the registry

Everything that reaches MRML happens inside :meth:`poll` / :meth:`curves`, i.e. on the caller's
thread.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from dlir.errors import InputError
from dlir.training.config import TrainConfig

from .job import JobError, JobState, TrainingJob, readEvents
from .jobs import JobManager, defaultJobsRoot
from .progress import JOB_ATTRIBUTE, TrainingCurves
from .registry import installStack, modelsDir, registryStack, stackNameTaken
from .scenedata import checkSceneVolumes, exportSceneVolumes, trainingImages
from .settings import DataSource, TrainingSettings, buildConfig, checkImages


class TrainingLogic:
    """Jobs of one jobs folder, their curves in ``scene`` and the installation of finished stacks.

    ``python``/``env``: the interpreter and environment of the trainer processes (inside
    Slicer: PythonSlicer and Slicer's startup environment).  ``stopTimeout``: seconds a stopping
    trainer gets before SIGTERM and again before SIGKILL.  ``launcher``: the command standing for
    ``python -m dlir`` (see :class:`TrainingJob`).
    ``defaultModelsDir``: where finished stacks go when the settings name no folder (default:
    the registry's user folder, ``$DLIR_MODELS_DIR`` or ``~/.dlir/models``).
    """

    def __init__(
        self,
        scene: Any,
        jobsRoot: str | Path | None = None,
        *,
        python: str | None = None,
        env: dict[str, str] | None = None,
        stopTimeout: float = 60.0,
        launcher: Sequence[str] | None = None,
        defaultModelsDir: str | Path | None = None,
    ) -> None:
        self.scene = scene
        self.defaultModelsDir = Path(defaultModelsDir) if defaultModelsDir else None
        self.manager = JobManager(jobsRoot or defaultJobsRoot(), python=python or sys.executable, env=env,
                                  stopTimeout=stopTimeout, launcher=launcher)
        self.installed: dict[Path, Path] = {}  # job folder -> stack file in the registry
        self.installErrors: dict[Path, str] = {}
        self.modelsFolder: dict[Path, Path] = {}  # job folder -> models folder chosen at start
        self._curves: dict[Path, TrainingCurves] = {}
        self.manager.refresh()

    # ------------------------------------------------------------------------------ jobs
    @property
    def jobsRoot(self) -> Path:
        return self.manager.root

    def setJobsRoot(self, root: str | Path) -> None:
        """Look at another jobs folder (running jobs of the old one keep running and stay listed)."""
        root = Path(root)
        if root.resolve() != self.manager.root.resolve():
            self.manager.root = root
            self.manager.refresh()

    def jobs(self) -> list[TrainingJob]:
        """All jobs of the jobs folder (past ones read from their folders), newest first."""
        return self.manager.refresh()

    def job(self, nameOrFolder: str | Path) -> TrainingJob:
        return self.manager.get(nameOrFolder)

    # ------------------------------------------------------------------------------ start/stop
    def start(self, settings: TrainingSettings, volumes: Sequence[Any] = (), labelMaps: Sequence[Any] = (),
              extraConfig: dict[str, Any] | None = None) -> TrainingJob:
        """Check ``settings``, make the job folder (data, ``request.toml``) and start or queue the job.

        The configuration is the engine's (:func:`settings.buildConfig`); the data are checked as the
        trainer would (:func:`settings.checkImages`, :func:`scenedata.checkSceneVolumes`), all before
        anything is written.  ``volumes``/``labelMaps``: the checked scene nodes when the data source
        is the scene.  ``extraConfig``: further configuration keys in the layout of
        ``dlir.training.config`` (merged in; tests, experts).  Raises ``dlir.errors.InputError`` (the
        sentence ``dlir train`` would print) or :class:`JobError`.
        """
        if settings.jobsFolder and str(settings.jobsFolder) not in ("", "."):
            self.setJobsRoot(settings.jobsFolder)
        folder = self.manager.newFolder(settings.stackName or "")
        config = buildConfig(settings, trainingImages(settings, folder))
        if extraConfig:
            config = TrainConfig.from_dict(_merge(config.to_dict(), extraConfig))
            config.check()
        target = modelsDir(settings.outputFolder, self.defaultModelsDir)
        taken = stackNameTaken(config.name, target)
        if taken is not None:
            raise InputError(f"a stack named {config.name} already exists ({taken}); choose another name")
        shapesOnly = config.data.shapes_fraction >= 1 and not config.data.images and not volumes
        fromScene = DataSource(settings.dataSource) == DataSource.SCENE and not shapesOnly
        if fromScene:
            checkSceneVolumes(volumes, labelMaps)
        elif not shapesOnly:
            checkImages(config.data.images)
        folder.mkdir(parents=True)
        try:
            if fromScene:
                exportSceneVolumes(volumes, labelMaps, folder)
            job = self.manager.create(folder.name, config.to_toml(), config.device, folder=folder)
        except Exception:
            _removeTree(folder)
            raise
        self.modelsFolder[job.folder] = target
        self.curves(job)
        self.manager.submit(job)
        return job

    def stop(self, job: TrainingJob) -> None:
        """Stop gracefully: the trainer writes a checkpoint and exits (watch ``job.state``)."""
        job.stop()

    def resume(self, job: TrainingJob, modelsFolder: str | Path | None = None) -> TrainingJob:
        """Continue a stopped (or crashed) job from its last checkpoint, on its device (or queue it)."""
        if job.state.active:
            raise JobError(f"the job {job.name} is running")
        if job.state == JobState.FINISHED:
            raise JobError(f"the job {job.name} has finished; there is nothing to resume")
        if modelsFolder is not None or job.folder not in self.modelsFolder:
            self.modelsFolder[job.folder] = modelsDir(modelsFolder, self.defaultModelsDir)
        self.curves(job)
        self.manager.submit(job, resume=True)
        return job

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop every running job (each keeps its checkpoint; resume after a restart)."""
        self.manager.stopAll(timeout)

    # ------------------------------------------------------------------------------ polling
    def poll(self) -> dict[TrainingJob, list[dict]]:
        """Drain every job's events into its curves; install finished stacks. Returns the new events."""
        before = {job: job.state for job in self.manager.jobs.values()}
        new = self.manager.poll()
        for job, events in new.items():
            curves = self._curves.get(job.folder)
            if curves is not None:
                curves.addEvents(events)
        for job in self.manager.jobs.values():
            if job.state == JobState.FINISHED and before.get(job) != JobState.FINISHED and job.folder not in self.installed:
                self._install(job)
        return new

    def _install(self, job: TrainingJob) -> None:
        if job.stackPath is None or not job.stackPath.is_file():
            self.installErrors[job.folder] = f"the job {job.name} finished but its stack file was not found in {job.folder}"
        else:
            try:
                folder = self.modelsFolder.get(job.folder) or modelsDir(None, self.defaultModelsDir)
                self.installed[job.folder] = installStack(job.stackPath, folder)
                job.message = f"finished; stack {self.installed[job.folder].stem} is in {self.installed[job.folder].parent}"
                job.saveMetadata()
            except (JobError, OSError) as exc:
                self.installErrors[job.folder] = str(exc)
                job.message = f"finished, but {exc}"

    def stackOf(self, job: TrainingJob) -> Path | None:
        """The finished job's stack: the installed copy, else the file in the job folder."""
        return self.installed.get(job.folder) or job.stackPath

    def registryStackOf(self, job: TrainingJob) -> Path:
        """The file DLIR Registration lists for the finished job's stack (see :func:`registry.registryStack`)."""
        stack = self.stackOf(job)
        if job.state != JobState.FINISHED or stack is None or not stack.is_file():
            raise JobError(f"the job {job.name} has no finished stack yet")
        return registryStack(stack)

    # ------------------------------------------------------------------------------ curves
    def curves(self, job: TrainingJob) -> TrainingCurves:
        """The job's table/plot nodes; made (and filled from ``events.jsonl``) when first asked for."""
        curves = self._curves.get(job.folder)
        if curves is not None and curves.table.GetScene() is self.scene:
            return curves
        self._removeStaleNodes(job)
        curves = TrainingCurves(self.scene, job.name, str(job.folder))
        if job.state != JobState.QUEUED or job.eventsPath.exists():
            curves.addEvents(readEvents(job.eventsPath))
        self._curves[job.folder] = curves
        return curves

    def _removeStaleNodes(self, job: TrainingJob) -> None:
        for class_name in ("vtkMRMLPlotSeriesNode", "vtkMRMLPlotChartNode", "vtkMRMLTableNode"):
            nodes = self.scene.GetNodesByClass(class_name)
            for i in range(nodes.GetNumberOfItems()):
                node = nodes.GetItemAsObject(i)
                if node.GetAttribute(JOB_ATTRIBUTE) == str(job.folder):
                    self.scene.RemoveNode(node)

    def forgetCurves(self) -> None:
        """After a scene close: the nodes are gone, make them again when asked."""
        self._curves.clear()


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _removeTree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
