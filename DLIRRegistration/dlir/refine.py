"""Test-time refinement: a few optimiser steps on the stack's own loss, starting from the network's
output (instance optimisation).  Trades a second or so for accuracy on hard pairs.

Only the LAST stage's output is refined (B-spline control points in voxels, or the 12 affine
parameters), on exactly the inputs that stage saw: the fixed image and the moving image warped
by all earlier stages, on the stage's grid.  Loss: ``-similarity + alpha * bending energy`` with
the stage's own similarity measure and alpha.  Earlier stages stay as the networks made them.
"""

from __future__ import annotations

import torch

from .geometry import Grid, sample
from .losses import bending_energy, local_ncc, ncc
from .stages import Stage
from .transforms import DisplacementField, SpatialTransform, grid_points

#: Adam step sizes for B-spline control points (voxels of their grid) and affine raw parameters
LEARNING_RATE = {"bspline": 0.1, "affine": 0.005}


def refine(stage: Stage, raw: torch.Tensor, grid: Grid, fixed: torch.Tensor, moving: torch.Tensor, steps: int) -> SpatialTransform:
    """Optimise a stage's output ``raw`` for ``steps`` Adam steps and return its refined transform.

    ``fixed`` and ``moving`` ``[1, 1, D, H, W]`` are the stage's inputs on ``grid`` (LPS mm);
    the moving image is resampled at ``T(x)`` for the voxel centres x, where ``T`` is the stage's
    transform (for a B-spline stage ``x + u(x)`` exactly, since its field lives on ``grid``).
    """
    spec = stage.spec
    variable = raw.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([variable], lr=LEARNING_RATE[spec.kind])
    points = grid_points(grid, 1, fixed.device)
    for _ in range(steps):
        transform = stage.transform(variable, grid)
        if isinstance(transform, DisplacementField):
            mapped = points + transform.field.movedim(1, -1)
        else:
            mapped = transform(points)
        warped = sample(moving, grid, mapped)
        if spec.similarity == "lncc":
            loss = -local_ncc(fixed, warped, spec.ncc_window).mean()
        else:
            loss = -ncc(fixed, warped).mean()
        if isinstance(transform, DisplacementField) and spec.alpha > 0:
            loss = loss + spec.alpha * bending_energy(transform.field, grid.spacing).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return stage.transform(variable, grid)
