"""Stages: a network plus the transformer that turns its output into a spatial transform.

A stage sees the fixed image and the moving image warped by all earlier stages, both resampled
on the stage's grid (axis-aligned LPS, ``spec.spacing_mm``, intensities in [0, 1]), and returns a
fixed -> moving transform in LPS mm.  ``predict`` (network) and ``transform`` (transformer) are
separate so that test-time refinement can optimise the network's output directly.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .geometry import Grid
from .nets import AffineNet, BSplineNet, BSplineUpsample, KeypointAffineNet
from .recipe import StageSpec
from .transforms import AffineBounds, AffineTransform, DisplacementField, affine_from_keypoints, affine_from_parameters


class AffineStage(nn.Module):
    """Affine registration: the paper's network (Fig. 2; output parameters ``[N, 12]``), or with
    ``spec.keypoints > 0`` the keypoint network (output keypoints ``[N, 2, K, 3]``, voxel indices)."""

    def __init__(self, spec: StageSpec) -> None:
        super().__init__()
        self.spec = spec
        self.net = KeypointAffineNet(spec.depth, spec.channels, spec.keypoints) if spec.keypoints else AffineNet(spec.channels, spec.depth)
        self.bounds = AffineBounds(spec.max_rotation, spec.max_shear, spec.min_scale, spec.max_scale)

    def predict(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.net(fixed, moving)

    def transform(self, raw: torch.Tensor, grid: Grid) -> AffineTransform:
        """Parameters: rotation, shear and scale act about the grid's centre; translation in units of half its extent.
        Keypoints: the least-squares affine between the fixed and moving keypoints, in LPS mm on ``grid``."""
        if self.spec.keypoints:
            points = grid.physical_from_index(raw)
            return affine_from_keypoints(points[:, 0], points[:, 1])
        centre = torch.as_tensor(grid.centre(), dtype=raw.dtype, device=raw.device).expand(raw.shape[0], 3)
        lower, upper = grid.bounding_box()
        half_extent = float((upper - lower).max()) / 2
        return affine_from_parameters(raw, centre, half_extent, self.bounds)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid) -> AffineTransform:
        return self.transform(self.predict(fixed, moving), grid)


class BSplineStage(nn.Module):
    """Cubic B-spline registration (paper Fig. 3).  Output control points ``[N, 3, d, h, w]`` (voxels)."""

    def __init__(self, spec: StageSpec) -> None:
        super().__init__()
        self.spec = spec
        self.net = BSplineNet(spec.levels, spec.channels)
        self.upsample = BSplineUpsample(spec.control_point_spacing)

    def predict(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.net(fixed, moving)

    def transform(self, raw: torch.Tensor, grid: Grid) -> DisplacementField:
        """Dense field on ``grid`` (identity direction): control points in voxels -> LPS mm."""
        scale = torch.as_tensor(grid.spacing, dtype=raw.dtype, device=raw.device).view(1, 3, 1, 1, 1)
        return DisplacementField(self.upsample(raw) * scale, grid)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid) -> DisplacementField:
        return self.transform(self.predict(fixed, moving), grid)


Stage = AffineStage | BSplineStage


def build_stage(spec: StageSpec) -> Stage:
    """A freshly initialised stage for ``spec``."""
    return AffineStage(spec) if spec.kind == "affine" else BSplineStage(spec)
