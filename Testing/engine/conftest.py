"""Fixtures shared by the engine tests: small freshly initialised stage stacks saved to files and a
runner for the ``dlir`` command as a user runs it (a subprocess).  The shared development data and the
4 mm template come from ``Testing/conftest.py``.  The networks exported for ONNX Runtime
(:mod:`dlir.runtime`) are cached in a folder of the session, not in the user's home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from dlir.stack import save_stack
from testdata import coarse_stack, small_stack


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``DLIR_CACHE`` of this process and the ``dlir`` subprocesses it starts: one folder for the session."""
    folder = tmp_path_factory.mktemp("onnx-cache")
    os.environ["DLIR_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def fresh_stack_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`testdata.small_stack` saved once as ``fresh-small.safetensors``; tests must only read it."""
    return save_stack(small_stack(), tmp_path_factory.mktemp("fresh-stack") / "fresh-small.safetensors")


@pytest.fixture(scope="session")
def coarse_stack_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`testdata.coarse_stack` (identity stages at 8 mm) saved once as ``tiny.safetensors``; read only."""
    return save_stack(coarse_stack(), tmp_path_factory.mktemp("coarse-stack") / "tiny.safetensors")


@pytest.fixture(scope="session")
def run_dlir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python -m dlir ARGS`` (the installed engine), capturing text output.

    The registry's user folder points at an empty folder, so a developer's ``~/.dlir/models`` never
    changes a result; ``env`` adds or overrides environment variables.
    """
    empty_models = tmp_path_factory.mktemp("no-user-models")

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        environment = {**os.environ, "DLIR_MODELS_DIR": str(empty_models), **(env or {})}
        return subprocess.run([sys.executable, "-m", "dlir", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=environment)

    return run
