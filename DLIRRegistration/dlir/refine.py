"""Test-time refinement: a few optimiser steps on the stack's own loss, starting from the networks'
output (instance optimisation).  Trades a second or so for accuracy on hard pairs.

The networks' raw outputs (affine parameters, B-spline control points in voxels) become the
variables; the loss is ``-similarity + sum_k alpha_k * bending energy_k`` on the finest stage's
grid, with the finest stage's similarity measure.
"""

from __future__ import annotations

import torch

from .losses import bending_energy, local_ncc, ncc
from .pipeline import PreparedImage, stage_grid
from .preprocess import to_grid
from .stack import Stack
from .transforms import Composite, DisplacementField, SpatialTransform

#: Adam step sizes: B-spline control points (voxels of their grid), affine raw parameters
BSPLINE_LR = 0.1
AFFINE_LR = 0.005


def refine(
    stack: Stack,
    fixed: PreparedImage,
    moving: PreparedImage,
    initial: SpatialTransform,
    raws: list[torch.Tensor],
    steps: int,
) -> list[SpatialTransform]:
    """Optimise the stages' outputs ``raws`` for ``steps`` Adam steps; returns ``[T0, T1, ..., Tn]``."""
    stages = list(stack.stages)
    finest = stages[-1].spec
    grid = stage_grid(finest, fixed.grid)
    fixed_t = to_grid(fixed.smoothed(finest.spacing_mm), fixed.grid, None, grid)
    moving_s = moving.smoothed(finest.spacing_mm)
    grids = [stage_grid(s.spec, fixed.grid) for s in stages]
    variables = [raw.detach().clone().requires_grad_(True) for raw in raws]
    groups = [
        {"params": [v for v, s in zip(variables, stages) if s.spec.kind == kind], "lr": lr}
        for kind, lr in (("bspline", BSPLINE_LR), ("affine", AFFINE_LR))
    ]
    optimiser = torch.optim.Adam([g for g in groups if g["params"]])

    def build() -> list[SpatialTransform]:
        return [initial] + [s.transform(v, g) for s, v, g in zip(stages, variables, grids)]

    for _ in range(steps):
        transforms = build()
        warped = to_grid(moving_s, moving.grid, Composite(transforms), grid)
        if finest.similarity == "lncc":
            similarity = local_ncc(fixed_t, warped, finest.ncc_window)
        else:
            similarity = ncc(fixed_t, warped)
        loss = -similarity.mean()
        for stage, t in zip(stages, transforms[1:]):
            if isinstance(t, DisplacementField) and stage.spec.alpha > 0:
                loss = loss + stage.spec.alpha * bending_energy(t.field, t.grid.spacing).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return build()
