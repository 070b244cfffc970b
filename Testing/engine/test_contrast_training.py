"""Training for pairs of different contrasts (issue 27): the random contrast given to one image of a pair of real
images (``data.contrast_probability``), its settings, and what the trainer draws with it."""

from __future__ import annotations

import json
import tomllib
from argparse import ArgumentParser
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from dlir.errors import InputError
from dlir.training.augment import piecewise_linear, random_contrast
from dlir.stack import load_stack
from dlir.training.config import DataSpec, TrainConfig, add_flags, apply_flags
from dlir.training.events import EventLog
from dlir.training.jobfolder import EVENTS_FILE
from dlir.training.trainer import Trainer


def test_the_piecewise_linear_map_goes_through_its_knots_and_is_linear_between_them() -> None:
    knots = torch.tensor([0.0, 0.2, 0.7, 1.0])
    values = torch.tensor([0.0, 1.0, 0.1, 0.4])
    image = torch.tensor([0.0, 0.1, 0.2, 0.45, 0.7, 0.85, 1.0, -0.5, 1.5]).reshape(1, 1, 1, 3, 3)
    expected = torch.tensor([0.0, 0.5, 1.0, 0.55, 0.1, 0.25, 0.4, 0.0, 0.4]).reshape(image.shape)  # clipped to [0, 1]
    torch.testing.assert_close(piecewise_linear(image, knots, values), expected)


def test_a_random_contrast_is_a_function_of_intensity_keeps_air_dark_and_fills_the_range() -> None:
    ramp = torch.linspace(0, 1, 4097).reshape(1, 1, 17, 241, 1)
    image = torch.cat([ramp, ramp.flip(2)], dim=4)  # every intensity twice, at two places
    reversals = 0
    for seed in range(40):
        remapped = random_contrast(image, 6, torch.Generator().manual_seed(seed))
        assert remapped.shape == image.shape and float(remapped.min()) >= 0 and float(remapped.max()) <= 1 + 1e-6
        torch.testing.assert_close(remapped[..., 0], remapped[..., 1].flip(2))  # one value per intensity
        assert float(remapped.flatten()[0]) == 0.0  # intensity 0 (air, background) stays 0
        assert float(remapped.max()) > 0.99  # divided by its largest value: the image fills [0, 1] again
        steps = remapped[..., 0].flatten().diff()
        reversals += bool((steps > 1e-6).any() and (steps < -1e-6).any())  # rises somewhere and falls elsewhere
        torch.testing.assert_close(remapped, random_contrast(image, 6, torch.Generator().manual_seed(seed)))  # seeded
    assert reversals >= 20  # in general not monotonic: what NCC cannot follow and MIND-SSC can


def test_one_knot_at_most_gives_at_most_two_pieces() -> None:
    ramp = torch.linspace(0, 1, 1001).reshape(1, 1, 1, 1, 1001)
    for seed in range(10):
        slopes = random_contrast(ramp, 1, torch.Generator().manual_seed(seed)).flatten().diff()
        kinks = int(((slopes[1:] - slopes[:-1]).abs() > 1e-4).sum())
        assert kinks <= 2  # one inner knot: one kink (two where it falls between two samples)


@pytest.mark.parametrize("settings, key", [
    ({"contrast_probability": 1.5}, "data.contrast_probability"),
    ({"contrast_probability": -0.1}, "data.contrast_probability"),
    ({"contrast_knots": 0}, "data.contrast_knots"),
    ({"contrast_knots": 100}, "data.contrast_knots"),
    ({"contrast_knots": 2.5}, "data.contrast_knots"),
])
def test_unusable_contrast_settings_are_refused(settings: dict, key: str) -> None:
    with pytest.raises(InputError, match=key):
        DataSpec(**settings)


def test_the_contrast_keys_are_flags_and_survive_the_job_config() -> None:
    parser = ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--contrast-probability", "0.7", "--contrast-knots", "4"])
    config = apply_flags(TrainConfig(name="x", data=DataSpec(images="images/")), args)
    assert (config.data.contrast_probability, config.data.contrast_knots) == (0.7, 4)
    assert TrainConfig.from_dict(tomllib.loads(config.to_toml())) == config


TRAINING = """
name = "tiny-contrast"
seed = 1

[data]
images = "{images}"
synthetic_fraction = 0.5
shapes_fraction = 0.3
validation_pairs_per_image = 4
contrast_probability = {probability}

[shapes]
size = 24
spacing_mm = 8.0
labels_min = 4
labels_max = 6

[recipe.intensity]
kind = "percentile"

[[recipe.stages]]
kind = "affine"
spacing_mm = [8.0, 8.0, 8.0]
channels = 8
depth = 3
similarity = "mind"
"""


def _trainer(shared_data: Path, tmp_path: Path, probability: float) -> Trainer:
    mni = shared_data / "mni152_2009a_sym"
    csv = tmp_path / "images.csv"
    csv.write_text(f"image,labels\n{mni / 't1.nii.gz'},{mni / 'labels.nii.gz'}\n{shared_data / 'brain_mr_tumor1' / 't1.nii.gz'},\n",
                   encoding="utf-8")
    config_file = tmp_path / f"config-{probability}.toml"
    config_file.write_text(TRAINING.format(images=csv, probability=probability), encoding="utf-8")
    trainer = Trainer(TrainConfig.read(config_file), tmp_path / "unused")
    trainer.load_data()
    return trainer


