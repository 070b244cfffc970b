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


def test_finding_a_stack_by_name_imports_no_compiler() -> None:
    """Looking a stack up by name checks every registry file's tensor table on the meta device; that must not pull in
    torch's compiler (torch._dynamo, imported by a decomposition on the meta device: over a second of every
    `dlir register` on 2 cores)."""
    probe = ("import sys\nfrom dlir.stack import resolve_stack\nresolve_stack('brain-mri')\n"
             "print('IMPORTED', *sorted(m for m in ('torch._dynamo',) if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "IMPORTED", proc.stdout
