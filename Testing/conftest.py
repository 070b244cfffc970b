"""Make the engine package ``dlir`` and the shared test helpers importable from a plain checkout;
the MRML ``scene`` fixture of both modules' tests."""

import sys
from pathlib import Path

import pytest

TESTING = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTING.parent / "DLIRRegistration"))
sys.path.insert(0, str(TESTING))


@pytest.fixture
def scene():
    """A fresh MRML scene (slicer-core), also set as ``slicer.mrmlScene`` (as in the application)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(1)
