"""Fixtures of the DLIR Training tests (pytest on the slicer-core wheel, CPU).

``DLIRTraining/`` goes on ``sys.path`` so ``DLIRTrainingLib`` imports as in Slicer (the top-level
conftest already puts the engine, ``DLIRRegistration/``, there).  ``fake_trainer`` is a small
script that speaks the trainer's JSON-lines protocol (for the state machine and parsing tests);
the acceptance tests (``test_real_trainer.py``) run the real ``dlir train``.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DLIRTraining"))
if str(REPO / "DLIRRegistration") not in sys.path:
    sys.path.insert(0, str(REPO / "DLIRRegistration"))


FAKE_TRAINER = r'''
"""A stand-in for `dlir train`: JSON-lines events on stdout and in the job's events file; FAKE_MODE picks the behaviour."""
import json, os, signal, sys, time
from pathlib import Path

args = sys.argv[1:]
assert args[0] == "train", args
resume = "--resume" in args
out = Path(args[args.index("--resume" if resume else "--out") + 1])
out.mkdir(parents=True, exist_ok=True)
mode = os.environ.get("FAKE_MODE", "ok")
delay = float(os.environ.get("FAKE_DELAY", "0"))
stages = [{"kind": "affine", "iterations": 4}, {"kind": "bspline", "iterations": 6}]
events = (out / EVENTS_FILE).open("a", encoding="utf-8")
stop = {"now": False}

def emit(event_type, /, **data):
    line = json.dumps({"type": event_type, "time": time.time(), **data})
    events.write(line + "\n"); events.flush()
    print(line, flush=True)

def on_signal(signum, frame):
    stop["now"] = True

if mode == "hang":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

state_file = out / CHECKPOINT
stage, it = 1, 0
if resume:
    saved = json.loads(state_file.read_text(encoding="utf-8"))
    stage, it = saved["stage"], saved["iteration"]
emit("start", stages=stages, resumed=resume)
print("plain log line from the fake trainer", flush=True)
print("a warning on stderr", file=sys.stderr, flush=True)
if mode == "error":
    emit("error", message="the data folder /nowhere holds no readable 3D image")
    sys.exit(2)
if mode == "crash":
    print("Traceback (most recent call last):\nRuntimeError: boom", file=sys.stderr, flush=True)
    sys.exit(1)
while stage <= len(stages):
    total = stages[stage - 1]["iterations"]
    while it < total:
        it += 1
        emit("iteration", stage=stage, iteration=it, iterations=total, loss=-0.5 - 0.01 * it, ncc=0.5 + 0.01 * it,
             bending=0.001 * it, it_per_s=10.0, eta_s=(total - it) / 10.0)
        if it % 3 == 0:
            emit("validation", stage=stage, iteration=it, dice={"1": 0.5 + 0.01 * it, "2": 0.6}, folding=0.0)
        if it % 2 == 0:
            state_file.parent.mkdir(exist_ok=True)
            state_file.write_text(json.dumps({"stage": stage, "iteration": it}), encoding="utf-8")
            emit("checkpoint", stage=stage, iteration=it, path=str(state_file), reason="interval")
        time.sleep(delay)
        if mode == "hang":
            time.sleep(3600)
        if stop["now"]:
            state_file.write_text(json.dumps({"stage": stage, "iteration": it}), encoding="utf-8")
            emit("checkpoint", stage=stage, iteration=it, path=str(state_file), reason="signal")
            emit("stopped", stage=stage, iteration=it, signal="SIGINT")
            sys.exit(130)
    emit("stage_done", stage=stage, kind=stages[stage - 1]["kind"], iterations=total)
    stage, it = stage + 1, 0
(out / "fake.safetensors").write_bytes(b"not really a stack")
emit("done", stack=str(out / "fake.safetensors"))
'''


@pytest.fixture(scope="session")
def fake_trainer(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The launcher command of the fake trainer (stands for ``python -m dlir``)."""
    path = tmp_path_factory.mktemp("fake-trainer") / "fake_dlir.py"
    from dlir.training.jobfolder import CHECKPOINT, EVENTS_FILE

    names = f"EVENTS_FILE, CHECKPOINT = {EVENTS_FILE!r}, {CHECKPOINT.as_posix()!r}  # dlir.training.jobfolder\n"
    path.write_text(names + textwrap.dedent(FAKE_TRAINER), encoding="utf-8")
    return [sys.executable, str(path)]

