"""One training job: ``dlir train`` in a separate process, its JSON-lines events and its state.

A :class:`TrainingJob` owns one job folder (the trainer's ``--out``): the trainer writes the
files of :mod:`dlir.training.jobfolder` there (the configuration as run, the events, the log, the
checkpoints and the final ``NAME.safetensors``); this module adds ``request.toml`` (the
configuration it asked for) and ``dlir-job.json`` (who started it, with which
Python, on which device, the last known state) so a fresh Slicer lists the job again.

The process runs with the given Python (inside Slicer: ``sys.executable``, i.e. PythonSlicer) in
a process group of its own, so a stop reaches the launcher and the interpreter alike and a crash
of the trainer never touches the caller.  Two reader threads put stdout events / log lines into
a queue; :meth:`TrainingJob.poll` (call it from the GUI thread, e.g. a timer) drains the queue,
updates the state and calls the listeners, so MRML is only ever touched from the caller's thread.

The events are those of ``dlir.training.events`` (``stage`` 1-based, ``iteration`` within the stage).
States::

    queued -> running -> finished                 (a ``done`` event: ``stack`` is the file written)
                      -> failed                   (an ``error`` event, a crash, a kill, no start)
                      -> stopped                  (a ``stopped`` event: someone else signalled the trainer)
                      -> stopping -> stopped      (stop(): SIGINT, the trainer checkpoints, says ``stopped``
                                                   and exits with 130; SIGTERM, then SIGKILL after time-outs)
    stopped / failed --resume()--> running        (``dlir train --resume JOB_DIR``)

No Qt, no ``slicer.app``: this runs in Slicer, in pytest and in any Python.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from dlir.atomic import write_text_atomically
from dlir.training.jobfolder import EVENTS_FILE, LOG_FILE, has_checkpoint

log = logging.getLogger(__name__)

#: this module's own record in a job folder (the trainer's files are named in ``dlir.training.jobfolder``)
METADATA_FILE = "dlir-job.json"
#: the configuration this module asked for (the trainer writes the one it ran as ``jobfolder.CONFIG_FILE``)
REQUEST_FILE = "request.toml"

Event = dict[str, Any]
Listener = Callable[["TrainingJob", Event], None]


class JobError(Exception):
    """A job cannot be started, resumed or stopped; the message says why and what to do."""


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        """A process is (or may still be) running."""
        return self in (JobState.RUNNING, JobState.STOPPING)

    @property
    def ended(self) -> bool:
        return self in (JobState.STOPPED, JobState.FINISHED, JobState.FAILED)


def parseEvent(line: str) -> Event | None:
    """The event of one JSON-lines line, or None when the line is not an event (plain log output)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        return None
    return data


def readEvents(path: Path) -> list[Event]:
    """All events of an ``events.jsonl`` file (an unfinished last line is skipped)."""
    if not path.is_file():
        return []
    events = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            event = parseEvent(line)
            if event is not None:
                events.append(event)
    return events


def describeReturnCode(code: int | None) -> str:
    """'exit code 3' or 'killed by signal SIGKILL' (POSIX negative codes)."""
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def enginePythonPath() -> str | None:
    """The folder holding the ``dlir`` package as this process imports it (so the child finds the same engine)."""
    from importlib.util import find_spec

    spec = find_spec("dlir")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(list(spec.submodule_search_locations)[0]).resolve().parent)


@dataclass
class Progress:
    """Where a job is: stage (1-based) of ``stages``, iteration within it, speed and ETA (seconds)."""

    stage: int = 0
    stages: int = 0
    stageKind: str = ""
    iteration: int = 0
    iterations: int = 0
    itPerSecond: float = 0.0
    etaSeconds: float | None = None
    totalEtaSeconds: float | None = None
    loss: float | None = None
    stageIterations: list[int] = field(default_factory=list)
    stageKinds: list[str] = field(default_factory=list)

    @property
    def stageFraction(self) -> float:
        return min(1.0, self.iteration / self.iterations) if self.iterations else 0.0

    @property
    def overallFraction(self) -> float:
        total = sum(self.stageIterations)
        if not total or not self.stage:
            return 0.0
        done = sum(self.stageIterations[: self.stage - 1]) + min(self.iteration, self.iterations or self.iteration)
        return min(1.0, done / total)

    def text(self) -> str:
        """'Stage 2/3 (bspline): 150/500 iterations, 3.2 it/s, about 2 min left'."""
        if not self.stage:
            return "waiting for the first iteration"
        kind = f" ({self.stageKind})" if self.stageKind else ""
        of = f"/{self.iterations}" if self.iterations else ""
        parts = [f"Stage {self.stage}/{self.stages or '?'}{kind}: {self.iteration}{of} iterations"]
        if self.itPerSecond:
            parts.append(f"{self.itPerSecond:.2g} it/s")
        if self.etaSeconds is not None:
            parts.append(f"about {formatDuration(self.etaSeconds)} left in this stage")
        return ", ".join(parts)


