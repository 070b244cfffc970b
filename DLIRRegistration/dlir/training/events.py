"""Training progress as JSON-lines events: one JSON object per line in ``JOB_DIR/events.jsonl`` and,
with ``--progress jsonl``, on stdout (the DLIR Training module reads these).

Schema (every event has ``type`` and ``time``, seconds since the epoch; ``stage`` is 1-based;
``iteration`` counts within the stage, 1-based)::

    start       stages: [{kind, iterations, control_point_spacing?, spacing_mm}], name, job, resumed (bool),
                stage, iteration (where a resumed run continues), images, validation_pairs, device, world_size,
                baseline (validation metrics before registration: the initial alignment alone; {} without
                validation pairs)
    iteration   stage, iteration, iterations, loss, ncc, bending, it_per_s, eta_s (this stage),
                total_eta_s (whole job), lr, pairs (the training pairs drawn in this stage so far, by kind:
                {synthetic, inter_subject, listed, shapes, shapes_two_draws: pairs of each kind; cropped,
                misaligned, contrast: how many of them had a partial field of view, a random initial misalignment
                or one image given a random contrast};
                dlir.training.trainer.PAIR_KINDS; rank 0's draws under torchrun)
    validation  stage, iteration, dice: {label: mean Dice}, dice_mean, folding (fraction of voxels with
                det J <= 0), ncc, best (bool: these weights are now the stage's best)
    checkpoint  stage, iteration, path, reason ("interval", "stage_done", "signal")
    stage_done  stage, kind, iterations, seconds, best: {iteration, dice_mean?, ncc, folding}, pairs (the
                stage's counts, as in iteration)
    done        stack (path of NAME.safetensors), seconds, validation (the manifest's scores)
    error       message (one sentence), kind (the exception class)
    stopped     stage, iteration, signal (the run stops after a checkpoint; --resume continues)
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

EVENT_TYPES = ("start", "iteration", "validation", "checkpoint", "stage_done", "done", "error", "stopped")


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventLog:
    """Appends events to ``path`` (flushed per line) and, when ``echo`` is given, writes them there too."""

    def __init__(self, path: Path | None, echo: TextIO | None = None) -> None:
        self.path = path
        self.echo = echo
        self._file = path.open("a", encoding="utf-8") if path is not None else None

    def emit(self, event_type: str, /, **data: Any) -> dict[str, Any]:
        if event_type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {event_type!r}")
        event = {"type": event_type, "time": round(time.time(), 3), **_clean(data)}
        line = json.dumps(event)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        if self.echo is not None:
            print(line, file=self.echo, flush=True)
        return event

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def stdout_echo(mode: str) -> TextIO | None:
    """Where events are echoed for a ``--progress`` mode (``jsonl``: stdout)."""
    return sys.stdout if mode == "jsonl" else None
