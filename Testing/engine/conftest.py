"""Fixtures shared by the engine tests: the shared development data, a small freshly initialised
stage stack and a runner for the ``dlir`` command as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from dlir.recipe import Recipe, StageSpec
from dlir.stack import Manifest, build_stack, save_stack

#: ../shared/data seen from the repository root (real images and synthetic pairs with ground truth)
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def small_recipe() -> Recipe:
    """Affine at 8 mm + one B-spline stage at 4 mm (control points every 16 mm): fast on 2 CPU cores."""
    return Recipe(stages=(
        StageSpec("affine", spacing_mm=(8.0, 8.0, 8.0), depth=2, channels=8),
        StageSpec("bspline", spacing_mm=(4.0, 4.0, 4.0), control_point_spacing=4, depth=2, channels=8, alpha=0.05),
    ))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a skip when this checkout has no shared data next to it."""
    if not (SHARED_DATA / "pairs").is_dir():
        pytest.skip(f"the shared development data is not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fresh_stack_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly initialised (seeded) small stack saved once; tests must only read it."""
    folder = tmp_path_factory.mktemp("fresh-stack")
    stack = build_stack(Manifest("fresh-small", small_recipe(), description="freshly initialised test stack"), seed=0)
    return save_stack(stack, folder / "fresh-small.safetensors")


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
