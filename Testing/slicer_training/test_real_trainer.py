"""Acceptance tests with the REAL trainer: settings -> request.toml -> ``python -m dlir train`` -> events ->
MRML table -> registry -> registration (pytest on the slicer-core wheel, CPU).

The jobs are tiny: the bundled sample pair (MNI152 T1 with four labels) smoothed and resampled
to 8 mm (about 24 x 29 x 24 voxels), an affine stage on a 16 mm grid and one B-spline stage
(control points every 32 mm on the 8 mm grid, 16-voxel patches), 8 network channels, one
validation pair per image and one thread per trainer (``OMP_NUM_THREADS=1``: on a busy machine
several threads fight over the cores and run many times slower).  Every wait has a deadline.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import SimpleITK as sitk

from dlir.errors import InputError
from dlir.training.jobfolder import CHECKPOINT, CONFIG_FILE, EVENTS_FILE, LOG_FILE, stack_file
from DLIRTrainingLib.job import REQUEST_FILE, JobState, TrainingJob
from DLIRTrainingLib.logic import TrainingLogic
from DLIRTrainingLib.settings import DataSource, TrainingSettings

REPO = Path(__file__).resolve().parents[2]

SAMPLE = REPO / "Resources" / "SampleData"
#: mm: the spacing of the test images (the finest network grid of the recipe)
SPACING_MM = 8.0
#: configuration keys the GUI does not set: an iteration event per iteration, one validation pair per image
EXTRA_CONFIG = {"log_every": 1, "data": {"validation_pairs_per_image": 1}}
#: s: the longest any single wait may take before the test fails (the jobs need a few seconds each)
DEADLINE_S = 120.0

Event = dict[str, Any]


def _resample(source: Path, target: Path, label: bool) -> sitk.Image:
    """``source`` at ``SPACING_MM`` (smoothed first unless it is a label map), written to ``target``."""
    image = sitk.ReadImage(str(source))
    size = [int(round(n * s / SPACING_MM)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    if not label:
        image = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), SPACING_MM / 2.5)
    resampled = sitk.Resample(image, size, sitk.Transform(), sitk.sitkNearestNeighbor if label else sitk.sitkLinear,
                              image.GetOrigin(), (SPACING_MM,) * 3, image.GetDirection(), 0,
                              sitk.sitkUInt8 if label else sitk.sitkFloat32)
    sitk.WriteImage(resampled, str(target))
    return resampled


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CSV (image, labels) of the sample pair at 8 mm."""
    folder = tmp_path_factory.mktemp("tiny-data")
    rows = ["image,labels"]
    for name in ("fixed", "moving"):
        _resample(SAMPLE / f"sample_{name}.nii.gz", folder / f"{name}.nii.gz", label=False)
        _resample(SAMPLE / f"sample_{name}_labels.nii.gz", folder / f"{name}_labels.nii.gz", label=True)
        rows.append(f"{name}.nii.gz,{name}_labels.nii.gz")
    (folder / "images.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder / "images.csv"


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The registry's user folder of this test (``$DLIR_MODELS_DIR``)."""
    monkeypatch.setenv("DLIR_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path / "models"


@pytest.fixture
def trainer_env(models: Path) -> dict[str, str]:
    """The trainer's environment: this one (with the test's models folder) and one thread."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture
def logic(scene, tmp_path: Path, trainer_env: dict[str, str]):
    """A TrainingLogic with the default launcher (``[sys.executable, "-m", "dlir"]``)."""
    logic = TrainingLogic(scene, tmp_path / "jobs", env=trainer_env, stopTimeout=30)
    yield logic
    logic.shutdown(timeout=10)


def tiny_settings(name: str, data: Path, bspline_iterations: int = 8, **changes: Any) -> TrainingSettings:
    values: dict[str, Any] = dict(
        dataSource=DataSource.CSV, dataCsv=data, stackName=name, affineIterations=6, bsplineSpacings="32",
        bsplineIterations=bspline_iterations, gridSpacing=SPACING_MM, patchSize=16, channels=8, learningRate=1e-3,
        checkpointEvery=4, validateEvery=1000, device="cpu",
    )
    values.update(changes)
    return TrainingSettings(**values)


def poll_until(logic: TrainingLogic, job: TrainingJob, done: Callable[[Event], bool] | None = None,
               timeout: float = DEADLINE_S) -> list[Event]:
    """Poll (as the module's timer does) until ``done(event)`` holds or, without ``done``, the job has ended.

    Returns the job's events seen meanwhile; fails the test at the deadline.
    """
    deadline = time.monotonic() + timeout
    seen: list[Event] = []
    while time.monotonic() < deadline:
        new = logic.poll().get(job, [])
        seen += new
        if done is not None and any(done(e) for e in new):
            return seen
        if done is None and job.state.ended:
            return seen
        assert done is None or not job.state.ended, f"{job} ended before the awaited event: {job.message}"
        time.sleep(0.05)
    raise AssertionError(f"{job} is still {job.state.value} after {timeout:.0f} s ({job.message})")


def restarted(logic: TrainingLogic) -> TrainingLogic:
    """A fresh logic on a fresh scene over the same jobs folder (Slicer after a restart)."""
    import slicer

    fresh = TrainingLogic(slicer.vtkMRMLScene(), logic.jobsRoot)
    fresh.jobs()
    return fresh


def iterations_of(events: list[Event], stage: int) -> list[int]:
    return [e["iteration"] for e in events if e["type"] == "iteration" and e["stage"] == stage]


# ---------------------------------------------------------------------------------------------- (a)
def test_a_tiny_job_trains_fills_the_table_installs_and_registers(logic: TrainingLogic, tiny_data: Path, models: Path,
                                                                  scene) -> None:
    from dlir.register import register
    from dlir.stack import list_stacks, load_stack

    started = time.monotonic()
    job = logic.start(tiny_settings("tiny-brain", tiny_data), extraConfig=EXTRA_CONFIG)
    assert job.state == JobState.RUNNING
    events = poll_until(logic, job)
    seconds = time.monotonic() - started
    assert job.state == JobState.FINISHED and job.returncode == 0, job.message
    print(f"tiny real job: {seconds:.1f} s")  # the closing note of the issue asks for it (pytest -s shows it)

    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("stage_done") == 2
    assert iterations_of(events, 1) == list(range(1, 7)) and iterations_of(events, 2) == list(range(1, 9))
    for name in (CONFIG_FILE, REQUEST_FILE, EVENTS_FILE, LOG_FILE, CHECKPOINT):
        assert (job.folder / name).is_file(), name
    assert job.stackPath == stack_file(job.folder, "tiny-brain") and job.stackPath.is_file()
    # progress ends on the last stage, complete (the trainer's final checkpoint names stage 3 of 2)
    p = job.progress
    assert (p.stage, p.stages, p.stageKind, p.iteration) == (2, 2, "bspline", 8) and p.overallFraction == 1.0

    curves = logic.curves(job)
    assert curves.rows == 14 and curves.column("step") == list(range(1, 15))
    assert curves.column("stage") == [1] * 6 + [2] * 8
    assert all(math.isfinite(v) for v in curves.column("loss") + curves.column("ncc"))
    dice = curves.column("dice", validation=True)
    assert len(dice) == 4 and all(0 < d <= 1 for d in dice)  # per stage: before training and at its end, with labels
    assert scene.GetNodeByID(curves.lossChart.GetID()) is not None

    installed = models / "tiny-brain.safetensors"
    assert logic.installed[job.folder] == installed and installed.is_file()
    assert str(models) in job.message
    assert [info.path for info in list_stacks() if info.name == "tiny-brain"] == [installed]
    assert logic.registryStackOf(job) == installed  # what "Use in DLIR Registration" selects

    stack = load_stack("tiny-brain")
    assert [(s.kind, s.channels) for s in stack.manifest.recipe.stages] == [("affine", 8), ("bspline", 8)]
    folder = tiny_data.parent
    result = register(sitk.ReadImage(str(folder / "fixed.nii.gz")), sitk.ReadImage(str(folder / "moving.nii.gz")), stack,
                      moving_labels=sitk.ReadImage(str(folder / "moving_labels.nii.gz")), device="cpu")
    assert result.warped.GetSize() == sitk.ReadImage(str(folder / "fixed.nii.gz")).GetSize()
    assert result.warped_labels is not None and math.isfinite(result.folding_fraction)
    assert result.stack_name == "tiny-brain"

    fresh = restarted(logic)  # Slicer restarted: the job and its curves come back from its folder
    listed = fresh.job(job.folder)
    assert listed.state == JobState.FINISHED and listed.stackPath == job.stackPath
    assert fresh.curves(listed).column("step") == list(range(1, 15))


# ---------------------------------------------------------------------------------------------- (b)
def test_stop_in_stage_2_then_resume_continues_where_it_stopped(logic: TrainingLogic, tiny_data: Path, tmp_path: Path,
                                                                trainer_env: dict[str, str]) -> None:
    from dlir.stack import load_stack

    settings = tiny_settings("tiny-resume", tiny_data, bspline_iterations=200, checkpointEvery=50)
    job = logic.start(settings, extraConfig=EXTRA_CONFIG)
    # the same job, never stopped, beside it: the resumed job must end with exactly its weights
    reference = TrainingJob(tmp_path / "reference", env=trainer_env, stopTimeout=30)
    reference.folder.mkdir()
    reference.requestPath.write_text(job.requestPath.read_text(encoding="utf-8"), encoding="utf-8")
    reference.start()

    first = poll_until(logic, job, lambda e: e["type"] == "iteration" and e["stage"] == 2)
    logic.stop(job)
    assert job.state == JobState.STOPPING
    first += poll_until(logic, job)
    assert job.state == JobState.STOPPED and job.returncode == 130, job.message
    assert [e["type"] for e in first[-2:]] == ["checkpoint", "stopped"] and first[-2]["reason"] == "signal"
    stopped_at = first[-1]["iteration"]
    assert first[-1]["stage"] == 2 and 0 < stopped_at < 200, "the stop must land in the middle of stage 2"
    assert iterations_of(first, 2) == list(range(1, stopped_at + 1))
    assert job.resumable and "resume" in job.message
    listed = restarted(logic).job(job.folder)  # Slicer restarted now: the job is listed, stopped, resumable
    assert listed.state == JobState.STOPPED and listed.resumable
    assert (listed.progress.stage, listed.progress.iteration) == (2, stopped_at)

    logic.resume(job)
    second = poll_until(logic, job)
    assert job.state == JobState.FINISHED and job.returncode == 0, job.message
    start = second[0]
    assert start["type"] == "start" and start["resumed"] is True and (start["stage"], start["iteration"]) == (2, stopped_at)
    assert iterations_of(second, 1) == [], "the finished affine stage is not trained again"
    assert iterations_of(second, 2) == list(range(stopped_at + 1, 201)), "no gap, no restart from 1"
    curves = logic.curves(job)
    assert curves.column("step") == list(range(1, 207)) and curves.rows == 206

    assert reference.wait(DEADLINE_S) == JobState.FINISHED, reference.message
    expected = {e["iteration"]: e["loss"] for e in reference.events if e["type"] == "iteration" and e["stage"] == 2}
    resumed_loss = {e["iteration"]: e["loss"] for e in second if e["type"] == "iteration"}
    assert math.isclose(resumed_loss[stopped_at + 1], expected[stopped_at + 1], rel_tol=1e-6), "the weights continue"
    ours, theirs = load_stack(job.stackPath).weights(), load_stack(reference.stackPath).weights()
    assert ours.keys() == theirs.keys()
    assert all(float((ours[k] - theirs[k]).abs().max()) <= 1e-6 for k in ours), "nothing trained is lost"


# ---------------------------------------------------------------------------------------------- (c)
def test_empty_data_is_refused_at_once_with_the_trainers_sentence(logic: TrainingLogic, tmp_path: Path) -> None:
    """The module asks the engine's ``find_images`` before it starts anything: the trainer's own sentence, no job."""
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(InputError, match=re.escape(f"no training images found in {data.resolve()}")):
        logic.start(tiny_settings("bad-data", data, dataSource=DataSource.FOLDER, dataFolder=data))
    assert not logic.jobs() and not any(logic.jobsRoot.glob("bad-data*"))


@pytest.mark.parametrize("content, message", [
    ({"scan.nii.gz": b"not an image at all"}, "scan.nii.gz cannot be read as an image"),
])
def test_unreadable_data_fails_with_the_trainers_sentence(logic: TrainingLogic, tmp_path: Path,
                                                          content: dict[str, bytes], message: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name, payload in content.items():
        (data / name).write_bytes(payload)
    job = logic.start(tiny_settings("bad-data", data, dataSource=DataSource.FOLDER, dataFolder=data))
    poll_until(logic, job, timeout=60)
    assert job.state == JobState.FAILED and job.returncode == 2
    assert message in job.message and "unexpectedly" not in job.message
    assert not job.resumable


def scene_volume(path: Path, name: str, label: bool = False) -> Any:
    """``path`` as a scene volume (axis-aligned, ``SPACING_MM``; the geometry does not matter here)."""
    import numpy as np
    import slicer.util

    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return slicer.util.addVolumeFromArray(array, ijkToRAS=np.diag([SPACING_MM] * 3 + [1.0]), name=name,
                                          nodeClassName="vtkMRMLLabelMapVolumeNode" if label else "vtkMRMLScalarVolumeNode")


def test_a_trainer_killed_with_sigkill_fails_with_a_message(logic: TrainingLogic, tiny_data: Path) -> None:
    """Trained on scene volumes (exported by the module): the trainer reads them, then dies under us."""
    volumes = [scene_volume(tiny_data.parent / f"{n}.nii.gz", n) for n in ("fixed", "moving")]
    labels = [scene_volume(tiny_data.parent / f"{n}_labels.nii.gz", f"{n}-label", label=True) for n in ("fixed", "moving")]
    settings = tiny_settings("killed", tiny_data, bspline_iterations=200, dataSource=DataSource.SCENE)
    job = logic.start(settings, volumes, labels, extraConfig=EXTRA_CONFIG)
    start = poll_until(logic, job, lambda e: e["type"] == "iteration")[0]
    assert start["images"] == ["fixed", "moving"] and start["validation_pairs"] == 2  # both label maps went along
    os.kill(job.pid, signal.SIGKILL)  # our own child: the OOM killer or a crash would look the same
    poll_until(logic, job, timeout=30)
    assert job.state == JobState.FAILED and job.returncode == -signal.SIGKILL
    assert "ended unexpectedly (killed by signal SIGKILL)" in job.message
