"""Training on pairs of different subjects: field-of-view crops, the random initial misalignment, shapes of two
label maps, the capture search in training, and the trainer's counts of what it drew."""

from __future__ import annotations

import json
import math
import time
from argparse import ArgumentParser
from pathlib import Path

import numpy as np
import pytest
import torch

from dlir.errors import InputError
from dlir.geometry import Grid, sample
from dlir.metrics import dice
from dlir.training.config import DataSpec, ShapeSpec, SyntheticSpec, TrainConfig, add_flags, apply_flags
from dlir.training.events import EventLog
from dlir.training.intersubject import crop_end, random_crop, random_misalignment
from dlir.training.jobfolder import EVENTS_FILE
from dlir.training.shapes import shape_pair, two_label_maps
from dlir.training.trainer import PAIR_KINDS, Trainer
from dlir.transforms import grid_points

OBLIQUE = Grid((20, 16, 12), (1.5, 2.0, 3.0), (-10.0, 5.0, 40.0),
               (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # i along +y, j along -x: a crop must follow the axes


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("upper", [False, True])
def test_a_crop_ends_the_image_and_keeps_every_kept_voxel_where_it_was(axis: int, upper: bool) -> None:
    image = torch.rand((1, 1, *OBLIQUE.shape), generator=torch.Generator().manual_seed(axis))
    labels = torch.randint(0, 4, image.shape, generator=torch.Generator().manual_seed(9)).float()
    cropped, grid, cropped_labels = crop_end(image, OBLIQUE, axis, 0.25, upper, labels)
    n = OBLIQUE.size[axis]
    assert grid.size[axis] == n - round(0.25 * n) and [s for a, s in enumerate(grid.size) if a != axis] == \
        [s for a, s in enumerate(OBLIQUE.size) if a != axis]
    assert cropped.shape[2:] == grid.shape and cropped_labels is not None and cropped_labels.shape == cropped.shape
    points = grid_points(grid)
    inside = OBLIQUE.contains(points)
    assert bool(inside.all())  # the cropped grid lies inside the original one ...
    assert not bool(grid.contains(grid_points(OBLIQUE)).all())  # ... and covers less of it
    torch.testing.assert_close(sample(image, OBLIQUE, points), cropped)  # the kept values, at their own positions
    torch.testing.assert_close(sample(labels, OBLIQUE, points, mode="nearest"), cropped_labels)
    lower, upper_end = OBLIQUE.bounding_box()
    box_lower, box_upper = grid.bounding_box()
    moved = np.flatnonzero(np.abs(np.concatenate([box_lower - lower, box_upper - upper_end])) > 1e-6)
    assert len(moved) == 1  # exactly one end of one physical axis moved


def test_random_crops_cut_the_configured_share_of_one_end() -> None:
    spec = DataSpec(crop_min=0.1, crop_max=0.35)
    image = torch.rand((1, 1, *OBLIQUE.shape))
    axes = set()
    for seed in range(30):
        cropped, grid, _ = random_crop(image, OBLIQUE, spec, torch.Generator().manual_seed(seed))
        (axis,) = [a for a in range(3) if grid.size[a] != OBLIQUE.size[a]]
        share = 1 - grid.size[axis] / OBLIQUE.size[axis]
        assert 0.1 - 0.5 / OBLIQUE.size[axis] <= share <= 0.35 + 0.5 / OBLIQUE.size[axis]
        axes.add(axis)
    assert axes == {0, 1, 2}
    assert crop_end(image, OBLIQUE, 2, 0.99, True)[1].size[2] == 2  # never less than two voxels


def test_the_random_misalignment_stays_within_its_bounds_about_the_centre() -> None:
    spec = DataSpec(misalign_rotation_deg=15.0, misalign_scale=0.15, misalign_translation_mm=30.0)
    centre = torch.as_tensor(OBLIQUE.centre(), dtype=torch.float32)
    angles, scales = [], []
    for seed in range(40):
        r = random_misalignment(spec, OBLIQUE, torch.Generator().manual_seed(seed))
        shift = r(centre[None, None])[0, 0] - centre
        assert float(shift.abs().max()) <= 30.0 + 1e-3  # mm, per axis
        singular = torch.linalg.svdvals(r.matrix[0].double())
        assert float(singular.min()) >= 0.85 - 1e-4 and float(singular.max()) <= 1.15 + 1e-4
        rotation = r.matrix[0].double() @ torch.linalg.inv(torch.diag(torch.linalg.norm(r.matrix[0].double(), dim=0)))
        angles.append(math.degrees(math.acos(max(-1.0, min(1.0, (float(torch.trace(rotation)) - 1) / 2)))))
        scales.append(float(singular.max() - singular.min()))
    assert max(angles) > 10.0 and max(angles) <= 15.0 * math.sqrt(3) + 1e-3  # up to 15 degrees about each axis
    assert max(scales) > 0.1
    still = random_misalignment(DataSpec(), OBLIQUE, torch.Generator().manual_seed(0))
    torch.testing.assert_close(still.matrix, torch.eye(3)[None])
    torch.testing.assert_close(still.offset, torch.zeros(1, 3), atol=1e-4, rtol=0)


@pytest.mark.parametrize("settings, key", [
    ({"crop_probability": 1.5}, "data.crop_probability"),
    ({"crop_min": 0.4, "crop_max": 0.3}, "data.crop_min"),
    ({"crop_max": 1.0}, "data.crop_min"),
    ({"misalign_rotation_deg": -1.0}, "data.misalign_rotation_deg"),
    ({"misalign_scale": 1.0}, "data.misalign_scale"),
    ({"misalign_translation_mm": float("nan")}, "data.misalign_translation_mm"),
])
def test_unusable_augmentation_settings_are_refused(settings: dict, key: str) -> None:
    with pytest.raises(InputError, match=key):
        DataSpec(**settings)


def test_the_new_keys_are_flags_and_survive_the_job_config() -> None:
    parser = ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--crop-probability", "0.3", "--crop-max", "0.3", "--misalign-rotation-deg", "15",
                              "--misalign-scale", "0.15", "--misalign-translation-mm", "30", "--shapes-two-draws", "0.5",
                              "--shapes-two-draws-difference", "0.25"])
    config = apply_flags(TrainConfig(name="x", data=DataSpec(images="images/")), args)
    assert (config.data.crop_probability, config.data.crop_max, config.data.misalign_rotation_deg) == (0.3, 0.3, 15.0)
    assert (config.data.misalign_scale, config.data.misalign_translation_mm) == (0.15, 30.0)
    assert (config.shapes.two_draws, config.shapes.two_draws_difference) == (0.5, 0.25)
    assert TrainConfig.from_dict(__import__("tomllib").loads(config.to_toml())) == config


