"""The page's session without a browser, on the slicer-core of the environment that runs it (5.13 in the test
environment, 5.11 in the web one): the sample pair with a fixed mask, registered through the Lib's steps, its
nodes, numbers and files."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from dlirweb import inputs


@pytest.fixture
def session(scene, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from DLIRRegistrationLib.samplepair import sampleDataFolder
    from dlirweb.session import Session

    monkeypatch.setenv("DLIR_MODELS_DIR", str(tmp_path / "no-user-models"))
    (tmp_path / "uploads").mkdir()
    (tmp_path / "results").mkdir()
    files = inputs.InputFiles(sampleDataFolder(), None, tmp_path / "uploads", 2**20)
    return Session(scene, files, tmp_path / "results")


def test_the_sample_pair_with_a_fixed_mask_registers_through_the_lib(session) -> None:
    session.chooseSamplePair()
    session.choose("fixedMask", inputs.SAMPLE_FIXED_LABELS)  # the brain's tissue labels as the mask
    assert set(session.nodes) == {"fixed", "moving", "movingLabels", "fixedMask"}
    steps: list[str] = []
    result = asyncio.run(session.register("brain-mri", "fast", lambda step, fraction: steps.append(step)))
    outputs = result.outputs
    assert outputs.masked and outputs.warpedVolumeNode is not None and outputs.jacobianVolumeNode is not None
    assert outputs.segmentationNode.GetSegmentation().GetNumberOfSegments() == 4
    assert steps and result.summary.startswith(f"{outputs.seconds:.1f} s on cpu; folding in the mask")
    assert result.files == ["jacobian.nii.gz", "labels.nii.gz", "result.json", "transform.h5", "warped.nii.gz"]
    written = json.loads((result.folder / "result.json").read_text())
    assert written["dice"] == result.dice and len(result.dice) == 4
    assert [s["name"] for s in session.segmentLegend()][:2] == ["left grey matter", "right grey matter"]

    session.choose("fixedMask", None)  # a new choice removes the result's nodes
    assert session.result is None and "fixedMask" not in session.nodes
    assert not session.scene.IsNodePresent(outputs.warpedVolumeNode)
