"""Probe: train ONE B-spline stage as ``dlir train`` does (8 mm grid, control points every 32 mm, NCC + 5 x
bending, Adam 2e-3, batch 1, whole-grid patches) on synthetic deformations of the MNI152 T1 (``mni``) or on
same-contrast synthetic-shape pairs (``shapes``: one image of a random label map, deformed), and print every
250 iterations, on 6 fixed validation pairs: the labels' soft Dice on the 8 mm grid before -> after, NCC,
mean |u|, the mean distance to the TRUE field (known for synthetic pairs) before -> after, everywhere and
inside the object (fixed image above 0.1 on the network grid), and the output layer's bias (control-point
voxels).  The labels reach the 8 mm grid as the trainer's soft-Dice term sees them (area shares,
:func:`dlir.training.trainer.label_shares`; squared-denominator soft Dice, :func:`dlir.losses.soft_dice`).

    PYTHONPATH=DLIRRegistration .venv/bin/python Testing/benchmarks/loso/bspline_stage_probe.py mni 2500 [DICE_WEIGHT]

``DICE_WEIGHT`` (default 0): the share of the labels' soft Dice in the similarity, as ``dice_weight`` in a
recipe (the labels are known for these pairs).

A measurement for issue 12 (RESULTS.md, "Stacks on subjects they never saw"), not a test: one CPU
thread, about 20 min for 2500 iterations of ``mni``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dlir.geometry import Grid, sample
from dlir.losses import ncc, soft_dice, stage_loss
from dlir.pipeline import stage_grid
from dlir.training.trainer import label_shares
from dlir.recipe import INTENSITY_PRESETS, StageSpec
from dlir.stages import build_stage
from dlir.training.config import ShapeSpec, SyntheticSpec
from dlir.training.data import ImageEntry, load_image
from dlir.training.shapes import draw_image, label_map, shape_grid
from dlir.training.synthetic import random_transform, synthetic_pair
from dlir.transforms import SpatialTransform, grid_points

MNI = Path(__file__).resolve().parents[4] / "shared" / "data" / "mni152_2009a_sym"
SPEC = StageSpec("bspline", spacing_mm=(8.0,) * 3, control_point_spacing=4, channels=32, alpha=5.0, patch_size=24)
DEFORMATION = SyntheticSpec(rotation_deg=0, scale=0, shear=0, translation_mm=0, displacement_mm=5.0, intensity=0, noise=0)
Pair = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Grid, SpatialTransform]


def pair_source(kind: str):
    """A function drawing (fixed, moving, fixed labels, moving labels, grid, T) from a generator."""
    if kind == "mni":
        image = load_image(ImageEntry(MNI / "t1.nii.gz", MNI / "labels.nii.gz"), INTENSITY_PRESETS["mr"], (2.0, 2.0, 2.0), 1)
        labels = image.labels.long()

        def mni(generator: torch.Generator) -> Pair:
            fixed, moving, transform, fixed_labels = synthetic_pair(image.prepared.tensor, image.prepared.grid, DEFORMATION,
                                                                    generator, image.labels)
            return fixed, moving, fixed_labels.long(), labels, image.prepared.grid, transform
        return mni

    shapes = ShapeSpec()

    def same_contrast_shapes(generator: torch.Generator) -> Pair:
        grid = shape_grid(shapes)
        moving_labels = label_map(shapes, generator)
        transform = random_transform(DEFORMATION, grid, generator)
        points = transform(grid_points(grid, 1))
        moving = draw_image(moving_labels, shapes, generator)
        fixed_labels = sample(moving_labels.float(), grid, points, mode="nearest").long()
        return sample(moving, grid, points), moving, fixed_labels, moving_labels, grid, transform
    return same_contrast_shapes


def main(kind: str, iterations: int, dice_weight: float = 0.0) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = replace(SPEC, dice_weight=dice_weight)
    stage = build_stage(spec)
    optimiser = torch.optim.Adam(stage.parameters(), lr=0.002)
    draw = pair_source(kind)

    def step(generator: torch.Generator, train: bool) -> list[float]:
        fixed, moving, fixed_labels, moving_labels, grid, transform = draw(generator)
        net_grid = stage_grid(SPEC, grid)
        points = grid_points(net_grid, 1)
        truth = transform(points) - points
        points = grid_points(net_grid, 1, fixed.device)
        f, m = sample(fixed, grid, points), sample(moving, grid, points)
        values = torch.unique(torch.cat([fixed_labels.flatten(), moving_labels.flatten()])).tolist()
        f_labels = label_shares(fixed_labels, grid, None, net_grid, values)
        m_labels = label_shares(moving_labels, grid, None, net_grid, values)
        with torch.set_grad_enabled(train):
            field = stage.transform(stage.net(f, m), net_grid).field
            moved = points + field.movedim(1, -1)
            warped_labels = sample(m_labels, net_grid, moved)
            terms = stage_loss(spec, f, sample(m, net_grid, moved), field, net_grid.spacing, (f_labels, warped_labels))
        if train:
            optimiser.zero_grad()
            terms.loss.backward()
            optimiser.step()
        u = field.detach().movedim(1, -1)
        inside = f[0, 0] > 0.1
        return [soft_dice(f_labels, m_labels).item(), soft_dice(f_labels, warped_labels.detach()).item(),
                ncc(f, sample(m, net_grid, moved.detach())).item(), u.norm(dim=-1).mean().item(), truth.norm(dim=-1).mean().item(),
                (u - truth).norm(dim=-1).mean().item(), truth[0][inside].norm(dim=-1).mean().item(),
                (u - truth)[0][inside].norm(dim=-1).mean().item()]

    training = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for iteration in range(iterations + 1):
        if iteration % 250 == 0:
            scores = [step(torch.Generator().manual_seed(99 + k), False) for k in range(6)]
            mean = [sum(column) / len(column) for column in zip(*scores)]
            print(f"{kind} {iteration}: Dice {mean[0]:.4f} -> {mean[1]:.4f}, NCC {mean[2]:.4f}, |u| {mean[3]:.3f} mm, "
                  f"error to the true field {mean[4]:.3f} -> {mean[5]:.3f} mm (inside {mean[6]:.3f} -> {mean[7]:.3f}), output bias "
                  f"{[round(b, 4) for b in stage.net.output.bias.tolist()]} ({time.perf_counter() - start:.0f} s)", flush=True)
        step(training, True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
