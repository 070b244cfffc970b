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


def test_the_downloads_keep_the_label_values_of_the_label_maps(session) -> None:
    """Labels 2, 4, 6, 8 (not 1..n): ``labels.nii.gz`` and Dice use them, as ``dlir register`` does."""
    import numpy as np
    import SimpleITK as sitk

    from DLIRRegistrationLib.samplepair import sampleDataFolder

    for name in ("moving", "fixed"):
        labels = sitk.ReadImage(str(sampleDataFolder() / f"sample_{name}_labels.nii.gz"))
        sitk.WriteImage(labels * 2, str(session.files.uploadFolder / f"{name}_labels.nii.gz"))
    session.choose("fixed", inputs.SAMPLE_FIXED)
    session.choose("moving", inputs.SAMPLE_MOVING)
    session.choose("movingLabels", "upload:moving_labels.nii.gz")
    session.choose("fixedLabels", "upload:fixed_labels.nii.gz")
    result = asyncio.run(session.register("brain-mri", "fast", lambda step, fraction: None))
    written = sitk.ReadImage(str(result.folder / "labels.nii.gz"))
    assert set(np.unique(sitk.GetArrayViewFromImage(written))) == {0, 2, 4, 6, 8}
    assert written.GetPixelID() == session.images["movingLabels"].GetPixelID()
    assert sorted(result.dice) == ["2", "4", "6", "8"] and all(d["after"] > d["before"] for d in result.dice.values())


def test_the_contrast_choice_reaches_the_engine_and_the_results_line(session) -> None:
    """The page's three contrast choices are the engine's (``dlir.choices.SIMILARITY_CHOICES``) in the Slicer module's
    words; the choice is the one the registration used, and the results line says so (asked or chosen)."""
    from dlir.choices import SIMILARITY_CHOICES
    from dlir.errors import InputError
    from dlirweb.session import CONTRASTS

    assert tuple(CONTRASTS) == SIMILARITY_CHOICES
    assert list(CONTRASTS.values()) == ["Automatic", "Same contrast", "Different contrasts"]
    session.chooseSamplePair()
    chosen = asyncio.run(session.register("brain-mri", "fast", lambda step, fraction: None))
    assert "the same contrast (chosen automatically" in chosen.summary, chosen.summary
    asked = asyncio.run(session.register("brain-mri", "fast", lambda step, fraction: None, "different"))
    assert "different contrasts (as asked); similarity MIND-SSC" in asked.summary, asked.summary
    assert json.loads((asked.folder / "result.json").read_text())["contrast"]["asked"] == "different"
    with pytest.raises(InputError, match="unknown contrast choice 'mri'"):
        asyncio.run(session.register("brain-mri", "fast", lambda step, fraction: None, "mri"))
    assert not session.running
