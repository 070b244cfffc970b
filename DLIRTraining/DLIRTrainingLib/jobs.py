"""The jobs of a jobs folder: list them again after a restart, queue them, one running job per device.

A jobs root holds one folder per job (see :mod:`DLIRTrainingLib.job`).  :class:`JobManager` finds
them (:meth:`JobManager.refresh`), creates new ones (:meth:`JobManager.create`), runs a job at
once or queues it while another job trains on the same device (:meth:`JobManager.submit`),
starts queued jobs when their device frees up (:meth:`JobManager.poll`) and stops everything
gracefully on shutdown (:meth:`JobManager.stop_all`).  No Qt.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from .job import EVENTS_FILE, METADATA_FILE, REQUEST_FILE, JobError, JobState, TrainingJob


def default_jobs_root() -> Path:
    """``$DLIR_JOBS_DIR``, else ``~/.dlir/jobs``."""
    return Path(os.environ.get("DLIR_JOBS_DIR", Path.home() / ".dlir" / "jobs"))


def device_key(device: str) -> str:
    """The device a job occupies: ``auto`` counts as the GPU when one is used, ``cuda`` as ``cuda:0``."""
    device = (device or "cpu").strip().lower()
    if device == "cuda":
        return "cuda:0"
    if device == "auto":
        return "auto"
    return device


def safe_name(name: str) -> str:
    """A folder/file name from a user's stack name: letters, digits, ``-``, ``_``, ``.``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip("-.")
    return cleaned or "stack"


class JobManager:
    """Jobs under ``root``; ``job_options`` (python, env, stop_timeout, ...) go to every :class:`TrainingJob`."""

    def __init__(self, root: str | Path | None = None, **job_options: Any) -> None:
        self.root = Path(root) if root is not None else default_jobs_root()
        self.job_options = job_options
        self.jobs: dict[Path, TrainingJob] = {}
        self._on_new_job: list[Callable[[TrainingJob], None]] = []

    # ------------------------------------------------------------------------------ listing
    def refresh(self) -> list[TrainingJob]:
        """Find the job folders under ``root`` (jobs of this session keep their live objects)."""
        if self.root.is_dir():
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
                key = folder.resolve()
                if key in self.jobs:
                    continue
                if any((folder / f).is_file() for f in (METADATA_FILE, EVENTS_FILE, REQUEST_FILE, "config.toml")):
                    self.jobs[key] = TrainingJob.load(folder, **self.job_options)
        return self.list()

    def list(self) -> list[TrainingJob]:
        """All known jobs, newest first."""
        return sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)

    def get(self, name_or_folder: str | Path) -> TrainingJob:
        for job in self.jobs.values():
            if job.name == str(name_or_folder) or job.folder == Path(name_or_folder).resolve():
                return job
        raise JobError(f"no training job {name_or_folder!r} in {self.root}")

    # ------------------------------------------------------------------------------ creating
    def new_folder(self, name: str) -> Path:
        """A fresh job folder name under ``root``: ``NAME``, or ``NAME-2``, ``NAME-3``... when taken."""
        base = safe_name(name)
        candidate, k = self.root / base, 2
        while candidate.exists():
            candidate, k = self.root / f"{base}-{k}", k + 1
        return candidate

    def create(self, name: str, config_text: str, device: str = "cpu", **options: Any) -> TrainingJob:
        """A new job folder holding ``request.toml`` (the trainer's configuration), not yet started."""
        folder = self.new_folder(name)
        folder.mkdir(parents=True)
        (folder / REQUEST_FILE).write_text(config_text, encoding="utf-8")
        job = TrainingJob(folder, name=folder.name, device=device, **{**self.job_options, **options})
        job.save_metadata()
        self.jobs[job.folder] = job
        for callback in self._on_new_job:
            callback(job)
        return job

    def add(self, job: TrainingJob) -> TrainingJob:
        self.jobs[job.folder] = job
        return job

    # ------------------------------------------------------------------------------ running
    def running_on(self, device: str) -> TrainingJob | None:
        """The job that occupies ``device`` now (this session's or one found running in another process)."""
        key = device_key(device)
        for job in self.jobs.values():
            if job.state.active and (device_key(job.device) == key or "auto" in (key, device_key(job.device))):
                return job
        return None

    def submit(self, job: TrainingJob, resume: bool = False) -> JobState:
        """Start (or resume) ``job`` now, or queue it while another job trains on its device."""
        self.jobs.setdefault(job.folder, job)
        if job.state.active:
            raise JobError(f"the job {job.name} is already running")
        if resume and not job.has_checkpoint():
            raise JobError(f"the job {job.name} has no checkpoint to resume from; start it again")
        busy = self.running_on(job.device)
        job.pending_action = "resume" if resume else "start"
        if busy is not None and busy is not job:
            job.waiting_for_device = True
            job.state = JobState.QUEUED
            job.message = f"queued: {busy.name} is training on {busy.device}"
            job.save_metadata()
            return job.state
        self._launch(job)
        return job.state

    def _launch(self, job: TrainingJob) -> None:
        job.waiting_for_device = False
        if job.pending_action == "resume":
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
            if job.state == JobState.QUEUED and job.waiting_for_device and self.running_on(job.device) is None:
                self._launch(job)
        return new

    def stop_all(self, timeout: float = 60.0) -> list[TrainingJob]:
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

    def on_new_job(self, callback: Callable[[TrainingJob], None]) -> None:
        self._on_new_job.append(callback)
