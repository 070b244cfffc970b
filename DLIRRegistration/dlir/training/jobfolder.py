"""The files of a training job folder (``dlir train --out JOB_DIR``), named once for the trainer,
the command line and the DLIR Training module.

``JOB_DIR/config.toml`` (the configuration as run, absolute paths; ``--resume`` reads it back),
``events.jsonl`` (JSON-lines progress, :mod:`dlir.training.events`), ``train.log``,
``checkpoints/last.pt`` (read back with ``torch.load(weights_only=True)`` only) and the finished
stack ``NAME.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

from ..choices import stack_file_name

CONFIG_FILE = "config.toml"
EVENTS_FILE = "events.jsonl"
LOG_FILE = "train.log"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT = Path(CHECKPOINTS_DIR) / "last.pt"


def stack_file(job_dir: str | Path, name: str) -> Path:
    """The finished stack of the job ``name`` in ``job_dir``."""
    return Path(job_dir) / stack_file_name(name)



def has_checkpoint(job_dir: str | Path) -> bool:
    """Whether the job in ``job_dir`` can resume: its checkpoint ``checkpoints/last.pt`` is a file.

    The one rule of the trainer (``dlir train --resume``) and the DLIR Training module; any other
    file in ``checkpoints/`` (e.g. the temporary file of a write that was killed) is no checkpoint.
    """
    return (Path(job_dir) / CHECKPOINT).is_file()
