"""``dlir --help`` and ``dlir register --help`` start without PyTorch, SimpleITK or NumPy (lazy imports).

Checked in a fresh interpreter, as a user starts it: by ``sys.modules`` after the help is printed
and by ``python -X importtime -m dlir ...`` (every module the start-up imported).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "SimpleITK", "numpy")
PROBE = """import sys
from dlir.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("IMPORTED", *sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["register", "--help"], ["bench", "--help"], ["info", "--help"]],
                         ids=lambda a: " ".join(a))
def test_help_imports_no_heavy_library(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: dlir" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "IMPORTED", proc.stdout.splitlines()[-1]


@pytest.mark.parametrize("args", [["--help"], ["register", "--help"]], ids=lambda a: " ".join(a))
def test_importtime_lists_no_heavy_library(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "dlir", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "dlir" in imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))
    # the training flags (dlir.training.config) are built only for `dlir train`
    assert not any(line.rstrip().endswith("dlir.training.config") for line in proc.stderr.splitlines())


def test_train_help_still_lists_the_training_flags() -> None:
    proc = subprocess.run([sys.executable, "-m", "dlir", "train", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout and "--resume" in proc.stdout and "--out" in proc.stdout
