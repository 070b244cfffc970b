"""``dlir train``: a tiny real training run, events, stop and resume, torchrun with gloo, bad data.

Every run trains a tiny two-stage stack (affine + B-spline on an 8 mm grid, 8 kernels) on the
bundled sample image, so each takes a few seconds on two CPU cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from dlir.geometry import Grid, image_to_tensor, sample
from dlir.register import register
from dlir.errors import InputError, StackError
from dlir.stack import Manifest, build_stack, load_stack, save_stack
from dlir.stackname import MAX_NAME_LENGTH, name_problem
from dlir.training.config import DataSpec, SyntheticSpec, TrainConfig
from dlir.training.events import EVENT_TYPES
from dlir.training.synthetic import synthetic_pair
from dlir.transforms import grid_points

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "SampleData"

TINY = """
name = "tiny"
seed = 3
checkpoint_every = {checkpoint_every}
validate_every = 5
log_every = 1

[data]
images = "{images}"
validation_pairs_per_image = 1

[recipe.intensity]
kind = "percentile"

[[recipe.stages]]
kind = "affine"
spacing_mm = [8.0, 8.0, 8.0]
channels = 8
depth = 3
iterations = 6
learning_rate = 0.001

[[recipe.stages]]
kind = "bspline"
spacing_mm = [8.0, 8.0, 8.0]
control_point_spacing = 4
channels = 8
iterations = {bspline_iterations}
learning_rate = 0.001
alpha = 1.0
patch_size = 16
"""


def write_config(folder: Path, images: str | None = None, bspline_iterations: int = 8, checkpoint_every: int = 4) -> Path:
    if images is None:
        csv = folder / "data.csv"
        csv.write_text(f"image,labels\n{SAMPLE / 'sample_moving.nii.gz'},{SAMPLE / 'sample_moving_labels.nii.gz'}\n", encoding="utf-8")
        images = str(csv)
    path = folder / "tiny.toml"
    path.write_text(TINY.format(images=images, bspline_iterations=bspline_iterations, checkpoint_every=checkpoint_every),
                    encoding="utf-8")
    return path


def dlir_train(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "dlir", "train", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, encoding="utf-8")


def events_of(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "events.jsonl").read_text(encoding="utf-8").splitlines()]


REQUIRED = {
    "start": {"stages", "name", "resumed", "stage", "iteration", "device", "world_size"},
    "iteration": {"stage", "iteration", "iterations", "loss", "ncc", "bending", "it_per_s", "eta_s", "total_eta_s"},
    "validation": {"stage", "iteration", "dice", "dice_mean", "folding", "ncc", "best"},
    "checkpoint": {"stage", "iteration", "path", "reason"},
    "stage_done": {"stage", "kind", "iterations", "seconds", "best"},
    "done": {"stack", "seconds", "validation"},
    "error": {"message", "kind"},
    "stopped": {"stage", "iteration", "signal"},
}


def check_schema(events: list[dict]) -> None:
    for event in events:
        assert event["type"] in EVENT_TYPES, event
        assert isinstance(event["time"], float)
        missing = REQUIRED[event["type"]] - set(event)
        assert not missing, (event["type"], missing)


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("train")
    config = write_config(folder)
    result = dlir_train("--config", config, "--out", folder / "job", "--progress", "jsonl")
    return folder / "job", result


def test_tiny_training_run_writes_a_stack_that_registers(finished_job) -> None:
    job, result = finished_job
    assert result.returncode == 0, result.stderr
    for name in ("config.toml", "events.jsonl", "train.log", "checkpoints/last.pt", "tiny.safetensors"):
        assert (job / name).is_file(), name
    stack = load_stack(job / "tiny.safetensors")
    assert [s.kind for s in stack.manifest.recipe.stages] == ["affine", "bspline"]
    assert stack.manifest.training["iterations"] == [6, 8]
    assert 0 <= stack.manifest.validation["dice_mean"] <= 1
    fixed = sitk.ReadImage(str(SAMPLE / "sample_fixed.nii.gz"))
    moving = sitk.ReadImage(str(SAMPLE / "sample_moving.nii.gz"))
    reg = register(fixed, moving, stack, device="cpu")
    assert reg.warped.GetSize() == fixed.GetSize()
    assert reg.folding_fraction < 0.01


def test_events_follow_the_schema_on_file_and_stdout(finished_job) -> None:
    job, result = finished_job
    events = events_of(job)
    check_schema(events)
    assert [json.loads(line) for line in result.stdout.splitlines()] == events
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert [e["stage"] for e in events if e["type"] == "stage_done"] == [1, 2]
    iterations = [(e["stage"], e["iteration"]) for e in events if e["type"] == "iteration"]
    assert iterations == [(1, i) for i in range(1, 7)] + [(2, i) for i in range(1, 9)]
    assert events[-1]["stack"] == str(job / "tiny.safetensors")


def test_config_as_run_resolves_paths_and_flags_override(tmp_path: Path) -> None:
    config = TrainConfig.read(write_config(tmp_path))
    assert Path(config.data.images).is_absolute()
    from argparse import ArgumentParser

    from dlir.training.config import add_flags, apply_flags

    parser = ArgumentParser()
    add_flags(parser)
    changed = apply_flags(config, parser.parse_args(["--iterations", "3,4", "--alpha", "2", "--seed", "9", "--synthetic-noise", "0"]))
    assert [s.iterations for s in changed.recipe.stages] == [3, 4]
    assert [s.alpha for s in changed.recipe.stages] == [2.0, 2.0]
    assert changed.seed == 9 and changed.synthetic.noise == 0.0
    again = TrainConfig.from_dict(__import__("tomllib").loads(changed.to_toml()))
    assert again == changed


def test_stop_in_stage_two_and_resume_gives_the_uninterrupted_stack(tmp_path: Path) -> None:
    config = write_config(tmp_path, bspline_iterations=60, checkpoint_every=50)
    reference = dlir_train("--config", config, "--out", tmp_path / "reference", "--progress", "none")
    assert reference.returncode == 0, reference.stderr

    job = tmp_path / "job"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.Popen([sys.executable, "-m", "dlir", "train", "--config", str(config), "--out", str(job), "--progress", "jsonl"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, encoding="utf-8")
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line)
            if event["type"] == "iteration" and event["stage"] == 2 and event["iteration"] >= 10:
                proc.send_signal(signal.SIGINT)
                break
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    stopped = events_of(job)
    check_schema(stopped)
    stop = next(e for e in stopped if e["type"] == "stopped")
    assert stop["stage"] == 2 and 10 <= stop["iteration"] < 60
    assert any(e["type"] == "checkpoint" and e["reason"] == "signal" for e in stopped)
    assert not (job / "tiny.safetensors").exists()

    resumed = dlir_train("--resume", job, "--progress", "none")
    assert resumed.returncode == 0, resumed.stderr
    after = events_of(job)[len(stopped):]
    check_schema(after)
    assert after[0]["type"] == "start" and after[0]["resumed"] and after[0]["stage"] == 2
    assert after[0]["iteration"] == stop["iteration"]
    first = next(e for e in after if e["type"] == "iteration")
    assert (first["stage"], first["iteration"]) == (2, stop["iteration"] + 1)

    expected = load_file(str(tmp_path / "reference" / "tiny.safetensors"))
    got = load_file(str(job / "tiny.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_torchrun_with_gloo_trains_and_writes_one_stack(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dlir",
                             "train", "--config", str(config), "--out", str(tmp_path / "job"), "--device", "cpu", "--progress", "none"],
                            capture_output=True, text=True, timeout=300, env=env, encoding="utf-8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "job").glob("*.safetensors")) == ["tiny.safetensors"]
    events = events_of(tmp_path / "job")
    check_schema(events)
    assert events[0]["world_size"] == 2
    assert sum(e["type"] == "start" for e in events) == 1  # only rank 0 writes
    load_stack(tmp_path / "job" / "tiny.safetensors")


def _bad_data(kind: str, folder: Path) -> str:
    data = folder / "data"
    data.mkdir()
    if kind == "empty folder":
        return str(data)
    if kind == "unreadable file":
        (data / "scan.nii.gz").write_text("not an image", encoding="utf-8")
    elif kind == "2D image":
        sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(32, 32).astype(np.float32)), str(data / "slice.nii.gz"))
    elif kind == "too small":
        sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(4, 4, 4).astype(np.float32)), str(data / "tiny.nii.gz"))
    return str(data)


@pytest.mark.parametrize("kind, words", [
    ("empty folder", ["no training images"]),
    ("unreadable file", ["cannot be read", "scan.nii.gz"]),
    ("2D image", ["2D", "3D images"]),
    ("too small", ["too small"]),
])
def test_bad_data_ends_with_an_error_event_and_exit_code(tmp_path: Path, kind: str, words: list[str]) -> None:
    config = write_config(tmp_path, images=_bad_data(kind, tmp_path))
    result = dlir_train("--config", config, "--out", tmp_path / "job", "--progress", "none", timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    error = events_of(tmp_path / "job")[-1]
    assert error["type"] == "error"
    for word in words:
        assert word in error["message"] and word in lines[0], (word, error["message"])


def test_listed_pairs_train_without_synthetic_pairs(tmp_path: Path) -> None:
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,labels,pair\n"
                   f"{SAMPLE / 'sample_fixed.nii.gz'},{SAMPLE / 'sample_fixed_labels.nii.gz'},p1\n"
                   f"{SAMPLE / 'sample_moving.nii.gz'},{SAMPLE / 'sample_moving_labels.nii.gz'},p1\n", encoding="utf-8")
    config = write_config(tmp_path, images=str(csv))
    result = dlir_train("--config", config, "--out", tmp_path / "job", "--synthetic-fraction", "0", "--progress", "none")
    assert result.returncode == 0, result.stderr
    start = events_of(tmp_path / "job")[0]
    assert start["images"] == ["sample_fixed", "sample_moving"] and start["validation_pairs"] == 2
    assert load_stack(tmp_path / "job" / "tiny.safetensors").manifest.training["data"]["synthetic_fraction"] == 0.0

    from dataclasses import replace

    from dlir.training.trainer import Trainer

    trainer = Trainer(replace(TrainConfig.read(config), data=replace(TrainConfig.read(config).data, synthetic_fraction=0.0)),
                      tmp_path / "unused")
    trainer.load_data()
    fixed, moving = trainer.listed[0]
    assert (fixed.name, moving.name) == ("sample_fixed", "sample_moving")
    for seed in range(5):
        pair = trainer.draw_pair(torch.Generator().manual_seed(seed))
        assert torch.equal(pair.fixed.tensor, fixed.prepared.tensor) and torch.equal(pair.moving.tensor, moving.prepared.tensor)


def test_tensorboard_gets_scalars_and_image_snapshots(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = dlir_train("--config", write_config(tmp_path), "--out", tmp_path / "job", "--tensorboard", "--progress", "none")
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "job" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"stage1/ncc", "stage2/loss", "stage2/bending", "stage2/validation_dice"} <= set(events.Tags()["scalars"])
    assert {"stage1/fixed_moving_warped", "stage2/fixed_moving_warped"} <= set(events.Tags()["images"])
    assert len(events.Scalars("stage2/ncc")) == 8  # one per logged iteration


def test_a_stage_appended_to_a_finished_job_trains_as_in_a_job_with_it_from_the_start(tmp_path: Path) -> None:
    """How a finer stage is added to a stack: append it to the job's config.toml and resume.  The earlier stage is not
    trained again, the new one starts from the weights a two-stage job would have given it, so the result equals a
    two-stage job's.  A stage removed from the recipe is refused in one sentence."""
    config = write_config(tmp_path)
    text = config.read_text(encoding="utf-8")
    cut = text.index("[[recipe.stages]]", text.index("[[recipe.stages]]") + 1)
    first_only = tmp_path / "first.toml"
    first_only.write_text(text[:cut], encoding="utf-8")
    reference = dlir_train("--config", config, "--out", tmp_path / "reference", "--progress", "none")
    assert reference.returncode == 0, reference.stderr
    job = tmp_path / "job"
    one = dlir_train("--config", first_only, "--out", job, "--progress", "none")
    assert one.returncode == 0, one.stderr
    assert [k for k in load_file(str(job / "tiny.safetensors")) if k.startswith("stage1.")] == []

    job_config = job / "config.toml"
    job_config.write_text(job_config.read_text(encoding="utf-8") + "\n" + text[cut:], encoding="utf-8")
    extended = dlir_train("--resume", job, "--progress", "none")
    assert extended.returncode == 0, extended.stderr
    after = [e for e in events_of(job) if e["type"] == "iteration"]
    assert {e["stage"] for e in after if e["iteration"] == 1} == {1, 2} and after[-1]["stage"] == 2
    expected = load_file(str(tmp_path / "reference" / "tiny.safetensors"))
    got = load_file(str(job / "tiny.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name

    job_config.write_text(text[:cut], encoding="utf-8")  # the second stage removed again: refused
    shrunk = dlir_train("--resume", job, "--progress", "none", timeout=60)
    assert shrunk.returncode != 0 and "not removed" in shrunk.stderr and "Traceback" not in shrunk.stderr


@pytest.mark.parametrize("name", ["a" * (MAX_NAME_LENGTH + 1), "tab\there", "new\nline", " ", ".hidden", "a/b"],
                         ids=["too long", "tab", "newline", "blank", "leading dot", "slash"])
def test_a_name_the_stack_file_refuses_is_refused_before_training(tmp_path: Path, name: str) -> None:
    """The configuration check applies the stack's own name rule, so a job is never refused only when it saves its stack."""
    config = TrainConfig(name=name, data=DataSpec(images=str(SAMPLE)))
    with pytest.raises(InputError, match="give the stack a name usable as a file name") as refused:
        config.check()
    assert name_problem(name) in str(refused.value)
    with pytest.raises(StackError, match="cannot be saved under its name"):  # the rule the saved stack is held to
        save_stack(build_stack(Manifest(name=name, recipe=config.recipe)), tmp_path / "stack.safetensors")


def test_resume_without_a_job_is_one_sentence(tmp_path: Path) -> None:
    result = dlir_train("--resume", tmp_path, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "not a training job folder" in result.stderr


def test_synthetic_pair_is_the_image_through_its_transform() -> None:
    image = sitk.ReadImage(str(SAMPLE / "sample_moving.nii.gz"))
    grid = Grid.from_image(image)
    tensor = image_to_tensor(image)
    tensor = (tensor - tensor.min()) / (tensor.max() - tensor.min())
    spec = SyntheticSpec(intensity=0.0, noise=0.0)
    fixed, moving, transform, _ = synthetic_pair(tensor, grid, spec, torch.Generator().manual_seed(0))
    torch.testing.assert_close(moving, tensor)
    torch.testing.assert_close(fixed, sample(tensor, grid, transform(grid_points(grid))))
    displacement = transform(grid_points(grid)) - grid_points(grid)
    magnitude = displacement.norm(dim=-1)
    assert 1.0 < float(magnitude.mean()) < 20.0  # mm: a few mm of smooth deformation plus the small affine
    again, _, _, _ = synthetic_pair(tensor, grid, spec, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, fixed)
