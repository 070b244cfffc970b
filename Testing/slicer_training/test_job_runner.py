"""The job runner's state machine and event parsing against a fake trainer (fast; no torch in the child)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from DLIRTrainingLib.job import (
    METADATA_FILE,
    REQUEST_FILE,
    JobError,
    JobState,
    TrainingJob,
    describeReturnCode,
    formatDuration,
    parseEvent,
    readEvents,
)
from DLIRTrainingLib.jobs import JobManager, deviceKey, safeName
from dlir.training.jobfolder import CHECKPOINT, has_checkpoint


def make_job(tmp_path: Path, fake_trainer: list[str], mode: str = "ok", name: str = "job", delay: float = 0.0,
             stopTimeout: float = 30.0) -> TrainingJob:
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / REQUEST_FILE).write_text('name = "fake"\n')
    env = dict(os.environ, FAKE_MODE=mode, FAKE_DELAY=str(delay))
    return TrainingJob(folder, launcher=fake_trainer, env=env, stopTimeout=stopTimeout)


def test_parse_event_accepts_events_only() -> None:
    assert parseEvent('{"type": "iteration", "loss": -0.5}\n') == {"type": "iteration", "loss": -0.5}
    for line in ("", "plain text", "[1, 2]", '{"no_type": 1}', '{"type": 3}', '{"type": "x"', "  {broken"):
        assert parseEvent(line) is None


def test_read_events_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "start"}\nnot json\n{"type": "iteration", "iteration": 1}\n{"type": "itera')
    assert [e["type"] for e in readEvents(path)] == ["start", "iteration"]
    assert readEvents(tmp_path / "missing.jsonl") == []


def test_helpers() -> None:
    assert describeReturnCode(-signal.SIGKILL) == "killed by signal SIGKILL"
    assert describeReturnCode(2) == "exit code 2"
    assert formatDuration(12) == "12 s" and formatDuration(200) == "3 min 20 s" and formatDuration(7500) == "2 h 05 min"
    assert safeName(" my stack/v1 ") == "my-stack-v1" and safeName("///") == "stack"
    assert deviceKey("cuda") == "cuda:0" and deviceKey("CPU") == "cpu"


def test_job_runs_to_the_end(tmp_path: Path, fake_trainer: list[str]) -> None:
    job = make_job(tmp_path, fake_trainer)
    seen: list[str] = []
    job.addListener(lambda j, e: seen.append(e["type"]))
    job.start()
    assert job.state == JobState.RUNNING
    assert job.wait(60) == JobState.FINISHED, job.message
    assert job.returncode == 0
    assert job.stackPath == job.folder / "fake.safetensors"
    kinds = [e["type"] for e in job.events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("iteration") == 10
    assert "state" in seen and "done" in seen
    # progress: the last stage, complete
    assert (job.progress.stage, job.progress.stages, job.progress.stageKind) == (2, 2, "bspline")
    assert job.progress.stageFraction == 1.0 and job.progress.overallFraction == 1.0
    # plain stdout and stderr lines go to the log, events do not
    assert "plain log line from the fake trainer" in job.logLines
    assert "a warning on stderr" in job.logLines
    assert not any(line.startswith('{"type"') for line in job.logLines)
    meta = json.loads((job.folder / METADATA_FILE).read_text(encoding="utf-8"))
    assert meta["state"] == "finished" and meta["pid"] is None


def test_error_event_fails_with_its_message(tmp_path: Path, fake_trainer: list[str]) -> None:
    job = make_job(tmp_path, fake_trainer, mode="error")
    job.start()
    assert job.wait(60) == JobState.FAILED
    assert job.message == "the data folder /nowhere holds no readable 3D image"
    assert job.returncode == 2


def test_crash_without_event_fails_with_exit_code_and_last_output(tmp_path: Path, fake_trainer: list[str]) -> None:
    job = make_job(tmp_path, fake_trainer, mode="crash")
    job.start()
    assert job.wait(60) == JobState.FAILED
    assert "ended unexpectedly (exit code 1)" in job.message
    assert "RuntimeError: boom" in job.message


def test_missing_interpreter_fails_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / REQUEST_FILE).write_text("")
    job = TrainingJob(folder, python=str(tmp_path / "no-such-python"))
    job.start()
    assert job.state == JobState.FAILED and "could not start the trainer" in job.message
    with pytest.raises(JobError, match="no checkpoint"):
        job.resume()


def test_start_needs_a_request(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=REQUEST_FILE):
        TrainingJob(tmp_path / "empty").start()


def test_stop_then_resume_continues(tmp_path: Path, fake_trainer: list[str]) -> None:
    job = make_job(tmp_path, fake_trainer, delay=0.05)
    job.start()
    job.waitFor(lambda e: e["type"] == "iteration" and e["stage"] == 2 and e["iteration"] == 2, timeout=60)
    job.stop()
    assert job.state == JobState.STOPPING
    assert job.wait(60) == JobState.STOPPED, job.message
    assert job.resumable and "resume" in job.message
    stopped_at = max(e["iteration"] for e in job.events if e["type"] == "iteration" and e["stage"] == 2)
    job.resume()
    assert job.wait(60) == JobState.FINISHED, job.message
    resumed = [e for e in job.events if e["type"] == "start"][-1]
    assert resumed["resumed"] is True
    after = [e["iteration"] for e in job.events[job.events.index(resumed):] if e["type"] == "iteration"]
    assert after[0] == stopped_at + 1 and after[-1] == 6


def test_a_trainer_signalled_by_someone_else_ends_stopped(tmp_path: Path, fake_trainer: list[str]) -> None:
    job = make_job(tmp_path, fake_trainer, delay=0.05)
    job.start()
    job.waitFor(lambda e: e["type"] == "iteration" and e["stage"] == 2, timeout=60)
    os.kill(job.pid, signal.SIGTERM)  # e.g. a shutdown: the trainer checkpoints, says "stopped" and exits with 130
    assert job.wait(60) == JobState.STOPPED, job.message
    assert job.returncode == 130 and job.resumable and "resume" in job.message


def test_progress_follows_the_trainers_events(tmp_path: Path) -> None:
    """The real trainer's sequence: its checkpoint after the last stage names stage n + 1, iteration 0."""
    folder = tmp_path / "job"
    folder.mkdir()
    events = [
        {"type": "start", "stage": 1, "iteration": 0, "resumed": False,
         "stages": [{"kind": "affine", "iterations": 4}, {"kind": "bspline", "iterations": 6}]},
        {"type": "iteration", "stage": 1, "iteration": 4, "iterations": 4, "it_per_s": 2.0, "eta_s": 0.0, "total_eta_s": 3.0},
        {"type": "stage_done", "stage": 1, "kind": "affine", "iterations": 4},
        {"type": "checkpoint", "stage": 2, "iteration": 0, "reason": "stage_done"},
    ]
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    p = TrainingJob.load(folder).progress
    assert (p.stage, p.stageKind, p.iteration, p.iterations) == (2, "bspline", 0, 6) and p.overallFraction == 0.4
    events += [{"type": "stage_done", "stage": 2, "kind": "bspline", "iterations": 6},
               {"type": "checkpoint", "stage": 3, "iteration": 0, "reason": "stage_done"}]
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    p = TrainingJob.load(folder).progress
    assert (p.stage, p.stages, p.stageKind, p.iteration) == (2, 2, "bspline", 6) and p.overallFraction == 1.0
    assert p.text().startswith("Stage 2/2 (bspline): 6/6 iterations")