def formatDuration(seconds: float) -> str:
    """12 s, 3 min 20 s, 2 h 05 min."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class TrainingJob:
    """One job folder and, while it runs, its ``dlir train`` process.

    ``python``: the interpreter that runs ``-m dlir`` (default ``sys.executable``; inside Slicer
    that is PythonSlicer).  ``env``: the environment of the process (default ``os.environ``);
    the folder of the engine this process imports is put in front of ``PYTHONPATH``.
    ``stopTimeout``: seconds a stopping trainer gets to write its checkpoint before SIGTERM, and
    again before SIGKILL.  ``launcher``: the command that stands for ``python -m dlir`` (default
    ``[python, "-m", "dlir"]``; e.g. an installed ``dlir`` script).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        name: str | None = None,
        device: str = "cpu",
        python: str | None = None,
        env: dict[str, str] | None = None,
        extraArgs: Sequence[str] = (),
        stopTimeout: float = 60.0,
        launcher: Sequence[str] | None = None,
    ) -> None:
        self.folder = Path(folder).resolve()
        self.name = name or self.folder.name
        self.device = device
        self.python = python or sys.executable
        self.env = env
        self.extraArgs = list(extraArgs)
        self.stopTimeout = stopTimeout
        self.launcher = list(launcher) if launcher else None
        self.state = JobState.QUEUED
        self.message = ""
        self.returncode: int | None = None
        self.progress = Progress()
        self.events: list[Event] = []  # events of this session's runs (stdout)
        self.logLines: list[str] = []
        self.stackPath: Path | None = None
        self.pid: int | None = None
        self.pendingAction = "start"  # what a queued job does when its device frees up
        self.waitingForDevice = False
        self.created = time.time()
        self._listeners: list[Listener] = []
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._lastErrorLine = ""  # the last line the trainer wrote to stderr (a crash says why there)
        self._threads: list[threading.Thread] = []
        self._stopRequestedAt: float | None = None
        self._terminatedAt: float | None = None
        self._leaderExitedAt: float | None = None
        self._killed = False
        self._seenDone: Event | None = None
        self._seenError: Event | None = None
        self._seenStopped: Event | None = None

    # ------------------------------------------------------------------------------ files
    @property
    def eventsPath(self) -> Path:
        return self.folder / EVENTS_FILE

    @property
    def logPath(self) -> Path:
        return self.folder / LOG_FILE

    @property
    def requestPath(self) -> Path:
        return self.folder / REQUEST_FILE

    def hasCheckpoint(self) -> bool:
        """Whether ``dlir train --resume`` can continue this job (:func:`dlir.training.jobfolder.has_checkpoint`)."""
        return has_checkpoint(self.folder)

    @property
    def resumable(self) -> bool:
        """A stopped or failed job with a checkpoint can go on."""
        return self.state in (JobState.STOPPED, JobState.FAILED) and self.hasCheckpoint()

    def saveMetadata(self) -> None:
        """Write ``dlir-job.json`` (atomically)."""
        data = {
            "name": self.name,
            "device": self.device,
            "python": self.python,
            "created": self.created,
            "state": self.state.value,
            "message": self.message,
            "pid": self.pid if self.state.active else None,
            "returncode": self.returncode,
            "stack": str(self.stackPath) if self.stackPath else None,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.folder / METADATA_FILE, json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, **kwargs: Any) -> "TrainingJob":
        """A job as its folder tells it (after a restart): state from its events and record."""
        folder = Path(folder)
        meta: dict[str, Any] = {}
        meta_path = folder / METADATA_FILE
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                meta = {}
        kwargs.setdefault("name", meta.get("name"))
        kwargs.setdefault("device", meta.get("device", "cpu"))
        job = cls(folder, **kwargs)
        job.created = float(meta.get("created", folder.stat().st_mtime))
        job._restore(meta)
        return job

    def _restore(self, meta: dict[str, Any]) -> None:
        events = readEvents(self.eventsPath)
        for event in events:
            self._updateProgress(event)
        done = next((e for e in reversed(events) if e.get("type") == "done"), None)
        error = next((e for e in reversed(events) if e.get("type") == "error"), None)
        last = events[-1] if events else None
        pid = meta.get("pid")
        if done is not None and last is done:
            self.state = JobState.FINISHED
            self.stackPath = self._stackFrom(done)
            self.message = f"finished; stack {self.stackPath.name if self.stackPath else '?'}"
        elif error is not None and last is error:
            self.state = JobState.FAILED
            self.message = str(error.get("message") or "the trainer reported an error")
        elif pid and _processAlive(int(pid), self.folder):
            self.state = JobState.RUNNING
            self.pid = int(pid)
            self.message = f"running in another process (pid {pid}); its progress is in {EVENTS_FILE}"
        elif meta.get("state") == JobState.QUEUED.value and not events:
            self.state = JobState.QUEUED
            self.message = "queued"
        elif self.hasCheckpoint():
            self.state = JobState.STOPPED
            where = self.progress.text() if self.progress.stage else "before its first iteration"
            self.message = meta.get("message") or f"interrupted ({where}); resume continues from the last checkpoint"
        else:
            self.state = JobState.FAILED
            self.message = meta.get("message") or "the job ended before writing a checkpoint; start it again"

    # ------------------------------------------------------------------------------ listeners
    def addListener(self, callback: Listener) -> None:
        """``callback(job, event)`` for every event (and a synthetic ``{"type": "state"}`` on state changes)."""
        self._listeners.append(callback)

    # ------------------------------------------------------------------------------ control
    def command(self, resume: bool) -> list[str]:
        """The ``dlir train`` command line of a new run or of a resume."""
        base = (self.launcher or [self.python, "-m", "dlir"]) + ["train"]
        if resume:
            args = ["--resume", str(self.folder)]
        else:
            args = ["--config", str(self.requestPath), "--out", str(self.folder)]
        return base + args + ["--progress", "jsonl"] + self.extraArgs

    def start(self) -> None:
        """Start a new run from ``request.toml`` in the job folder."""
        if not self.requestPath.is_file():
            raise JobError(f"the job folder {self.folder} has no {REQUEST_FILE}; create the job with its settings first")
        self._launch(resume=False)

    def resume(self) -> None:
        """Continue a stopped or failed job from its last checkpoint."""
        if self.state.active:
            raise JobError(f"the job {self.name} is still running")
        if self.state == JobState.FINISHED:
            raise JobError(f"the job {self.name} has finished; there is nothing to resume")
        if not self.hasCheckpoint():
            raise JobError(f"the job {self.name} has no checkpoint to resume from; start it again")
        self._launch(resume=True)

    def _launch(self, resume: bool) -> None:
        if self.state.active:
            raise JobError(f"the job {self.name} is already running")
        self.folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        engine = enginePythonPath()
        if engine:
            env["PYTHONPATH"] = os.pathsep.join([engine] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        kwargs: dict[str, Any] = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True
        else:
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        cmd = self.command(resume)
        self._resetRun()
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          env=env, cwd=str(self.folder), text=True, encoding="utf-8", errors="replace",
                                          bufsize=1, **kwargs)
        except OSError as exc:
            self._setState(JobState.FAILED, f"could not start the trainer with {self.python}: {exc}")
            return
        self.pid = self._proc.pid
        self._log(f"$ {' '.join(cmd)}")
        self._setState(JobState.RUNNING, "resuming from the last checkpoint" if resume else "starting")
        out = threading.Thread(target=self._read, args=(self._proc.stdout, True), daemon=True, name=f"dlir-{self.name}-out")
        err = threading.Thread(target=self._read, args=(self._proc.stderr, False), daemon=True, name=f"dlir-{self.name}-err")
        waiter = threading.Thread(target=self._waitExit, args=(self._proc, out, err), daemon=True, name=f"dlir-{self.name}-wait")
        self._threads = [out, err, waiter]
        for t in self._threads:
            t.start()

    def _resetRun(self) -> None:
        self._queue = queue.Queue()
        self._lastErrorLine = ""
        self._stopRequestedAt = None
        self._terminatedAt = None
        self._leaderExitedAt = None
        self._killed = False
        self._seenDone = None
        self._seenError = None
        self._seenStopped = None
        self.returncode = None

    def stop(self) -> None:
        """Ask the trainer to write a checkpoint and exit (SIGINT; escalated by :meth:`poll` after ``stopTimeout``)."""
        if self.state == JobState.QUEUED:
            self.waitingForDevice = False
            self._setState(JobState.STOPPED if self.hasCheckpoint() else JobState.FAILED, "removed from the queue before it ran")
            return
        if self.state != JobState.RUNNING or self._proc is None:
            return
        self._stopRequestedAt = time.monotonic()
        self._signal(signal.SIGINT if os.name == "posix" else signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
        self._setState(JobState.STOPPING, "stopping: the trainer writes a checkpoint and exits")

    def kill(self) -> None:
        """End the process group at once (SIGKILL); the job can resume from its last checkpoint."""
        if self._proc is not None and self.state.active:
            self._killed = True
            self._signal(signal.SIGKILL if os.name == "posix" else signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            if os.name == "posix":
                os.killpg(proc.pid, sig)  # the group: launcher (PythonSlicer) and interpreter alike
            else:
                proc.send_signal(sig)
        except (ProcessLookupError, PermissionError, OSError):
            pass

    # ------------------------------------------------------------------------------ threads
    def _read(self, stream: Any, isStdout: bool) -> None:
        try:
            for line in iter(stream.readline, ""):
                event = parseEvent(line) if isStdout else None
                if event is not None:
                    self._queue.put(("event", event))
                else:
                    self._queue.put(("line" if isStdout else "error_line", line.rstrip("\r\n")))
        except (OSError, ValueError) as exc:  # closed pipe
            self._queue.put(("line", f"(output stream closed: {exc})"))
        finally:
            try:
                stream.close()
            except OSError:
                pass

    def _waitExit(self, proc: subprocess.Popen, *readers: threading.Thread) -> None:
        code = proc.wait()
        self._queue.put(("leader_exit", code))
        # the launcher (PythonSlicer) may exit before the interpreter it started: the run ends when the pipes close
        for reader in readers:
            reader.join()
        self._queue.put(("exit", code))

    # ------------------------------------------------------------------------------ polling
    def poll(self) -> list[Event]:
        """Take in what the process said since the last call; returns the new events (GUI thread)."""
        new: list[Event] = []
        while True:
            try:
                kind, payload = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "event":
                new.append(payload)
                self._onEvent(payload)
            elif kind in ("line", "error_line"):
                self._log(payload)
                if kind == "error_line" and payload.strip():
                    self._lastErrorLine = payload
            elif kind == "leader_exit":
                self._leaderExitedAt = time.monotonic()
            elif kind == "exit":
                self._onExit(int(payload))
        self._escalateStop()
        self._reapOrphans()
        return new

    def wait(self, timeout: float, interval: float = 0.1) -> JobState:
        """Poll until the job has ended; :class:`TimeoutError` after ``timeout`` seconds (tests, scripts)."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if not self.state.active and self.state != JobState.QUEUED:
                return self.state
            if time.monotonic() > deadline:
                raise TimeoutError(f"the job {self.name} is still {self.state.value} after {timeout:.0f} s")
            time.sleep(interval)

    def waitFor(self, predicate: Callable[[Event], bool], timeout: float, interval: float = 0.05) -> Event:
        """Poll until an event satisfies ``predicate``; returns it (TimeoutError otherwise, JobError when the job ends first)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.poll():
                if predicate(event):
                    return event
            if self.state.ended:
                raise JobError(f"the job {self.name} ended ({self.state.value}: {self.message}) before the awaited event")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no awaited event from the job {self.name} within {timeout:.0f} s")
            time.sleep(interval)

    def _reapOrphans(self) -> None:
        """The started process has exited but something of its group still holds the output open: end it."""
        if (self.state == JobState.RUNNING and self._leaderExitedAt is not None and not self._killed
                and time.monotonic() - self._leaderExitedAt > self.stopTimeout):
            self._log(f"the trainer's process exited {self.stopTimeout:.0f} s ago but its output is still open; ending its process group")
            self.kill()

    def _escalateStop(self) -> None:
        if self.state != JobState.STOPPING or self._stopRequestedAt is None:
            return
        now = time.monotonic()
        if self._terminatedAt is None and now - self._stopRequestedAt > self.stopTimeout:
            self._log(f"the trainer did not stop within {self.stopTimeout:.0f} s; sending SIGTERM")
            self._terminatedAt = now
            self._signal(signal.SIGTERM)
        elif self._terminatedAt is not None and not self._killed and now - self._terminatedAt > self.stopTimeout:
            self._log("the trainer still runs; killing it")
            self.kill()

    def _onEvent(self, event: Event) -> None:
        self.events.append(event)
        self._updateProgress(event)
        kind = event.get("type")
        if kind == "done":
            self._seenDone = event
            self.stackPath = self._stackFrom(event)
        elif kind == "error":
            self._seenError = event
            self.message = str(event.get("message") or "the trainer reported an error")
        elif kind == "stopped":
            self._seenStopped = event
        elif kind == "iteration" and self.state == JobState.RUNNING:
            self.message = self.progress.text()
        self._notify(event)

    def _updateProgress(self, event: Event) -> None:
        p = self.progress
        kind = event.get("type")
        if kind == "start":
            stages = event.get("stages")
            if isinstance(stages, list) and stages:
                p.stages = len(stages)
                p.stageIterations = [int(s.get("iterations", 0)) for s in stages]
                p.stageKinds = [str(s.get("kind", "")) for s in stages]
        if kind in ("start", "iteration", "validation", "checkpoint", "stopped") and "stage" in event:
            self._moveTo(stageNumber(event), int(event.get("iteration", 0)))
        elif kind == "stage_done":
            self._moveTo(stageNumber(event), int(event.get("iterations", 0)))
            p.etaSeconds = 0.0
        if kind == "iteration":
            if event.get("iterations"):
                p.iterations = int(event["iterations"])
            p.itPerSecond = float(event.get("it_per_s") or 0.0)
            p.etaSeconds = _floatOrNone(event.get("eta_s"))
            p.totalEtaSeconds = _floatOrNone(event.get("total_eta_s"))
            p.loss = _floatOrNone(event.get("loss"))

    def _moveTo(self, stage: int, iteration: int) -> None:
        """Progress at ``iteration`` of ``stage`` (1-based); the trainer's checkpoint after the last stage names stage n + 1."""
        p = self.progress
        if p.stages and stage > p.stages:
            stage, iteration = p.stages, p.stageIterations[-1]
        p.stage, p.iteration = stage, iteration
        if 0 < stage <= len(p.stageKinds):
            p.stageKind = p.stageKinds[stage - 1]
            p.iterations = p.stageIterations[stage - 1]

    def _stackFrom(self, event: Event) -> Path | None:
        """The stack file a ``done`` event names (``stack``; relative paths are in the job folder)."""
        value = event.get("stack")
        if not isinstance(value, str) or not value:
            return None
        path = Path(value)
        return path if path.is_absolute() else self.folder / path

    def _onExit(self, code: int) -> None:
        self.returncode = code
        self.pid = None
        how = describeReturnCode(code)
        if self._seenDone is not None:
            state, message = JobState.FINISHED, f"finished; stack {self.stackPath.name if self.stackPath else '(not found)'}"
            if code != 0:
                message += f" (the trainer then ended with {how})"
        elif self._seenError is not None:
            state, message = JobState.FAILED, str(self._seenError.get("message") or f"the trainer failed ({how})")
        elif self._seenStopped is not None or self._stopRequestedAt is not None:
            state = JobState.STOPPED
            where = self.progress.text()
            if self._killed:
                message = f"did not stop within {2 * self.stopTimeout:.0f} s and was killed ({where}); resume from the last checkpoint"
            elif self.hasCheckpoint():
                message = f"stopped ({where}); resume continues from the checkpoint"
            else:
                message = "stopped before the first checkpoint; start it again"
        else:
            state = JobState.FAILED
            tail = self._lastErrorLine or next(
                (line for line in reversed(self.logLines) if line.strip() and not line.startswith("$ ")), "")
            message = f"the training process ended unexpectedly ({how})"
            if self._killed:
                message += " and left processes behind, which were ended"
            if tail:
                message += f"; last output: {tail.strip()[:300]}"
            if self.hasCheckpoint():
                message += "; resume continues from the last checkpoint"
        self._setState(state, message)

    # ------------------------------------------------------------------------------ helpers
    def _setState(self, state: JobState, message: str) -> None:
        self.state, self.message = state, message
        try:
            self.saveMetadata()
        except OSError as exc:
            log.warning("could not write the job record of %s: %s", self.name, exc)
        self._notify({"type": "state", "state": state.value, "message": message})

    def _notify(self, event: Event) -> None:
        for callback in list(self._listeners):
            try:
                callback(self, event)
            except Exception:  # a broken listener must not stop the job's bookkeeping
                log.exception("a training-job listener failed")

    def _log(self, line: str) -> None:
        self.logLines.append(line)
        if len(self.logLines) > 5000:
            del self.logLines[:1000]

    def __repr__(self) -> str:
        return f"TrainingJob({self.name!r}, {self.state.value}, {self.folder})"


def stageNumber(event: Event) -> int:
    """The 1-based stage of an event (0 when it names none)."""
    return int(event.get("stage", 0))


def _floatOrNone(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _processAlive(pid: int, folder: Path) -> bool:
    """True when ``pid`` runs and (where /proc exists) its command line names ``folder``."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OSError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return str(folder.resolve()) in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
    return True
