"""Make the engine package ``dlir`` and the shared test helpers (``testdata``) importable from a plain
checkout; the fixtures every test folder uses: the MRML ``scene``, the shared development data and the
4 mm MNI152 template."""

import sys
from pathlib import Path

import pytest

TESTING = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTING.parent / "DLIRRegistration"))
sys.path.insert(0, str(TESTING))

from testdata import SHARED_DATA, mni_template_4mm  # noqa: E402


@pytest.fixture
def scene():
    """A fresh MRML scene (slicer-core), also set as ``slicer.mrmlScene`` (as in the application)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (its ``pairs/`` and the MNI152 template), or a skip when this checkout has none beside it."""
    if not ((SHARED_DATA / "pairs").is_dir() and (SHARED_DATA / "mni152_2009a_sym" / "t1.nii.gz").is_file()):
        pytest.skip(f"the shared development data is not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def template_4mm(shared_data: Path):
    """:func:`testdata.mni_template_4mm` read once per session (a SimpleITK image; tests must not modify it)."""
    return mni_template_4mm(shared_data)
