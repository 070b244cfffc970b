"""``dlir --help`` and ``dlir register --help`` start without PyTorch, SimpleITK or NumPy (lazy imports).

Checked in a fresh interpreter, as a user starts it: by ``sys.modules`` after the help is printed
and by ``python -X importtime -m dlir ...`` (every module the start-up imported).
"""

from __future__ import annotations

import os
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


WATCH = """import os, sys
seen = {}
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "policy" not in seen:
            seen["policy"] = os.environ.get("OMP_WAIT_POLICY", "unset")
        return None
sys.meta_path.insert(0, Watch())
from dlir.cli import main
main(sys.argv[1:])
print("POLICY", seen.get("policy", "torch not imported"))
"""


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_register_sets_a_passive_openmp_wait_policy_before_torch_starts(tmp_path, given, expected) -> None:
    """``dlir register`` sets ``OMP_WAIT_POLICY=PASSIVE`` (:data:`dlir.cli.OMP_WAIT_POLICY`) before PyTorch's OpenMP
    runtime reads it, unless the user set it."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": given} if given else {})
    args = ["register", str(tmp_path / "absent_fixed.nii.gz"), str(tmp_path / "absent_moving.nii.gz"), "--stack",
            "brain-mri", "--out", str(tmp_path / "out"), "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-c", WATCH, *args], capture_output=True, text=True, timeout=120, env=env)
    assert f"POLICY {expected}" in proc.stdout, proc.stdout + proc.stderr