def test_two_label_maps_are_two_subjects_of_one_anatomy() -> None:
    spec = ShapeSpec(size=32, spacing_mm=3.0, labels_min=6, labels_max=6)
    overlaps = {}
    for difference in (0.0, 0.3, 1.0):
        first, second = two_label_maps(ShapeSpec(**{**spec.__dict__, "two_draws_difference": difference}), torch.Generator().manual_seed(4))
        overlaps[difference] = float(np.mean(list(dice(first[0, 0].numpy(), second[0, 0].numpy(), list(range(1, 7))).values())))
    assert overlaps[0.0] == 1.0  # no difference: one map
    assert 0.5 < overlaps[0.3] < 0.95 and overlaps[1.0] < overlaps[0.3]  # similar, not equal; unrelated maps least alike
    two = ShapeSpec(**{**spec.__dict__, "two_draws_difference": 0.3})
    fixed, moving, transform, fixed_labels, moving_labels, grid = shape_pair(two, SyntheticSpec(), torch.Generator().manual_seed(8), True)
    carried = sample(moving_labels.float(), grid, transform(grid_points(grid)), mode="nearest").long()
    assert not torch.equal(carried, fixed_labels)  # the fixed labels are the second map's, not the moving one's carried
    first, second = two_label_maps(two, torch.Generator().manual_seed(8))
    assert torch.equal(first, moving_labels)


TRAINING = """
name = "tiny-intersubject"
seed = 1
checkpoint_every = 100
validate_every = 100
log_every = 1

[data]
images = "{images}"
synthetic_fraction = 0.4
shapes_fraction = 0.2
validation_pairs_per_image = 1
crop_probability = 0.5
misalign_rotation_deg = 15.0
misalign_scale = 0.15
misalign_translation_mm = 30.0

[shapes]
size = 24
spacing_mm = 8.0
labels_min = 4
labels_max = 6
blob_mm_min = 40.0
blob_mm_max = 60.0
two_draws = 0.5

[recipe]
initial_alignment = "search"

[recipe.intensity]
kind = "percentile"

[[recipe.stages]]
kind = "affine"
spacing_mm = [8.0, 8.0, 8.0]
channels = 8
depth = 3
iterations = 3
batch_size = 3

[[recipe.stages]]
kind = "bspline"
spacing_mm = [8.0, 8.0, 8.0]
control_point_spacing = 4
channels = 8
iterations = 2
batch_size = 3
alpha = 1.0
patch_size = 16
"""


