"""The jobs of a jobs folder: list them again after a restart, queue them, one running job per device.

A jobs root holds one folder per job (see :mod:`DLIRTrainingLib.job`).  :class:`JobManager` finds
them (:meth:`JobManager.refresh`), creates new ones (:meth:`JobManager.create`), runs a job at
once or queues it while another job trains on the same device (:meth:`JobManager.submit`),
starts queued jobs when their device frees up (:meth:`JobManager.poll`) and stops everything
gracefully on shutdown (:meth:`JobManager.stopAll`).  No Qt.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from dlir.training.jobfolder import CONFIG_FILE, EVENTS_FILE

from .job import METADATA_FILE, REQUEST_FILE, JobError, JobState, TrainingJob


def defaultJobsRoot() -> Path:
    """``$DLIR_JOBS_DIR``, else ``~/.dlir/jobs``."""
    return Path(os.environ.get("DLIR_JOBS_DIR", Path.home() / ".dlir" / "jobs"))


def deviceKey(device: str) -> str:
    """The device a job occupies: ``auto`` counts as the GPU when one is used, ``cuda`` as ``cuda:0``."""
    device = (device or "cpu").strip().lower()
    if device == "cuda":
        return "cuda:0"
    if device == "auto":
        return "auto"
    return device


def safeName(name: str) -> str:
    """A folder/file name from a user's stack name: letters, digits, ``-``, ``_``, ``.``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip("-.")
    return cleaned or "stack"


class JobManager:
    """Jobs under ``root``; ``jobOptions`` (python, env, stopTimeout, ...) go to every :class:`TrainingJob`."""

    def __init__(self, root: str | Path | None = None, **jobOptions: Any) -> None:
        self.root = Path(root) if root is not None else defaultJobsRoot()
        self.jobOptions = jobOptions
        self.jobs: dict[Path, TrainingJob] = {}

    # ------------------------------------------------------------------------------ listing
    def refresh(self) -> list[TrainingJob]:
        """Find the job folders under ``root`` (jobs of this session keep their live objects)."""
        if self.root.is_dir():
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
                key = folder.resolve()
                if key in self.jobs:
                    continue
                if any((folder / f).is_file() for f in (METADATA_FILE, EVENTS_FILE, REQUEST_FILE, CONFIG_FILE)):
                    self.jobs[key] = TrainingJob.load(folder, **self.jobOptions)
        return self.list()

    def list(self) -> list[TrainingJob]:
        """All known jobs, newest first."""
        return sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)

    def get(self, nameOrFolder: str | Path) -> TrainingJob:
        for job in self.jobs.values():
            if job.name == str(nameOrFolder) or job.folder == Path(nameOrFolder).resolve():
                return job
        raise JobError(f"no training job {nameOrFolder!r} in {self.root}")

    # ------------------------------------------------------------------------------ creating
    def newFolder(self, name: str) -> Path:
        """A fresh job folder name under ``root``: ``NAME``, or ``NAME-2``, ``NAME-3``... when taken."""
        base = safeName(name)
        candidate, k = self.root / base, 2
        while candidate.exists():
            candidate, k = self.root / f"{base}-{k}", k + 1
        return candidate

    def create(self, name: str, configText: str, device: str = "cpu", folder: Path | None = None, **options: Any) -> TrainingJob:
        """A new job holding ``request.toml`` (the trainer's configuration ``configText``), not yet started.

        ``folder``: its folder (made if needed; default: :meth:`newFolder` of ``name``).
        """
        folder = Path(folder) if folder is not None else self.newFolder(name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / REQUEST_FILE).write_text(configText, encoding="utf-8")
        job = TrainingJob(folder, name=folder.name, device=device, **{**self.jobOptions, **options})
        job.saveMetadata()
        self.jobs[job.folder] = job
        return job

    # ------------------------------------------------------------------------------ running
    def runningOn(self, device: str) -> TrainingJob | None:
        """The job that occupies ``device`` now (this session's or one found running in another process)."""
        key = deviceKey(device)
        for job in self.jobs.values():
            if job.state.active and (deviceKey(job.device) == key or "auto" in (key, deviceKey(job.device))):
                return job
        return None

    def submit(self, job: TrainingJob, resume: bool = False) -> JobState:
        """Start (or resume) ``job`` now, or queue it while another job trains on its device."""
        self.jobs.setdefault(job.folder, job)
        if job.state.active:
            raise JobError(f"the job {job.name} is already running")
        if resume and not job.hasCheckpoint():
            raise JobError(f"the job {job.name} has no checkpoint to resume from; start it again")
        busy = self.runningOn(job.device)
        job.pendingAction = "resume" if resume else "start"
        if busy is not None and busy is not job:
            job.waitingForDevice = True
            job.state = JobState.QUEUED
            job.message = f"queued: {busy.name} is training on {busy.device}"
            job.saveMetadata()
            return job.state
        self._launch(job)
        return job.state

    def _launch(self, job: TrainingJob) -> None:
        job.waitingForDevice = False
        if job.pendingAction == "resume":
            job.resume()
        else:
            job.start()

    def poll(self) -> dict[TrainingJob, list[dict]]:
        """Poll every active job, then start queued jobs whose device is free. Returns new events per job."""
        new: dict[TrainingJob, list[dict]] = {}
        for job in list(self.jobs.values()):
            if job.state.active or not job._queue.empty():
                events = job.poll()
                if events:
                    new[job] = events
        for job in sorted(self.jobs.values(), key=lambda j: j.created):
            if job.state == JobState.QUEUED and job.waitingForDevice and self.runningOn(job.device) is None:
                self._launch(job)
        return new

    def stopAll(self, timeout: float = 60.0) -> list[TrainingJob]:
        """Stop every running job of this session and wait (up to ``timeout`` s) for their checkpoints."""
        stopping = [j for j in self.jobs.values() if j.state == JobState.RUNNING and j._proc is not None]
        for job in stopping:
            job.stop()
        deadline = time.monotonic() + timeout
        for job in stopping:
            try:
                job.wait(max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                job.kill()
                try:
                    job.wait(10)
                except TimeoutError:
                    pass
        return stopping
