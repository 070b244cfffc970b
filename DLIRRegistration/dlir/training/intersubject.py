"""Inter-subject augmentation of training pairs: partial fields of view and large initial misalignment.

What the stacks meet at inference: two different subjects, aligned globally by the capture search
(:mod:`dlir.capture`) to within a few mm, a few degrees and about 5 % scale, often with fields of view
that end in different places (a scan that stops at the neck, or above the vertex).

- :func:`crop_end` cuts one end of an image away along one axis: the tensor and its grid both end
  there, so the image really stops (nothing is set to 0 and left inside the grid to be matched).
- :func:`random_misalignment` draws an affine ``R`` about the fixed image's centre (fixed point ->
  fixed point, LPS mm) that a pair's initial alignment ``T0`` is composed with: the stages start from
  ``T0 o R``, as if the moving image had been moved by ``T0 R T0^-1`` and the initial alignment had
  missed it.  Composed into the transform, it costs no resampling and leaves the moving image whole.

All randomness comes from the given ``torch.Generator``; nothing is drawn for a setting at 0.
"""

from __future__ import annotations

import numpy as np
import torch

from ..geometry import Grid
from ..transforms import AffineTransform
from .augment import uniform
from .config import DataSpec, SyntheticSpec
from .synthetic import random_affine

#: the fewest voxels a crop leaves along its axis
MIN_KEPT = 2


def crop_end(image: torch.Tensor, grid: Grid, axis: int, share: float, upper: bool,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, Grid, torch.Tensor | None]:
    """(image, grid, labels) with ``share`` of the voxels along grid ``axis`` (0 = i/x, 1 = j/y, 2 = k/z) cut away at
    the upper (``upper``) or lower end; new tensors ``[1, C, D, H, W]`` (views), the grid's origin moved for a lower cut.

    The kept voxels keep their values and their physical positions; at least :data:`MIN_KEPT` voxels stay.
    """
    n = grid.size[axis]
    kept = max(min(MIN_KEPT, n), n - round(share * n))
    start = 0 if upper else n - kept
    dim = 4 - axis  # tensor layout [N, C, k, j, i]
    size = list(grid.size)
    size[axis] = kept
    shift = np.zeros(3)
    shift[axis] = start * grid.spacing[axis]
    origin = np.asarray(grid.origin) + grid.direction_matrix @ shift
    cropped = Grid(tuple(size), grid.spacing, tuple(float(o) for o in origin), grid.direction)
    return (image.narrow(dim, start, kept), cropped, None if labels is None else labels.narrow(dim, start, kept))


def random_crop(image: torch.Tensor, grid: Grid, spec: DataSpec, generator: torch.Generator,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, Grid, torch.Tensor | None]:
    """:func:`crop_end` at a random end of a random axis, ``spec.crop_min``..``spec.crop_max`` of the extent."""
    axis = int(torch.randint(3, (1,), generator=generator))
    upper = bool(torch.randint(2, (1,), generator=generator))
    return crop_end(image, grid, axis, uniform(generator, spec.crop_min, spec.crop_max), upper, labels)


def misaligns(spec: DataSpec) -> bool:
    """Whether ``spec`` asks for a random initial misalignment of pairs of two images."""
    return max(spec.misalign_rotation_deg, spec.misalign_scale, spec.misalign_translation_mm) > 0


def random_misalignment(spec: DataSpec, grid: Grid, generator: torch.Generator) -> AffineTransform:
    """``R``: rotations (per axis, up to ``spec.misalign_rotation_deg`` degrees), scales (``1 +- spec.misalign_scale``)
    and a shift (up to ``spec.misalign_translation_mm`` mm per axis) about the centre of ``grid`` (LPS mm), uniform."""
    bounds = SyntheticSpec(rotation_deg=spec.misalign_rotation_deg, scale=spec.misalign_scale, shear=0.0,
                           translation_mm=spec.misalign_translation_mm)
    return random_affine(bounds, grid, generator)
