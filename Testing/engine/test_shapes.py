"""Synthetic-shape pairs (SynthMorph-style) and the soft-Dice loss."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dlir.errors import InputError
from dlir.geometry import sample
from dlir.losses import one_hot, soft_dice, soft_dice_loss
from dlir.pairs import sample_pair
from dlir.stack import load_stack
from dlir.training.config import ShapeSpec, SyntheticSpec, TrainConfig
from dlir.training.jobfolder import EVENTS_FILE
from dlir.training.shapes import draw_image, label_map, shape_grid, shape_pair
from dlir.training.trainer import _inside_moving, train
from dlir.transforms import grid_points

SMALL = ShapeSpec(size=48, spacing_mm=2.0)
DEFORMATION = SyntheticSpec(control_point_spacing_mm=40.0, displacement_mm=4.0)


def test_the_requested_number_of_labels_appears_in_smooth_maps() -> None:
    for n in (8, 16, 32):
        labels = label_map(SMALL, torch.Generator().manual_seed(n), n_labels=n)
        assert labels.dtype == torch.int64 and labels.shape == (1, 1, 48, 48, 48)
        present = torch.unique(labels).tolist()
        assert set(present) <= set(range(1, n + 1)) and len(present) >= n - 2  # a tiny blob may vanish, not more
        # smooth maps: almost no voxel differs from all 6 of its neighbours (an isolated voxel)
        padded = F.pad(labels.float(), (1, 1, 1, 1, 1, 1), mode="replicate")[0, 0]
        core = padded[1:-1, 1:-1, 1:-1]
        same = sum((padded[1 + dz:49 + dz, 1 + dy:49 + dy, 1 + dx:49 + dx] == core).int()
                   for dz, dy, dx in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)))
        assert (same == 0).float().mean() < 5e-3  # measured: at most 0.15 % at 32 labels


def test_the_number_of_labels_is_drawn_within_the_range() -> None:
    spec = ShapeSpec(size=32, labels_min=3, labels_max=5, blob_mm_min=20, blob_mm_max=20)
    counts = {int(label_map(spec, torch.Generator().manual_seed(s)).max()) for s in range(12)}
    assert counts <= {3, 4, 5} and len(counts) >= 2


def test_images_of_one_map_are_independent_draws_and_everything_is_reproducible() -> None:
    labels = label_map(SMALL, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    a, b = draw_image(labels, SMALL, g), draw_image(labels, SMALL, g)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, b) and abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.9
    first = shape_pair(SMALL, DEFORMATION, torch.Generator().manual_seed(5))
    again = shape_pair(SMALL, DEFORMATION, torch.Generator().manual_seed(5))
    for x, y in zip(first[:2] + first[3:5], again[:2] + again[3:5]):
        assert torch.equal(x, y)


def test_the_fixed_labels_are_the_moving_labels_carried_by_the_transform() -> None:
    fixed, moving, transform, fixed_labels, moving_labels, grid = shape_pair(SMALL, DEFORMATION, torch.Generator().manual_seed(7))
    assert fixed.shape == moving.shape == fixed_labels.shape == moving_labels.shape
    carried = sample(moving_labels.float(), grid, transform(grid_points(grid)), mode="nearest").long()
    assert torch.equal(carried, fixed_labels)
    assert not torch.equal(fixed_labels, moving_labels)


@pytest.mark.parametrize("key, value", [("labels_min", 0), ("labels_max", 1), ("blob_mm_min", -1.0), ("noise", float("nan")),
                                        ("size", 4), ("thick_slice_probability", 2.0)])
def test_bad_shape_settings_name_the_key(key: str, value: float) -> None:
    with pytest.raises(InputError, match=f"shapes.{key}"):
        ShapeSpec(**{key: value})


def test_soft_dice_loss_of_identical_shifted_and_its_gradient() -> None:
    labels = torch.zeros((1, 1, 20, 20, 20), dtype=torch.int64)
    labels[..., 5:15, 5:15, 5:15] = 1
    shifted = torch.roll(labels, 2, dims=4)  # a 10^3 cube moved 2 voxels: overlap 8 x 10 x 10
    a, b = one_hot(labels, [0, 1]), one_hot(shifted, [0, 1])
    assert float(soft_dice_loss(a, a)) == pytest.approx(0.0, abs=1e-9)
    background = 2 * (7000 - 200) / (2 * 7000)  # 7000 background voxels each, 6800 shared
    cube = 2 * 800 / 2000
    assert float(soft_dice_loss(a, b)) == pytest.approx(1 - (background + cube) / 2, rel=1e-5)
    b.requires_grad_(True)
    soft_dice_loss(a, b).sum().backward()
    assert b.grad is not None and torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


def test_the_dice_term_only_counts_where_the_moving_image_is() -> None:
    """Label maps that fill their grid (synthetic shapes): the true transform of a shifted pair scores a perfect soft
    Dice although some of its points leave the moving grid (unmasked it does not), and a uniform shrink, which keeps
    every point inside, scores lower (an affine stage trained on unmasked shapes learned such a shrink)."""
    grid = shape_grid(ShapeSpec(size=24, spacing_mm=4.0))
    moving = label_map(ShapeSpec(size=24, spacing_mm=4.0, labels_min=4, labels_max=4), torch.Generator().manual_seed(0))
    shift = torch.tensor([12.0, 0.0, 0.0])  # T(x) = x + 12 mm: the last 3 slices along x map outside
    points = grid_points(grid, 1) + shift
    fixed = sample(moving.float(), grid, points, mode="nearest").long()  # 0 where T leaves the moving grid
    values = torch.unique(torch.cat([fixed.flatten(), moving.flatten()])).tolist()  # as the trainer: 0 among them
    f, m = one_hot(fixed, values), one_hot(moving, values)
    true = soft_dice(*_inside_moving(f, m, grid, points))
    shrink = soft_dice(*_inside_moving(f, m, grid, points * 0.85))
    assert float(true) == pytest.approx(1.0, abs=1e-6) and float(shrink) < float(true)
    assert float(soft_dice(f, sample(m, grid, points))) < 0.97  # unmasked, the true transform is penalised at the border


# ------------------------------------------------------------------------------------- in dlir train
TINY_RECIPE = {
    "stages": [
        {"kind": "affine", "spacing_mm": [8.0, 8.0, 8.0], "channels": 4, "depth": 2, "iterations": 3, "dice_weight": 1.0},
        {"kind": "bspline", "spacing_mm": [8.0, 8.0, 8.0], "control_point_spacing": 4, "channels": 4, "iterations": 3,
         "patch_size": 16, "alpha": 1.0, "dice_weight": 0.5},
    ],
}


def tiny_config(**data: object) -> TrainConfig:
    return TrainConfig.from_dict({"name": "tiny", "device": "cpu", "validate_every": 0, "checkpoint_every": 100,
                                  "data": {"validation_pairs_per_image": 1, **data},
                                  "shapes": {"size": 32, "spacing_mm": 4.0, "labels_min": 3, "labels_max": 5},
                                  "recipe": TINY_RECIPE})


def test_a_stack_trains_on_synthetic_shapes_alone(tmp_path: Path) -> None:
    config = tiny_config(shapes_fraction=1.0)
    config.check()  # no images needed
    path = train(config, tmp_path / "job", progress="none")
    events = [json.loads(line) for line in (tmp_path / "job" / EVENTS_FILE).read_text(encoding="utf-8").splitlines()]
    start = next(e for e in events if e["type"] == "start")
    assert start["images"] == [] and start["shapes_fraction"] == 1.0 and start["validation_pairs"] == 4
    validations = [e for e in events if e["type"] == "validation"]
    assert validations and all(0 < e["dice_mean"] <= 1 for e in validations)  # shape pairs carry labels
    stack = load_stack(path)
    assert [s.dice_weight for s in stack.manifest.recipe.stages] == [1.0, 0.5]


def test_held_out_images_are_never_drawn_for_training(tmp_path: Path) -> None:
    sample = sample_pair()
    csv = tmp_path / "images.csv"
    csv.write_text(f"image,labels\n{sample.moving},{sample.moving_labels}\n{sample.fixed},{sample.fixed_labels}\n", encoding="utf-8")
    config = replace(tiny_config(images=str(csv), validation_count=1, shapes_fraction=0.5), seed=3)
    train(config, tmp_path / "job", progress="none")
    start = next(json.loads(line) for line in (tmp_path / "job" / EVENTS_FILE).read_text(encoding="utf-8").splitlines()
                 if '"start"' in line)
    assert start["validation_images"] == ["sample_fixed"] and start["images"] == ["sample_moving"]


@pytest.mark.parametrize("section, values, key", [
    ("shapes", {"labels_min": 0}, "shapes.labels_min"),
    ("shapes", {"blob_mm_max": -5.0}, "shapes.blob_mm_max"),
    ("data", {"shapes_fraction": 1.5}, "data.shapes_fraction"),
    ("recipe", {"stages": [{"kind": "affine", "similarity": "mutual-information"}]}, "similarity"),
    ("recipe", {"stages": [{"kind": "bspline", "dice_weight": -1.0}]}, "dice_weight"),
])
def test_bad_training_values_stop_with_one_sentence_naming_the_key(section: str, values: dict, key: str) -> None:
    with pytest.raises(InputError, match=key) as caught:
        TrainConfig.from_dict({"name": "x", section: values})
    assert "\n" not in str(caught.value)


def test_realistic_augmentation_of_real_images_is_off_by_default_and_varies_when_asked() -> None:
    from dlir.training.synthetic import augment_intensity

    labels = label_map(SMALL, torch.Generator().manual_seed(11))
    image = draw_image(labels, replace(SMALL, noise=0.0, bias=0.0), torch.Generator().manual_seed(12))
    plain = SyntheticSpec(intensity=0.0, noise=0.0)
    assert torch.equal(augment_intensity(image, plain, torch.Generator().manual_seed(0), 2.0), image.clamp(0, 1))
    scanner = SyntheticSpec(intensity=0.0, noise=0.0, bias=0.4, blur_mm=3.0, thick_slice_probability=1.0, thick_slice_max=4)
    varied = augment_intensity(image, scanner, torch.Generator().manual_seed(0), 2.0)
    assert varied.shape == image.shape and 0 <= float(varied.min()) and float(varied.max()) <= 1
    assert float((varied - image).abs().mean()) > 0.01
    again = augment_intensity(image, scanner, torch.Generator().manual_seed(0), 2.0)
    assert torch.equal(varied, again)
    with pytest.raises(InputError, match="synthetic.thick_slice_probability"):
        SyntheticSpec(thick_slice_probability=1.5)
