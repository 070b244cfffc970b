"""TrainingLogic end to end against the fake trainer: folder, request, curves in the scene, restart."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import numpy as np
import pytest

from dlir.errors import InputError
from dlir.training.config import TrainConfig
from DLIRTrainingLib.job import REQUEST_FILE, JobState
from DLIRTrainingLib.logic import TrainingLogic
from DLIRTrainingLib.scenedata import trainingImages
from DLIRTrainingLib.settings import DataSource, TrainingSettings, buildConfig


def run(logic: TrainingLogic, job, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while (job.state.active or job.state == JobState.QUEUED) and time.monotonic() < deadline:
        logic.poll()
        time.sleep(0.05)
    logic.poll()
    assert not job.state.active, f"{job} still running after {timeout} s"


@pytest.fixture
def logic(scene, tmp_path: Path, fake_trainer: list[str]):
    env = dict(os.environ, FAKE_MODE="ok")
    logic = TrainingLogic(scene, tmp_path / "jobs", env=env, launcher=fake_trainer, stopTimeout=30,
                          defaultModelsDir=tmp_path / "models")
    yield logic
    logic.shutdown(timeout=10)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data folder with one image file (by name; the fake trainer reads nothing)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "case1.nii.gz").write_bytes(b"")
    return tmp_path / "data"


def test_start_writes_the_request_and_fills_the_curves(logic: TrainingLogic, scene, tmp_path: Path) -> None:
    import slicer.util

    volume = slicer.util.addVolumeFromArray(np.zeros((8, 8, 8), np.float32), ijkToRAS=np.diag([2, 2, 2, 1.0]), name="vol")
    settings = TrainingSettings(dataSource=DataSource.SCENE, stackName="fake-stack", bsplineSpacings="16", gridSpacing=4.0,
                                patchSize=16, device="cpu")
    job = logic.start(settings, [volume])
    assert job.folder == (tmp_path / "jobs" / "fake-stack").resolve()
    request = tomllib.loads((job.folder / REQUEST_FILE).read_text(encoding="utf-8"))
    assert request["name"] == "fake-stack" and request["device"] == "cpu"
    assert Path(request["data"]["images"]).is_file()  # the exported scene volume list
    assert TrainConfig.read(job.folder / REQUEST_FILE) == buildConfig(settings, trainingImages(settings, job.folder))
    run(logic, job)
    assert job.state == JobState.FINISHED
    curves = logic.curves(job)
    assert curves.rows == 10 and curves.column("step")[-1] == 10
    assert curves.validationTable.GetTable().GetNumberOfRows() == 3
    # the fake writes no real stack: the job finishes, installing it fails with a clear message
    assert "cannot be used" in logic.installErrors[job.folder]
    assert job.folder not in logic.installed and "finished, but" in job.message


def test_names_and_bad_settings_are_refused_before_anything_runs(logic: TrainingLogic, tmp_path: Path, data: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "taken.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match="already exists"):
        logic.start(TrainingSettings(dataFolder=data, stackName="taken"))
    with pytest.raises(InputError, match="does not exist"):
        logic.start(TrainingSettings(dataFolder=tmp_path / "nope", stackName="fine"))
    with pytest.raises(InputError, match="no scene volume"):
        logic.start(TrainingSettings(dataSource=DataSource.SCENE, stackName="fine"))
    with pytest.raises(InputError, match="does not fit the 4 mm grid"):  # the engine's check (dlir.training.config.Outline)
        logic.start(TrainingSettings(dataFolder=data, stackName="fine", bsplineSpacings="24"))
    assert not any((tmp_path / "jobs").glob("fine*")), "a refused job leaves no folder behind"


def test_a_fresh_logic_lists_jobs_and_rebuilds_their_curves(logic: TrainingLogic, tmp_path: Path, data: Path,
                                                            fake_trainer: list[str]) -> None:
    import slicer

    job = logic.start(TrainingSettings(dataFolder=data, stackName="again", bsplineSpacings="16", gridSpacing=4.0,
                                       patchSize=16, device="cpu"))
    run(logic, job)
    other_scene = slicer.vtkMRMLScene()  # Slicer restarted: a new scene, a new logic
    fresh = TrainingLogic(other_scene, tmp_path / "jobs", launcher=fake_trainer)
    jobs = fresh.jobs()
    assert [j.name for j in jobs] == ["again"] and jobs[0].state == JobState.FINISHED
    curves = fresh.curves(jobs[0])
    assert curves.rows == 10 and curves.table.GetScene() is other_scene
    assert fresh.curves(jobs[0]) is curves  # made once
    with pytest.raises(Exception, match="finished"):
        fresh.resume(jobs[0])


def test_synthetic_shapes_alone_need_no_images(logic: TrainingLogic, tmp_path: Path) -> None:
    settings = TrainingSettings(dataSource=DataSource.FOLDER, dataFolder="", stackName="shapes-only", shapesFraction=1.0,
                                diceWeight=1.0, device="cpu")
    job = logic.start(settings)
    request = TrainConfig.read(job.folder / REQUEST_FILE)
    assert request.data.images == "" and request.data.shapes_fraction == 1.0
    assert all(stage.dice_weight == 1.0 for stage in request.recipe.stages)
    with pytest.raises(InputError, match="no training images"):  # a share below 1 still needs images
        logic.start(TrainingSettings(dataSource=DataSource.FOLDER, dataFolder="", stackName="half", shapesFraction=0.5))
    run(logic, job)
