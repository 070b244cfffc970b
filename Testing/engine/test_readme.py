"""The README's quick-start command works: the bundled ``brain-mri`` stack on the bundled sample pair;
and its test command is the one ``.ci/run`` runs.

The command's ``dlir register ...`` part runs as written (from the repository root, with this
Python's ``dlir``); the venv set-up before it is what ``.ci/run`` already did.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def quick_start_command() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the README's Quick start has no bash block"
    line = block.group(1).strip()
    assert line.startswith("python3 -m venv .venv && .venv/bin/pip install"), line
    register = line.split(" && ")[-1]
    words = shlex.split(register)
    assert words[0] == ".venv/bin/dlir" and words[1] == "register", words
    return words[1:]


def test_quick_start_registers_the_sample_pair_with_the_bundled_stack(tmp_path: Path) -> None:
    args = quick_start_command()
    out = tmp_path / "sample"
    args[args.index("--out") + 1] = str(out)
    result = subprocess.run([sys.executable, "-m", "dlir", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                            encoding="utf-8")
    assert result.returncode == 0, result.stderr
    assert re.search(r"registered with brain-mri on cpu in [0-9.]+ s \(folding [0-9.]+ %", result.stdout), result.stdout
    report = json.loads((out / "result.json").read_text(encoding="utf-8"))
    for name in ("warped.nii.gz", "transform.h5", "jacobian.nii.gz", "labels.nii.gz"):
        assert (out / name).is_file(), name
    dice = report["dice"]
    assert len(dice) == 4
    mean_before = sum(d["before"] for d in dice.values()) / len(dice)
    mean_after = sum(d["after"] for d in dice.values()) / len(dice)
    assert mean_after > mean_before + 0.05, (mean_before, mean_after)  # the trained stack registers, not just runs
    assert report["folding_fraction"] < 1e-3


def test_ci_runs_the_readme_test_command_linter_first() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Install and test", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the README's Install and test has no bash block"
    # one command over lines joined by "&& \\": the main suite, then the browser page's suite in its own environment
    commands = [line.strip().removesuffix("\\").strip().removesuffix("&&").strip() for line in block.group(1).strip().splitlines()]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    for command in commands:
        assert command in ci, f".ci/run does not run the README's test command {command!r}"
    steps = commands[0].split(" && ")
    assert steps.index(".venv/bin/ruff check .") < steps.index(".venv/bin/python -m pytest -q"), steps
