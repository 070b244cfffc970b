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



@pytest.fixture(scope="session")
def stack():
    """:func:`testdata.small_stack`, a small freshly initialised stack (in memory; tests must not modify it)."""
    from testdata import small_stack

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

