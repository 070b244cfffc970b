"""The DLIR Training logic without Qt: settings -> job folder -> ``dlir train`` -> curves -> registry.

:class:`TrainingLogic` is what the module's Logic delegates to (and what tests, scripts and a
web front end use directly)::

    logic = TrainingLogic(scene, jobs_root, python=sys.executable)
    job = logic.start(settings)            # folder, data, request.toml, process (or queue)
    while job.state.active: logic.poll(); time.sleep(0.5)   # the module: a QTimer
    logic.installed[job.folder]            # the stack, now in the registry

Everything that reaches MRML happens inside :meth:`poll` / :meth:`curves`, i.e. on the caller's
thread.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from dlir.toml_writer import dumps

from .job import JobError, JobState, TrainingJob, read_events
from .jobs import JobManager, default_jobs_root
from .progress import JOB_ATTRIBUTE, TrainingCurves
from .registry import install_stack, models_dir, registry_stack, stack_name_taken
from .scenedata import data_section
from .settings import SettingsError, TrainingSettings, build_config

log = logging.getLogger(__name__)


class TrainingLogic:
    """Jobs of one jobs folder, their curves in ``scene`` and the installation of finished stacks.

    ``python``/``env``: the interpreter and environment of the trainer processes (inside
    Slicer: PythonSlicer and Slicer's startup environment).  ``stop_timeout``: seconds a stopping
    trainer gets before SIGTERM and again before SIGKILL.  ``launcher``: the command standing for
    ``python -m dlir`` (see :class:`TrainingJob`).
    ``default_models_dir``: where finished stacks go when the settings name no folder (default:
    the registry's user folder, ``$DLIR_MODELS_DIR`` or ``~/.dlir/models``).
    """

    def __init__(
        self,
        scene: Any,
        jobs_root: str | Path | None = None,
        *,
        python: str | None = None,
        env: dict[str, str] | None = None,
        stop_timeout: float = 60.0,
        launcher: Sequence[str] | None = None,
        default_models_dir: str | Path | None = None,
    ) -> None:
        self.scene = scene
        self.default_models_dir = Path(default_models_dir) if default_models_dir else None
        self.manager = JobManager(jobs_root or default_jobs_root(), python=python or sys.executable, env=env,
                                  stop_timeout=stop_timeout, launcher=launcher)
        self.installed: dict[Path, Path] = {}  # job folder -> stack file in the registry
        self.install_errors: dict[Path, str] = {}
        self.models_folder: dict[Path, Path] = {}  # job folder -> models folder chosen at start
        self._curves: dict[Path, TrainingCurves] = {}
        self._finished_callbacks: list[Callable[[TrainingJob], None]] = []
        self.manager.refresh()

    # ------------------------------------------------------------------------------ jobs
    @property
    def jobs_root(self) -> Path:
        return self.manager.root

    def set_jobs_root(self, root: str | Path) -> None:
        """Look at another jobs folder (running jobs of the old one keep running and stay listed)."""
        root = Path(root)
        if root.resolve() != self.manager.root.resolve():
            self.manager.root = root
            self.manager.refresh()

    def jobs(self) -> list[TrainingJob]:
        """All jobs of the jobs folder (past ones read from their folders), newest first."""
        return self.manager.refresh()

    def job(self, name_or_folder: str | Path) -> TrainingJob:
        return self.manager.get(name_or_folder)

    def on_finished(self, callback: Callable[[TrainingJob], None]) -> None:
        """``callback(job)`` once a job has finished and its stack is installed (or failed to install)."""
        self._finished_callbacks.append(callback)

    # ------------------------------------------------------------------------------ start/stop
    def start(self, settings: TrainingSettings, volumes: Sequence[Any] = (), label_maps: Sequence[Any] = (),
              extra_config: dict[str, Any] | None = None) -> TrainingJob:
        """Check ``settings``, make the job folder (data, ``request.toml``) and start or queue the job.

        ``volumes``/``label_maps``: the checked scene nodes when the data source is the scene.
        ``extra_config``: further configuration keys (merged into the top level; tests, experts).
        Raises :class:`SettingsError` / :class:`JobError` with a sentence for the user.
        """
        settings.check()
        name = settings.stackName.strip()
        target = models_dir(settings.outputFolder, self.default_models_dir)
        taken = stack_name_taken(name, target)
        if taken is not None:
            raise SettingsError(f"a stack named {name} already exists ({taken}); choose another name")
        if settings.jobsFolder and str(settings.jobsFolder) not in ("", "."):
            self.set_jobs_root(settings.jobsFolder)
        folder = self.manager.new_folder(name)
        folder.mkdir(parents=True)
        try:
            data = data_section(settings, folder, volumes, label_maps)
            config = build_config(settings, data)
            if extra_config:
                config = _merge(config, extra_config)
            text = dumps(config)
        except Exception:
            _remove_tree(folder)
            raise
        job = self._create(folder, text, settings.device)
        self.models_folder[job.folder] = target
        self.curves(job)
        self.manager.submit(job)
        return job

    def _create(self, folder: Path, config_text: str, device: str) -> TrainingJob:
        from .job import REQUEST_FILE

        folder.mkdir(parents=True, exist_ok=True)
        (folder / REQUEST_FILE).write_text(config_text, encoding="utf-8")
        job = TrainingJob(folder, name=folder.name, device=device, **self.manager.job_options)
        job.save_metadata()
        return self.manager.add(job)

    def stop(self, job: TrainingJob) -> None:
        """Stop gracefully: the trainer writes a checkpoint and exits (watch ``job.state``)."""
        job.stop()

    def resume(self, job: TrainingJob, models_folder: str | Path | None = None) -> TrainingJob:
        """Continue a stopped (or crashed) job from its last checkpoint, on its device (or queue it)."""
        if job.state.active:
            raise JobError(f"the job {job.name} is running")
        if job.state == JobState.FINISHED:
            raise JobError(f"the job {job.name} has finished; there is nothing to resume")
        if models_folder is not None or job.folder not in self.models_folder:
            self.models_folder[job.folder] = models_dir(models_folder, self.default_models_dir)
        self.curves(job)
        self.manager.submit(job, resume=True)
        return job

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop every running job (each keeps its checkpoint; resume after a restart)."""
        self.manager.stop_all(timeout)

    # ------------------------------------------------------------------------------ polling
    def poll(self) -> dict[TrainingJob, list[dict]]:
        """Drain every job's events into its curves; install finished stacks. Returns the new events."""
        before = {job: job.state for job in self.manager.jobs.values()}
        new = self.manager.poll()
        for job, events in new.items():
            curves = self._curves.get(job.folder)
            if curves is not None:
                curves.add_events(events)
        for job in self.manager.jobs.values():
            if job.state == JobState.FINISHED and before.get(job) != JobState.FINISHED and job.folder not in self.installed:
                self._install(job)
        return new

    def _install(self, job: TrainingJob) -> None:
        if job.stack_path is None or not job.stack_path.is_file():
            self.install_errors[job.folder] = f"the job {job.name} finished but its stack file was not found in {job.folder}"
        else:
            try:
                self.installed[job.folder] = install_stack(job.stack_path, self.models_folder.get(job.folder) or models_dir(None, self.default_models_dir))
                job.message = f"finished; stack {self.installed[job.folder].stem} is in {self.installed[job.folder].parent}"
                job.save_metadata()
            except (JobError, OSError) as exc:
                self.install_errors[job.folder] = str(exc)
                job.message = f"finished, but {exc}"
        for callback in self._finished_callbacks:
            try:
                callback(job)
            except Exception:
                log.exception("a finished-job callback failed")

    def stack_of(self, job: TrainingJob) -> Path | None:
        """The finished job's stack: the installed copy, else the file in the job folder."""
        return self.installed.get(job.folder) or job.stack_path

    def registry_stack_of(self, job: TrainingJob) -> Path:
        """The file DLIR Registration lists for the finished job's stack (see :func:`registry.registry_stack`)."""
        stack = self.stack_of(job)
        if job.state != JobState.FINISHED or stack is None or not stack.is_file():
            raise JobError(f"the job {job.name} has no finished stack yet")
        return registry_stack(stack)

    # ------------------------------------------------------------------------------ curves
    def curves(self, job: TrainingJob) -> TrainingCurves:
        """The job's table/plot nodes; made (and filled from ``events.jsonl``) when first asked for."""
        curves = self._curves.get(job.folder)
        if curves is not None and curves.table.GetScene() is self.scene:
            return curves
        self._remove_stale_nodes(job)
        curves = TrainingCurves(self.scene, job.name, str(job.folder))
        if job.state != JobState.QUEUED or job.events_path.exists():
            curves.add_events(read_events(job.events_path))
        self._curves[job.folder] = curves
        return curves

    def _remove_stale_nodes(self, job: TrainingJob) -> None:
        for class_name in ("vtkMRMLPlotSeriesNode", "vtkMRMLPlotChartNode", "vtkMRMLTableNode"):
            nodes = self.scene.GetNodesByClass(class_name)
            for i in range(nodes.GetNumberOfItems()):
                node = nodes.GetItemAsObject(i)
                if node.GetAttribute(JOB_ATTRIBUTE) == str(job.folder):
                    self.scene.RemoveNode(node)

    def forget_curves(self) -> None:
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


def _remove_tree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