def test_stop_escalates_to_kill_when_the_trainer_ignores_signals(tmp_path: Path, fake_trainer: list[str]) -> None:
    job = make_job(tmp_path, fake_trainer, mode="hang", stopTimeout=0.5)
    job.start()
    job.waitFor(lambda e: e["type"] == "iteration", timeout=60)
    job.stop()
    t0 = time.monotonic()
    assert job.wait(30) == JobState.STOPPED
    assert time.monotonic() - t0 < 15
    assert "killed" in job.message
    assert job.returncode == -signal.SIGKILL


def test_a_killed_trainer_fails_clearly_and_can_resume(tmp_path: Path, fake_trainer: list[str]) -> None:
    job = make_job(tmp_path, fake_trainer, delay=0.05)
    job.start()
    job.waitFor(lambda e: e["type"] == "checkpoint", timeout=60)
    os.kill(job.pid, signal.SIGKILL)  # the process dies under us (OOM killer, user, crash)
    assert job.wait(30) == JobState.FAILED
    assert "ended unexpectedly (killed by signal SIGKILL)" in job.message and "resume" in job.message
    assert job.resumable
    job.resume()
    assert job.wait(60) == JobState.FINISHED, job.message


def test_one_job_per_device_and_the_queue(tmp_path: Path, fake_trainer: list[str]) -> None:
    env = dict(os.environ, FAKE_MODE="ok", FAKE_DELAY="0.02")
    manager = JobManager(tmp_path / "jobs", launcher=fake_trainer, env=env)
    first = manager.create("first", "", device="cpu")
    second = manager.create("second", "", device="cpu")
    other = manager.create("other", "", device="cuda:1")
    assert manager.submit(first) == JobState.RUNNING
    assert manager.submit(second) == JobState.QUEUED and "first" in second.message
    assert manager.submit(other) == JobState.RUNNING  # another device
    assert manager.runningOn("cpu") is first
    with pytest.raises(JobError, match="already running"):
        manager.submit(first)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not all(j.state == JobState.FINISHED for j in (first, second, other)):
        manager.poll()
        assert not (first.state.active and second.state.active), "two jobs ran on one device"
        time.sleep(0.05)
    assert [j.state for j in (first, second, other)] == [JobState.FINISHED] * 3