def test_the_trainer_gives_one_image_of_a_pair_of_real_images_a_random_contrast(shared_data: Path, tmp_path: Path) -> None:
    """With ``contrast_probability = 1`` every pair of real images has one image remapped (labels, grids and start
    kept) and is counted; shapes are not (they draw their own contrasts); the validation pairs are remapped too.  At 0
    nothing changes: the same seeds draw the very pairs a configuration without the setting draws."""
    plain, remapping = _trainer(shared_data, tmp_path, 0.0), _trainer(shared_data, tmp_path, 1.0)
    changed = {"fixed": 0, "moving": 0}
    for seed in range(12):
        pair = remapping.draw_pair(torch.Generator().manual_seed(seed))
        shapes = plain.drawn["shapes"]
        same = plain.draw_pair(torch.Generator().manual_seed(seed))
        if plain.drawn["shapes"] > shapes:  # a shape pair: drawn as without the setting
            torch.testing.assert_close(pair.fixed.tensor, same.fixed.tensor)
            continue
        for side in changed:
            a, b = getattr(pair, side), getattr(same, side)
            assert a.grid == b.grid and a.tensor.shape == b.tensor.shape
            changed[side] += not torch.equal(a.tensor, b.tensor)
        assert changed["fixed"] + changed["moving"] > 0
        torch.testing.assert_close(pair.initial.matrix, same.initial.matrix)
        for labels, others in ((pair.fixed_labels, same.fixed_labels), (pair.moving_labels, same.moving_labels)):
            assert (labels is None and others is None) or torch.equal(labels, others)
    assert changed["fixed"] > 0 and changed["moving"] > 0
    real = remapping.drawn["synthetic"] + remapping.drawn["inter_subject"]
    assert real > 0 and remapping.drawn["contrast"] == real and remapping.drawn["shapes"] > 0
    assert plain.drawn["contrast"] == 0
    assert len(remapping.validation) == len(plain.validation) == 4
    assert sum(not torch.equal(a.fixed.tensor, b.fixed.tensor) or not torch.equal(a.moving.tensor, b.moving.tensor)
               for a, b in zip(remapping.validation, plain.validation)) == 4


def test_a_stack_for_two_contrasts_trains_on_listed_pairs_of_a_t1_and_a_t2_like_image(shared_data: Path, tmp_path: Path) -> None:
    """A user's own multi-contrast data: a CSV listing a T2-like image (fixed) with the T1 it was made from (moving),
    stages comparing by MIND-SSC, random contrasts on the synthetic pairs.  The job runs, counts both kinds of pairs
    and writes a stack whose recipe keeps the similarity."""
    mni = shared_data / "mni152_2009a_sym"
    read = lambda name: sitk.ReadImage(str(mni / name), sitk.sitkFloat32)  # noqa: E731
    gm, wm, brain = read("gm_prob.nii.gz"), read("wm_prob.nii.gz"), read("brain_mask.nii.gz")
    csf = sitk.Clamp(brain - gm - wm, sitk.sitkFloat32, 0.0, 1.0)
    sitk.WriteImage(200.0 * csf + 120.0 * gm + 50.0 * wm, str(tmp_path / "t2like.nii.gz"))
    csv = tmp_path / "pairs.csv"
    csv.write_text(f"image,labels,pair\n{tmp_path / 't2like.nii.gz'},{mni / 'labels.nii.gz'},a\n"
                   f"{mni / 't1.nii.gz'},{mni / 'labels.nii.gz'},a\n", encoding="utf-8")
    config_file = tmp_path / "config.toml"
    config_file.write_text(TRAINING.format(images=csv, probability=0.5).replace("shapes_fraction = 0.3", "shapes_fraction = 0.0")
                           .replace("validation_pairs_per_image = 4", "validation_pairs_per_image = 1")
                           + 'iterations = 4\n\n[[recipe.stages]]\nkind = "bspline"\nspacing_mm = [8.0, 8.0, 8.0]\n'
                             'control_point_spacing = 4\nchannels = 8\nsimilarity = "mind"\niterations = 4\npatch_size = 16\n'
                             "dice_weight = 0.5\n", encoding="utf-8")
    job = tmp_path / "job"
    job.mkdir()
    events = EventLog(job / EVENTS_FILE)
    try:
        path = Trainer(TrainConfig.read(config_file), job, events=events).run()
    finally:
        events.close()
    log = [json.loads(line) for line in (job / EVENTS_FILE).read_text(encoding="utf-8").splitlines()]
    pairs = {k: sum(e["pairs"][k] for e in log if e["type"] == "stage_done") for k in ("synthetic", "listed", "contrast")}
    assert pairs["synthetic"] > 0 and pairs["listed"] > 0 and pairs["contrast"] > 0, pairs
    assert [s.similarity for s in load_stack(path).manifest.recipe.stages] == ["mind", "mind"]
