"""Synthetic-shape pairs (SynthMorph-style, :mod:`dlir.training.shapes`) and the soft-Dice loss.

The generator's own properties are tested here (grid, label maps, images, the pair's transform, seeding);
whether the bundled ``universal`` stack, trained on shapes alone, transfers to real images is in
``test_bundled_stacks.py``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlir.errors import InputError
from dlir.geometry import Grid, sample
from dlir.losses import one_hot, soft_dice
from dlir.pairs import sample_pair
from dlir.stack import load_stack
from dlir.training.config import ShapeSpec, SyntheticSpec, TrainConfig
from dlir.training.jobfolder import EVENTS_FILE
from dlir.training.shapes import draw_image, label_map, shape_grid, shape_pair
from dlir.training.trainer import _inside_moving, label_shares, train
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
        assert (same == 0).float().mean() < 5e-3  # a few isolated voxels where three blobs meet


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


def test_the_shape_grid_is_isotropic_axis_aligned_and_centred_on_the_origin() -> None:
    grid = shape_grid(ShapeSpec(size=33, spacing_mm=3.0))
    assert grid.size == (33, 33, 33) and grid.spacing == (3.0, 3.0, 3.0)
    assert grid.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert grid.origin == (-48.0, -48.0, -48.0) and np.allclose(grid.centre(), 0.0)


def test_an_image_of_a_label_map_gives_each_label_one_intensity_when_nothing_else_is_drawn() -> None:
    """No spread, blur, bias, gamma, noise or thick slices: the image is each label's mean, rescaled to fill [0, 1]."""
    plain = ShapeSpec(size=32, spacing_mm=4.0, spread=0.0, blur_mm=0.0, bias=0.0, gamma=0.0, noise=0.0, thick_slice_probability=0.0)
    labels = label_map(plain, torch.Generator().manual_seed(4))
    image = draw_image(labels, plain, torch.Generator().manual_seed(5))
    assert float(image.min()) == 0.0 and float(image.max()) == pytest.approx(1.0, abs=1e-6)
    for value in torch.unique(labels).tolist():
        inside = image[labels == value]
        assert float(inside.max() - inside.min()) < 1e-6, value
    assert len({round(float(image[labels == v][0]), 5) for v in torch.unique(labels).tolist()}) > 1


def test_the_fixed_image_is_the_moving_label_map_imaged_through_the_transform() -> None:
    """One shared, plain contrast: inside each fixed label (away from its edges) the fixed image has the moving
    image's intensity of that label, so the images, not only the label maps, are carried by ``T`` (all but a few
    voxels: linear interpolation of the image and nearest-neighbour labels may disagree next to an edge)."""
    plain = ShapeSpec(size=48, spacing_mm=2.0, labels_min=6, labels_max=6, spread=0.0, blur_mm=0.0, bias=0.0, gamma=0.0,
                      noise=0.0, thick_slice_probability=0.0, same_contrast=1.0)
    fixed, moving, transform, fixed_labels, moving_labels, grid = shape_pair(plain, DEFORMATION, torch.Generator().manual_seed(8))
    interior = F.max_pool3d(fixed_labels.float(), 3, 1, 1) == -F.max_pool3d(-fixed_labels.float(), 3, 1, 1)
    interior &= fixed_labels > 0
    for value in torch.unique(fixed_labels[interior]).tolist():
        expected = float(moving[moving_labels == value][0])
        agree = (fixed[interior & (fixed_labels == value)] - expected).abs() < 1e-4
        assert float(agree.float().mean()) > 0.99, value
    assert not torch.equal(fixed, moving)


def test_independent_contrasts_give_a_label_different_intensities_in_fixed_and_moving() -> None:
    plain = ShapeSpec(size=32, spacing_mm=4.0, labels_min=6, labels_max=6, spread=0.0, blur_mm=0.0, bias=0.0, gamma=0.0,
                      noise=0.0, thick_slice_probability=0.0, same_contrast=0.0)
    no_motion = SyntheticSpec(rotation_deg=0, scale=0, shear=0, translation_mm=0, displacement_mm=0.0)
    fixed, moving, _, fixed_labels, moving_labels, _ = shape_pair(plain, no_motion, torch.Generator().manual_seed(9))
    assert torch.equal(fixed_labels, moving_labels)
    differences = [abs(float(fixed[moving_labels == v].median() - moving[moving_labels == v].median()))
                   for v in torch.unique(moving_labels).tolist()]
    assert max(differences) > 0.1


def test_the_seed_alone_decides_the_pair() -> None:
    pairs = [shape_pair(SMALL, DEFORMATION, torch.Generator().manual_seed(seed)) for seed in (5, 5, 6)]
    for a, b in zip(pairs[0][:2] + pairs[0][3:5], pairs[1][:2] + pairs[1][3:5]):
        assert torch.equal(a, b)
    points = grid_points(pairs[0][5], 1)
    assert torch.equal(pairs[0][2](points), pairs[1][2](points))
    assert not torch.equal(pairs[0][4], pairs[2][4]) and not torch.equal(pairs[0][2](points), pairs[2][2](points))


@pytest.mark.parametrize("key, value", [("labels_min", 0), ("labels_max", 1), ("blob_mm_min", -1.0), ("noise", float("nan")),
                                        ("size", 4), ("thick_slice_probability", 2.0)])
def test_bad_shape_settings_name_the_key(key: str, value: float) -> None:
    with pytest.raises(InputError, match=f"shapes.{key}"):
        ShapeSpec(**{key: value})


