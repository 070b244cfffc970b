"""One set of defaults, one validation: the DLIR Training module and ``dlir train`` make the SAME
configuration from the same choices (defaults included) and refuse a bad value with the SAME
sentence (issue 11).

The module's side is what its Widget calls (``TrainingSettings`` -> ``buildConfig`` /
``TrainingLogic.start``); the command line's side is the real ``dlir`` parser and
``dlir.training.config.apply_flags`` (what ``dlir train`` does with its flags), and for the
sentences ``dlir.cli.main`` itself, whose ``error: ...`` line is what a user reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dlir.cli import build_parser, main
from dlir.errors import DLIRError, InputError
from dlir.training.config import Outline, TrainConfig, apply_flags
from DLIRTrainingLib.logic import TrainingLogic
from DLIRTrainingLib.settings import DataSource, Intensity, TrainingSettings, buildConfig

#: the stack name of every case (the command line has no default name)
NAME = "brain"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder holding one image file (by name: nothing here reads it)."""
    folder = (tmp_path / "images").resolve()
    folder.mkdir()
    (folder / "case1.nii.gz").write_bytes(b"")
    return folder


def cli_config(*flags: str) -> TrainConfig:
    """The configuration ``dlir train --out JOB FLAGS...`` runs (without a config file)."""
    args = build_parser().parse_args(["train", "--out", "unused-job-folder", *flags])
    return apply_flags(TrainConfig(), args)


def cli_error(capsys: pytest.CaptureFixture, out: Path, *flags: str) -> str:
    """The sentence ``dlir train --out OUT FLAGS...`` prints (``error: SENTENCE``, exit code 2)."""
    capsys.readouterr()
    code = main(["train", "--out", str(out), "--progress", "none", *flags])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1, f"dlir train {' '.join(flags)} exited with {code}: {errors}"
    return errors[0].removeprefix("error: ")


# ---------------------------------------------------------------------------------------------- the same configuration
def test_the_defaults_are_the_command_lines(images: Path) -> None:
    gui = buildConfig(TrainingSettings(stackName=NAME, dataFolder=images))
    cli = cli_config("--name", NAME, "--images", str(images))
    assert gui.to_dict() == cli.to_dict()
    assert gui == cli
    assert gui.description == "" and gui.recipe == Outline().recipe()


def test_a_csv_source_is_the_images_flag(images: Path) -> None:
    table = images / "images.csv"
    table.write_text("image\ncase1.nii.gz\n", encoding="utf-8")
    gui = buildConfig(TrainingSettings(stackName=NAME, dataSource=DataSource.CSV, dataCsv=table))
    assert gui.to_dict() == cli_config("--name", NAME, "--images", str(table)).to_dict()


@pytest.mark.parametrize("choices, flags", [
    pytest.param(
        dict(description="lungs, 2 mm", intensity=Intensity.CT, gridSpacing=2.0, bsplineSpacings="16, 8", affineIterations=300,
             bsplineIterations=500, alpha=0.5, learningRate=2e-4, batchSize=2, patchSize=32, channels=16, seed=7,
             syntheticFraction=0.25, validationCount=2, device="cpu", checkpointEvery=50, validateEvery=25),
        ["--description", "lungs, 2 mm", "--intensity", "ct", "--grid-spacing-mm", "2", "--control-points-mm", "16,8",
         "--iterations", "300,500,500", "--alpha", "0,0.5,0.5", "--learning-rate", "2e-4", "--batch-size", "2",
         "--patch-size", "32", "--channels", "16", "--seed", "7", "--synthetic-fraction", "0.25", "--validation-count", "2",
         "--device", "cpu", "--checkpoint-every", "50", "--validate-every", "25"],
        id="ct-2mm-16-8"),
    pytest.param(
        dict(affineStage=False, bsplineSpacings="8", gridSpacing=2.0, bsplineIterations=40, alpha=1.0, intensity=Intensity.MR,
             validateEvery=0, device="cuda"),
        ["--no-affine", "--control-points-mm", "8", "--grid-spacing-mm", "2", "--iterations", "40", "--alpha", "1",
         "--intensity", "mr", "--validate-every", "0", "--device", "cuda"],
        id="bspline-only"),
    pytest.param(
        dict(bsplineSpacings="64, 32, 16", batchSize=4, learningRate=1e-4),
        ["--control-points-mm", "64,32,16", "--batch-size", "4", "--learning-rate", "1e-4"],
        id="three-bspline-stages"),
    pytest.param(
        dict(shapesFraction=0.5, diceWeight=0.3, syntheticFraction=0.2),
        ["--shapes-fraction", "0.5", "--dice-weight", "0.3", "--synthetic-fraction", "0.2"],
        id="shapes-and-dice"),
])
def test_the_same_choices_make_the_same_config(images: Path, choices: dict, flags: list[str]) -> None:
    gui = buildConfig(TrainingSettings(stackName=NAME, dataFolder=images, **choices))
    cli = cli_config("--name", NAME, "--images", str(images), *flags)
    assert gui.to_dict() == cli.to_dict()
    assert gui.to_toml() == cli.to_toml()  # the module's request.toml is what the command line would run


