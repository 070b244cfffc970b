"""Fixtures of the DLIR Registration tests (pytest on the slicer-core wheel, CPU, real vtkMRMLScene).

``DLIRRegistration/`` goes on ``sys.path`` so ``DLIRRegistrationLib`` (and the engine ``dlir``)
import as in Slicer.  Stacks are freshly initialised (seeded) small stacks: these tests check
geometry and scene handling, not accuracy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "DLIRRegistration") not in sys.path:
    sys.path.insert(0, str(REPO / "DLIRRegistration"))

#: ../shared/data seen from the repository root
SHARED_DATA = REPO.parent / "shared" / "data"


def small_stack(name: str = "fresh-small", modality: str = ""):
    """Affine at 8 mm + one B-spline stage at 4 mm (control points every 16 mm), seeded weights."""
    from dlir.recipe import Recipe, StageSpec
    from dlir.stack import Manifest, build_stack

    recipe = Recipe(stages=(
        StageSpec("affine", spacing_mm=(8.0, 8.0, 8.0), depth=2, channels=8),
        StageSpec("bspline", spacing_mm=(4.0, 4.0, 4.0), control_point_spacing=4, depth=2, channels=8, alpha=0.05),
    ))
    return build_stack(Manifest(name, recipe, description="freshly initialised test stack", modality=modality), seed=0)


@pytest.fixture(scope="session")
def stack():
    """A small freshly initialised stack (in memory; tests must not modify it)."""
    return small_stack()


@pytest.fixture(scope="session")
def stack_file(tmp_path_factory: pytest.TempPathFactory, stack) -> Path:
    """The same stack saved as ``fresh-small.safetensors`` (read only)."""
    from dlir.stack import save_stack

    return save_stack(stack, tmp_path_factory.mktemp("stack") / "fresh-small.safetensors")


@pytest.fixture
def user_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty user model folder (``$DLIR_MODELS_DIR``), so a developer's own stacks never matter."""
    folder = tmp_path / "models"
    monkeypatch.setenv("DLIR_MODELS_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a skip when this checkout has none beside it."""
    if not (SHARED_DATA / "pairs").is_dir():
        pytest.skip(f"the shared development data is not present at {SHARED_DATA}")
    return SHARED_DATA
