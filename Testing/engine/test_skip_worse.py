"""Inference skips an affine stage that makes the images less similar (``run_stages(..., skip_worse=True)``)."""

from __future__ import annotations

import numpy as np
import torch

from dlir.geometry import Grid
from dlir.pipeline import PreparedImage, run_stages
from dlir.recipe import Recipe, StageSpec
from dlir.stack import Manifest, build_stack
from dlir.transforms import AffineTransform, DisplacementField

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def blobs(seed: int) -> np.ndarray:
    """A smooth random volume (z, y, x) of 48^3 voxels."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:48, :48, :48].astype(np.float32)
    volume = np.zeros((48, 48, 48), np.float32)
    for _ in range(12):
        c = rng.uniform(10, 38, 3)
        volume += np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * rng.uniform(3, 6) ** 2))
    return volume


def stack_moving_by(shift_mm: float):
    """A two-stage stack whose affine stage always translates by ``shift_mm`` along x (a confidently wrong network)."""
    recipe = Recipe(stages=(StageSpec("affine", spacing_mm=(4.0,) * 3, depth=2, channels=4),
                            StageSpec("bspline", spacing_mm=(4.0,) * 3, control_point_spacing=4, channels=4)))
    stack = build_stack(Manifest("wrong", recipe), seed=0).eval()
    half_extent = 48 * 2.0 / 2 - 1.0  # mm: the translation unit of the affine head (half the 4 mm grid's extent)
    with torch.no_grad():
        stack.stages[0].net.head[-1].bias[9] = shift_mm / half_extent
    return stack


def test_a_stage_that_lowers_the_similarity_is_skipped_and_a_useful_one_kept() -> None:
    grid = Grid((48, 48, 48), (2.0, 2.0, 2.0), (-47.0, -47.0, -47.0), IDENTITY)
    intensity = Recipe(stages=(StageSpec("affine"),)).intensity
    image = PreparedImage.from_array(blobs(0), grid, intensity)
    start = AffineTransform.translation(torch.zeros(1, 3))
    stack = stack_moving_by(12.0)
    with torch.no_grad():
        plain = run_stages(stack, image, image, start)
        guarded = run_stages(stack, image, image, start, skip_worse=True)
    assert float(plain[1].offset[0, 0]) > 5.0  # identical images: the 12 mm shift only makes them less similar
    assert isinstance(guarded[1], AffineTransform) and torch.equal(guarded[1].offset, torch.zeros(1, 3))
    assert torch.equal(guarded[1].matrix, torch.eye(3)[None])
    assert isinstance(guarded[2], DisplacementField) and len(guarded) == len(plain) == 3
    # a moving image shifted by the same 12 mm: the stage is right, and kept
    shifted = PreparedImage.from_array(np.roll(blobs(0), 6, axis=2), grid, intensity)  # moving(x + 12 mm) = fixed(x)
    with torch.no_grad():
        kept = run_stages(stack, image, shifted, start, skip_worse=True)
    assert torch.allclose(kept[1].offset, plain[1].offset)