def test_jobs_are_listed_again_after_a_restart(tmp_path: Path, fake_trainer: list[str]) -> None:
    root = tmp_path / "jobs"
    manager = JobManager(root, launcher=fake_trainer, env=dict(os.environ, FAKE_MODE="ok", FAKE_DELAY="0.03"))
    done = manager.create("done", "")
    manager.submit(done)
    assert done.wait(60) == JobState.FINISHED
    stopped = manager.create("stopped", "")
    manager.submit(stopped)
    stopped.waitFor(lambda e: e["type"] == "iteration" and e["stage"] == 2, timeout=60)
    stopped.stop()
    assert stopped.wait(60) == JobState.STOPPED
    broken = manager.create("broken", "")
    broken.env = dict(os.environ, FAKE_MODE="error")
    manager.submit(broken)
    assert broken.wait(60) == JobState.FAILED
    # a job whose Slicer died while it ran: no end event, no live process, checkpoints on disk
    orphan = root / "orphan"
    orphan.mkdir()
    (orphan / CHECKPOINT).parent.mkdir()
    (orphan / CHECKPOINT).write_text("{}")
    (orphan / "events.jsonl").write_text(json.dumps({"type": "start", "stages": [{"kind": "affine", "iterations": 5}]}) + "\n"
                                         + json.dumps({"type": "iteration", "stage": 1, "iteration": 3}) + "\n")
    (orphan / METADATA_FILE).write_text(json.dumps({"name": "orphan", "state": "running", "pid": 2**22 + 12345}))

    fresh = JobManager(root, launcher=fake_trainer, env=dict(os.environ, FAKE_MODE="ok"))
    jobs = {j.name: j for j in fresh.refresh()}
    assert set(jobs) == {"done", "stopped", "broken", "orphan"}
    assert jobs["done"].state == JobState.FINISHED and jobs["done"].stackPath.name == "fake.safetensors"
    assert jobs["stopped"].state == JobState.STOPPED and jobs["stopped"].resumable
    assert jobs["broken"].state == JobState.FAILED and "no readable 3D image" in jobs["broken"].message
    assert jobs["orphan"].state == JobState.STOPPED and jobs["orphan"].progress.iteration == 3
    assert jobs["stopped"].progress.stage == 2
    # the fresh manager resumes the stopped job to the end
    fresh.submit(jobs["stopped"], resume=True)
    assert jobs["stopped"].wait(60) == JobState.FINISHED