def test_training_with_the_augmentation_draws_pairs_of_different_subjects(shared_data: Path, tmp_path: Path) -> None:
    """A tiny stack trained a few steps on MNI and both brain MRs (on 8 mm grids) with crops, misalignment, shapes of
    two draws and the capture search: the steps run and the events count pairs of two different subjects."""
    csv = tmp_path / "brains.csv"
    csv.write_text("image,labels\n"
                   f"{shared_data / 'mni152_2009a_sym' / 't1.nii.gz'},{shared_data / 'mni152_2009a_sym' / 'labels.nii.gz'}\n"
                   f"{shared_data / 'brain_mr_tumor1' / 't1.nii.gz'},\n"
                   f"{shared_data / 'brain_mr_tumor2' / 't1.nii.gz'},\n", encoding="utf-8")
    config_file = tmp_path / "config.toml"
    config_file.write_text(TRAINING.format(images=csv), encoding="utf-8")
    config = TrainConfig.read(config_file)
    job = tmp_path / "job"
    job.mkdir()
    events = EventLog(job / EVENTS_FILE)
    try:
        stack = Trainer(config, job, events=events).run()
    finally:
        events.close()
    assert stack.is_file()
    log = [json.loads(line) for line in (job / EVENTS_FILE).read_text(encoding="utf-8").splitlines()]
    iterations = [e for e in log if e["type"] == "iteration"]
    assert all(math.isfinite(e["loss"]) for e in iterations) and len(iterations) == 5
    done = [e["pairs"] for e in log if e["type"] == "stage_done"]
    assert [set(p) for p in done] == [set(PAIR_KINDS)] * 2
    assert [sum(p[k] for k in ("synthetic", "inter_subject", "listed", "shapes", "shapes_two_draws")) for p in done] == [9, 6]
    total = {k: sum(p[k] for p in done) for k in PAIR_KINDS}
    assert total["inter_subject"] > 0 and total["cropped"] > 0 and total["synthetic"] > 0 and total["listed"] == 0
    assert total["misaligned"] == total["inter_subject"]  # every pair of two images, and only those
    assert total["shapes"] + total["shapes_two_draws"] > 0
    assert iterations[-1]["pairs"] == done[-1]  # the last iteration event has the stage's counts


def test_the_search_is_computed_once_per_pair_of_training_images(shared_data: Path, tmp_path: Path) -> None:
    """Under ``initial_alignment = "search"`` a pair of two training images starts from the capture of the whole images
    (computed once, then reused), composed with its misalignment; a synthetic pair from the affine part of its known
    deformation (what the search captures)."""
    csv = tmp_path / "brains.csv"
    csv.write_text(f"image\n{shared_data / 'brain_mr_tumor1' / 't1.nii.gz'}\n{shared_data / 'brain_mr_tumor2' / 't1.nii.gz'}\n",
                   encoding="utf-8")
    config_file = tmp_path / "config.toml"
    config_file.write_text(TRAINING.format(images=csv), encoding="utf-8")
    config = TrainConfig.read(config_file)
    trainer = Trainer(config, tmp_path / "unused")
    trainer.load_data()
    seconds = []
    for seed in range(12):
        before = time.perf_counter()
        pair = trainer.draw_pair(torch.Generator().manual_seed(seed))
        seconds.append(time.perf_counter() - before)
        assert pair.initial is not None
    assert trainer.drawn["inter_subject"] >= 3 and len(trainer.searched) == 2  # (1, 2) and (2, 1), each searched once
    a, b = trainer.train_images
    search = trainer.searched[(a.entry.image, b.entry.image)]
    centre = torch.as_tensor(a.prepared.grid.centre(), dtype=torch.float32)[None, None]
    assert float((search(centre) - centre).norm()) < 200  # mm: a transform between two heads
    assert sorted(seconds)[len(seconds) // 2] < 0.5  # the typical draw does not search


def test_a_synthetic_pair_starts_from_the_affine_its_search_would_capture(shared_data: Path, tmp_path: Path) -> None:
    """Under ``search``, a deformation of one image starts from its known affine part, not the identity: the stages
    then learn what is left after the capture, as at inference."""
    csv = tmp_path / "brain.csv"
    csv.write_text(f"image\n{shared_data / 'brain_mr_tumor1' / 't1.nii.gz'}\n", encoding="utf-8")
    config_file = tmp_path / "config.toml"
    config_file.write_text(TRAINING.format(images=csv).replace("shapes_fraction = 0.2", "shapes_fraction = 0.0"),
                           encoding="utf-8")
    trainer = Trainer(TrainConfig.read(config_file), tmp_path / "unused")
    trainer.load_data()
    pair = trainer.draw_pair(torch.Generator().manual_seed(3))
    assert pair.known_affine is not None
    assert torch.allclose(pair.initial.matrix, pair.known_affine.matrix) and torch.allclose(pair.initial.offset, pair.known_affine.offset)
    assert not torch.allclose(pair.initial.matrix, torch.eye(3)[None])  # a random affine, not the identity
