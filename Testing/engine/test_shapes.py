"""Synthetic-shape pairs (SynthMorph-style) and the soft-Dice loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlir.errors import InputError
from dlir.geometry import sample
from dlir.losses import one_hot, soft_dice_loss
from dlir.training.config import SyntheticSpec
from dlir.training.shapes import ShapeSpec, draw_image, label_map, shape_pair
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