@pytest.mark.parametrize("leftover", ["last.pt.tmp", ".last.pt.dlir-1a2b3c4d.tmp", "other.pt"])
def test_only_the_trainers_checkpoint_makes_a_job_resumable(tmp_path: Path, leftover: str) -> None:
    """A stopped job offers a resume only when ``dlir train --resume`` finds its checkpoint: another file in
    ``checkpoints/`` (a temporary file left by a killed write) is none, for the module as for the trainer."""
    folder = tmp_path / "job"
    (folder / CHECKPOINT).parent.mkdir(parents=True)
    (folder / CHECKPOINT).with_name(leftover).write_bytes(b"half a checkpoint")
    (folder / "events.jsonl").write_text(json.dumps({"type": "start", "stages": [{"kind": "affine", "iterations": 5}]}) + "\n"
                                         + json.dumps({"type": "iteration", "stage": 1, "iteration": 3}) + "\n")
    job = TrainingJob.load(folder)
    assert not has_checkpoint(folder)
    assert not job.hasCheckpoint() and not job.resumable and job.state == JobState.FAILED
    with pytest.raises(JobError, match="no checkpoint"):
        job.resume()
    (folder / CHECKPOINT).write_bytes(b"a checkpoint")
    job = TrainingJob.load(folder)
    assert has_checkpoint(folder) and job.state == JobState.STOPPED and job.resumable


def test_a_job_running_elsewhere_is_shown_running(tmp_path: Path) -> None:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    # this very process stands for a trainer started by another Slicer (its command line names the folder)
    (folder / METADATA_FILE).write_text(json.dumps({"name": "elsewhere", "state": "running", "pid": os.getpid()}))
    (folder / "events.jsonl").write_text(json.dumps({"type": "start"}) + "\n")
    job = TrainingJob.load(folder)
    if Path(f"/proc/{os.getpid()}/cmdline").exists() and str(folder) not in " ".join(sys.argv):
        assert job.state == JobState.FAILED  # our pid's command line does not name the folder: not that job
    else:
        assert job.state == JobState.RUNNING


def test_a_launcher_that_dies_on_sigint_does_not_cut_the_checkpoint(tmp_path: Path, fake_trainer: list[str]) -> None:
    """Like PythonSlicer: a launcher process runs the interpreter; SIGINT reaches both (one process group)."""
    launcher = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))", *fake_trainer]
    job = make_job(tmp_path, launcher, delay=0.05)
    job.start()
    job.waitFor(lambda e: e["type"] == "iteration" and e["stage"] == 2, timeout=60)
    job.stop()
    assert job.wait(60) == JobState.STOPPED, job.message
    assert [e["type"] for e in job.events[-2:]] == ["checkpoint", "stopped"] and job.events[-2]["reason"] == "signal"
    job.resume()
    assert job.wait(60) == JobState.FINISHED, job.message


def test_processes_left_behind_by_an_exited_trainer_are_ended(tmp_path: Path) -> None:
    orphan = "import time; print('{\"type\": \"start\"}', flush=True); time.sleep(3600)"
    launcher = [sys.executable, "-c", f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {orphan!r}])"]
    job = make_job(tmp_path, launcher, stopTimeout=0.5)
    job.start()
    assert job.wait(30) == JobState.FAILED
    assert "left processes behind, which were ended" in job.message
    assert [e["type"] for e in job.events] == ["start"]