def test_soft_dice_of_identical_shifted_and_its_gradient() -> None:
    labels = torch.zeros((1, 1, 20, 20, 20), dtype=torch.int64)
    labels[..., 5:15, 5:15, 5:15] = 1
    shifted = torch.roll(labels, 2, dims=4)  # a 10^3 cube moved 2 voxels: overlap 8 x 10 x 10
    a, b = one_hot(labels, [0, 1]), one_hot(shifted, [0, 1])
    assert float(1 - soft_dice(a, a)) == pytest.approx(0.0, abs=1e-9)
    background = 2 * (7000 - 200) / (2 * 7000)  # 7000 background voxels each, 6800 shared
    cube = 2 * 800 / 2000
    assert float(1 - soft_dice(a, b)) == pytest.approx(1 - (background + cube) / 2, rel=1e-5)
    b.requires_grad_(True)
    (1 - soft_dice(a, b)).sum().backward()
    assert b.grad is not None and torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


def test_the_dice_term_only_counts_where_the_moving_image_is() -> None:
    """Label maps that fill their grid (synthetic shapes): the true transform of a shifted pair scores a perfect soft
    Dice although some of its points leave the moving grid, a uniform shrink, which keeps every point inside, scores
    lower (an affine stage trained on unmasked shapes learned such a shrink), and fixed voxels without a moving label
    (0: outside the moving grid under the pair's transform) take no part, wherever the points fall."""
    grid = shape_grid(ShapeSpec(size=24, spacing_mm=4.0))
    moving = label_map(ShapeSpec(size=24, spacing_mm=4.0, labels_min=4, labels_max=4), torch.Generator().manual_seed(0))
    shift = torch.tensor([12.0, 0.0, 0.0])  # T(x) = x + 12 mm: the last 3 slices along x map outside
    points = grid_points(grid, 1) + shift
    fixed = sample(moving.float(), grid, points, mode="nearest").long()  # 0 where T leaves the moving grid
    values = torch.unique(moving).tolist()  # as the trainer: the moving map's values (0, outside, is not among them)
    f, m = one_hot(fixed, values), one_hot(moving, values)
    true = soft_dice(*_inside_moving(f, m, grid, points))
    shrink = soft_dice(*_inside_moving(f, m, grid, points * 0.85))
    assert float(true) == pytest.approx(1.0, abs=1e-6) and float(shrink) < float(true)
    _, warped = _inside_moving(f, m, grid, points * 0.85)  # every point inside, also where the fixed labels are 0 (unknown)
    assert float(warped[..., -3:].abs().max()) == 0.0 and float(warped[..., :-3].sum()) > 0


def test_soft_dice_of_soft_maps_peaks_where_they_are_equal() -> None:
    """Squared denominators: a soft map scores 1 against itself and less against a sharper or blurrier version
    (with ``sum(f) + sum(w)`` a sharp map would beat the aligned soft one)."""
    soft = torch.rand((1, 3, 6, 6, 6), generator=torch.Generator().manual_seed(0))
    soft = soft / soft.sum(1, keepdim=True)
    sharp = one_hot(soft.argmax(1, keepdim=True), [0, 1, 2])
    assert float(soft_dice(soft, soft)) == pytest.approx(1.0, abs=1e-6)
    assert float(soft_dice(soft, sharp)) < 0.95 and float(soft_dice(soft, (soft + 1 / 3) / 2)) < 0.99


def test_label_shares_are_area_averages_of_the_labels() -> None:
    labels = label_map(SMALL, torch.Generator().manual_seed(3))
    fine = shape_grid(SMALL)
    values = torch.unique(labels).tolist()
    same = label_shares(labels, fine, None, fine, values)  # one sample per voxel: the one-hot map itself
    assert torch.equal(same, one_hot(labels, values))
    coarse = Grid((12, 12, 12), (8.0, 8.0, 8.0), tuple(o + 3.0 for o in fine.origin), fine.direction)  # 4 x 4 x 4 voxels each
    shares = label_shares(labels, fine, None, coarse, values)
    assert torch.allclose(shares, F.avg_pool3d(one_hot(labels, values), 4), atol=1e-6)
    outside = label_shares(labels, fine, lambda x: x + 1000.0, coarse, values)  # every box mapped outside the image
    assert float(outside.abs().max()) == 0.0


def test_the_soft_dice_term_prefers_the_true_field_to_the_identity_on_a_coarse_grid() -> None:
    """Sub-voxel deformations on an 8 mm grid (as the first B-spline stage sees them): the soft Dice of the trainer's
    label shares is higher at the true transform than at the identity.  Measured before this was so (point-sampled
    one-hot labels, linear denominators): identity 0.874, true field 0.806 on the MNI labels; such a stage never
    moved off the identity."""
    spec = ShapeSpec(size=64, spacing_mm=2.0, labels_min=12, labels_max=12)
    for seed in range(3):
        fixed, moving, transform, fixed_labels, moving_labels, grid = shape_pair(spec, DEFORMATION, torch.Generator().manual_seed(seed))
        coarse = Grid((16, 16, 16), (8.0, 8.0, 8.0), tuple(o + 3.0 for o in grid.origin), grid.direction)
        values = torch.unique(moving_labels).tolist()
        f = label_shares(fixed_labels, grid, None, coarse, values)
        m = label_shares(moving_labels, grid, None, coarse, values)
        points = grid_points(coarse, 1)
        at_identity = soft_dice(*_inside_moving(f, m, coarse, points))
        at_truth = soft_dice(*_inside_moving(f, m, coarse, transform(points)))
        assert float(at_truth) > float(at_identity) + 0.01


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