# ---------------------------------------------------------------------------------------------- the same sentence
@pytest.fixture
def logic(scene, tmp_path: Path, fake_trainer: list[str]):
    """The module's logic; the fake trainer never runs (every case is refused first)."""
    logic = TrainingLogic(scene, tmp_path / "jobs", env=dict(os.environ, FAKE_MODE="ok"), launcher=fake_trainer,
                          defaultModelsDir=tmp_path / "models")
    yield logic
    logic.shutdown(timeout=10)


BAD = [
    pytest.param({"bsplineSpacings": "20"}, ["--control-points-mm", "20"], id="control-points-off-the-grid"),
    pytest.param({"gridSpacing": 3.0}, ["--grid-spacing-mm", "3"], id="grid-that-fits-no-control-point"),
    pytest.param({"bsplineSpacings": "16, 32"}, ["--control-points-mm", "16,32"], id="fine-to-coarse"),
    pytest.param({"affineStage": False, "bsplineSpacings": ""}, ["--no-affine", "--control-points-mm", ""], id="no-stage"),
    pytest.param({"bsplineIterations": 0}, ["--iterations", f"{Outline.affine_iterations},0,0"], id="zero-iterations"),
    pytest.param({"affineIterations": 0}, ["--iterations", f"0,{Outline.bspline_iterations},{Outline.bspline_iterations}"],
                 id="zero-affine-iterations"),
    pytest.param({"alpha": -1.0}, ["--alpha", "0,-1,-1"], id="negative-bending-weight"),
    pytest.param({"learningRate": 0.0}, ["--learning-rate", "0"], id="zero-learning-rate"),
    pytest.param({"batchSize": 0}, ["--batch-size", "0"], id="zero-batch"),
    pytest.param({"patchSize": 36}, ["--patch-size", "36"], id="patch-off-the-control-points"),
    pytest.param({"channels": 0}, ["--channels", "0"], id="no-channels"),
    pytest.param({"stackName": "brain/v2"}, ["--name", "brain/v2"], id="name-with-slash"),
    pytest.param({"stackName": ""}, ["--name", ""], id="no-name"),
    pytest.param({"syntheticFraction": 1.5}, ["--synthetic-fraction", "1.5"], id="synthetic-share-above-1"),
    pytest.param({"checkpointEvery": 0}, ["--checkpoint-every", "0"], id="no-checkpoints"),
    pytest.param({"dataFolder": ""}, ["--images", ""], id="no-images-chosen"),
    pytest.param({"gridSpacing": 0.0}, ["--grid-spacing-mm", "0"], id="zero-grid-spacing"),
    pytest.param({"device": "tpu"}, ["--device", "tpu"], id="unknown-device"),
    pytest.param({"learningRate": float("nan")}, ["--learning-rate", "nan"], id="nan-learning-rate"),
]


@pytest.mark.parametrize("changes, flags", BAD)
def test_bad_values_are_refused_with_the_command_lines_sentence(logic: TrainingLogic, images: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture, changes: dict,
                                                              flags: list[str]) -> None:
    settings = TrainingSettings(**{"stackName": NAME, "dataFolder": images, **changes})
    with pytest.raises(DLIRError) as refused:
        logic.start(settings)
    sentence = cli_error(capsys, tmp_path / "cli-job", "--name", NAME, "--images", str(images), *flags)
    assert str(refused.value) == sentence
    assert not any((tmp_path / "jobs").glob("*")), "a refused job leaves no folder behind"
    assert not logic.jobs()


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_unusable_data_folders_are_refused_with_the_trainers_sentence(logic: TrainingLogic, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture, folder: str) -> None:
    """The module refuses at once what the trainer would refuse after it started (``find_images``)."""
    data = (tmp_path / folder).resolve()
    if folder == "empty":
        data.mkdir()
    with pytest.raises(InputError) as refused:
        logic.start(TrainingSettings(stackName=NAME, dataFolder=data))
    sentence = cli_error(capsys, tmp_path / "cli-job", "--name", NAME, "--images", str(data), "--device", "cpu")
    assert str(refused.value) == sentence
    assert sentence.startswith("no training images found in" if folder == "empty" else "the training data")
    assert not logic.jobs()
