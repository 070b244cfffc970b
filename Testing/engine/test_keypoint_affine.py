"""The keypoint affine head: least-squares fit, network output, stage transform, recipe bounds, file round trip."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dlir.errors import StackError
from dlir.geometry import Grid, rotation_matrix
from dlir.nets import KeypointAffineNet
from dlir.recipe import Recipe, StageSpec
from dlir.stack import Manifest, build_stack, load_stack, save_stack
from dlir.stages import build_stage
from dlir.transforms import affine_from_keypoints

KEYPOINT_STAGE = StageSpec("affine", spacing_mm=(4.0, 4.0, 4.0), depth=2, channels=8, keypoints=12)


def test_the_fit_recovers_an_affine_exactly_from_noise_free_keypoints() -> None:
    generator = torch.Generator().manual_seed(0)
    fixed = torch.randn(2, 20, 3, generator=generator, dtype=torch.float64) * 40
    matrix = rotation_matrix(torch.tensor([[0.1, -0.05, 0.08], [0.0, 0.2, -0.1]], dtype=torch.float64))
    matrix = matrix @ torch.diag(torch.tensor([1.05, 0.95, 1.1], dtype=torch.float64))
    offset = torch.tensor([[3.0, -2.0, 5.0], [-7.0, 1.0, 0.5]], dtype=torch.float64)
    moving = fixed @ matrix.transpose(1, 2) + offset[:, None]
    fit = affine_from_keypoints(fixed, moving, ridge_mm2=0.0)
    assert torch.allclose(fit.matrix, matrix, atol=1e-9) and torch.allclose(fit.offset, offset, atol=1e-8)
    # the default ridge (1 mm^2 per keypoint) is negligible for keypoints spread over centimetres
    fit = affine_from_keypoints(fixed, moving)
    assert (fit(fixed) - moving).abs().max() < 0.05


def test_coincident_keypoints_give_the_identity_instead_of_failing() -> None:
    points = torch.full((1, 8, 3), 5.0)
    fit = affine_from_keypoints(points, points)
    assert torch.allclose(fit.matrix, torch.eye(3)[None]) and torch.allclose(fit.offset, torch.zeros(1, 3))


def test_keypoints_lie_on_the_input_grid_and_are_shared_between_the_images() -> None:
    torch.manual_seed(0)
    net = KeypointAffineNet(levels=2, channels=8, keypoints=6)
    image = torch.rand(1, 1, 20, 24, 28)
    out = net(image, image)
    assert out.shape == (1, 2, 6, 3)
    assert torch.equal(out[:, 0], out[:, 1])  # one detector for both images
    size = torch.tensor([28.0, 24.0, 20.0])  # (i, j, k) order
    assert torch.all(out >= 0) and torch.all(out <= size - 1)


def test_keypoints_follow_a_shift_of_the_image() -> None:
    """A shift by whole pooled cells moves every keypoint by the same amount (away from the borders)."""
    torch.manual_seed(1)
    net = KeypointAffineNet(levels=1, channels=8, keypoints=4)
    blob = torch.zeros(1, 1, 32, 32, 32)
    blob[..., 8:14, 10:15, 9:13] = 1.0
    shifted = torch.roll(blob, shifts=(4, 2, 6), dims=(2, 3, 4))  # k, j, i
    with torch.no_grad():  # positive, large heatmap weights on ReLU features: peaks on the blob, ~0 in the background
        net.heatmaps.weight.copy_(net.heatmaps.weight.abs() * 1000)
        a, b = net.locate(blob), net.locate(shifted)
    assert torch.all((a > 6) & (a < 18))  # on the blob, not the grid's centre
    assert torch.allclose(b - a, torch.tensor([6.0, 2.0, 4.0]).expand_as(a), atol=0.3)


def test_a_keypoint_stage_maps_keypoints_to_millimetres_on_an_oblique_grid() -> None:
    stage = build_stage(KEYPOINT_STAGE)
    direction = tuple(rotation_matrix(torch.tensor([[0.2, 0.0, -0.1]], dtype=torch.float64))[0].flatten().tolist())
    grid = Grid((10, 12, 14), (4.0, 4.0, 4.0), (-20.0, 5.0, 30.0), direction)
    fixed_index = torch.tensor([[[0.0, 0, 0], [9, 0, 0], [0, 11, 0], [0, 0, 13], [9, 11, 13]]])
    raw = torch.stack([fixed_index, fixed_index + torch.tensor([1.0, 0.0, 0.0])], dim=1)  # moving: one voxel along i
    transform = stage.transform(raw, grid)
    step = torch.as_tensor(grid.direction_matrix[:, 0] * 4.0, dtype=torch.float32)
    assert torch.allclose(transform.matrix[0], torch.eye(3), atol=1e-5)
    assert torch.allclose(transform.offset[0], step, atol=1e-4)


def test_an_untrained_keypoint_stage_is_the_identity_on_identical_images() -> None:
    torch.manual_seed(0)
    stage = build_stage(KEYPOINT_STAGE)
    image = torch.rand(1, 1, 16, 20, 24)
    grid = Grid((24, 20, 16), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    transform = stage(image, image, grid)
    assert torch.allclose(transform.matrix, torch.eye(3)[None], atol=1e-5)
    assert transform.offset.abs().max() < 1e-4


def test_the_recipe_counts_the_weights_and_bounds_the_keypoints() -> None:
    stage = build_stage(KEYPOINT_STAGE)
    assert KEYPOINT_STAGE.weight_count == sum(p.numel() for p in stage.parameters())
    for bad in (-1, 3, 257):
        with pytest.raises(StackError, match="keypoints"):
            replace(KEYPOINT_STAGE, keypoints=bad)
    with pytest.raises(StackError, match="keypoints"):
        StageSpec("bspline", keypoints=8)


def test_a_keypoint_stack_round_trips_through_its_file(tmp_path: Path) -> None:
    bspline = StageSpec("bspline", spacing_mm=(4.0, 4.0, 4.0), control_point_spacing=4, channels=8)
    manifest = Manifest(name="keypoints", recipe=Recipe(stages=(KEYPOINT_STAGE, bspline)))
    stack = build_stack(manifest, seed=3)
    path = save_stack(stack, tmp_path / "keypoints.safetensors")
    loaded = load_stack(path)
    assert loaded.manifest.recipe.stages[0].keypoints == 12
    image = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(stack.stages[0].predict(image, image.flip(2)), loaded.stages[0].predict(image, image.flip(2)))
