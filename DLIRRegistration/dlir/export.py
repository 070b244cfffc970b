"""The composed transform as a compact ITK composite transform: what ``transform.h5`` holds and what
Slicer loads, whatever the size of the images.

The engine's transform is ``T = T0 o T1 o ... o Tn`` (fixed point -> moving point, LPS mm; ``Tn``
acts first): affine transforms (initial alignment, affine stages) and one dense displacement field
on the finest B-spline stage's coarse network grid (a few mm; the stages' fields merged into it by
:meth:`dlir.transforms.Composite.merged_fields`), trilinear between voxel centres and extended by its border
values outside.  ITK represents exactly that: an ``AffineTransform`` per affine part and a
``DisplacementFieldTransform`` (linear interpolation) per field on the field's own grid,
padded by :data:`MARGIN_MM` of border values so that points up to that far outside a stage's grid
(where later stages may carry them) map exactly as in the engine.  Beyond the margin ITK leaves a
point unmoved where the engine keeps the border value: the only place where the two can differ.

So the file's size follows the network grids, not the images: a few MB for a whole-body CT,
instead of a full-resolution displacement field (1.26 GB for a 512 x 512 x 200 CT).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch.nn.functional as F

from .geometry import Grid
from .transforms import AffineTransform, Composite, DisplacementField, SpatialTransform

#: border values added around every stage field (mm): where the exported transform is exact
MARGIN_MM = 24.0


def itk_transform(transforms: Sequence[SpatialTransform], offset: Sequence[float] = (0.0, 0.0, 0.0)) -> sitk.CompositeTransform:
    """``T0 o ... o Tn`` as a new ITK composite transform (fixed -> moving, LPS mm, ITK's resampling direction).

    ``transforms`` work in coordinates shifted by ``offset`` (mm; the engine computes relative to
    the fixed image's centre: ``x' = x + offset``); the result works in the images' own coordinates:
    ``T(x) = T'(x + offset) - offset``.
    """
    o = np.asarray(offset, dtype=np.float64)
    composite = sitk.CompositeTransform(3)
    for transform in Composite(transforms).flattened().transforms:  # ITK applies the transform added last first: Tn, as the engine does
        if isinstance(transform, AffineTransform):
            composite.AddTransform(_affine(transform, o))
        elif isinstance(transform, DisplacementField):
            composite.AddTransform(_field(transform, o))
        else:
            raise TypeError(f"cannot export a {type(transform).__name__} to ITK")
    return composite


def _affine(transform: AffineTransform, o: np.ndarray) -> sitk.AffineTransform:
    """``x -> A (x + o) + b - o``, i.e. matrix A and translation ``A o + b - o`` (centre 0)."""
    if transform.matrix.shape[0] != 1:
        raise ValueError("only a single pair's transform can be exported")
    a = transform.matrix[0].detach().double().cpu().numpy()
    b = transform.offset[0].detach().double().cpu().numpy()
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(a.ravel().tolist())
    affine.SetTranslation((a @ o + b - o).tolist())
    return affine


def _field(transform: DisplacementField, o: np.ndarray) -> sitk.DisplacementFieldTransform:
    """The stage field on its own grid moved back by ``-o``, padded with :data:`MARGIN_MM` of border values."""
    if transform.field.shape[0] != 1:
        raise ValueError("only a single pair's transform can be exported")
    grid = padded_grid(transform.grid)
    pads = [(n - m) // 2 for n, m in zip(grid.size, transform.grid.size)]  # x, y, z voxels
    field = F.pad(transform.field.detach().double().cpu(), (pads[0], pads[0], pads[1], pads[1], pads[2], pads[2]),
                  mode="replicate")
    image = sitk.GetImageFromArray(field[0].movedim(0, -1).numpy(), isVector=True)  # [k, j, i, 3] LPS mm
    image.SetSpacing(grid.spacing)
    image.SetOrigin((np.asarray(grid.origin, dtype=np.float64) - o).tolist())
    image.SetDirection(grid.direction)
    return sitk.DisplacementFieldTransform(image)


def padded_grid(grid: Grid) -> Grid:
    """The grid a stage field is exported on: ``grid`` with :data:`MARGIN_MM` more on every side (whole voxels)."""
    pads = np.asarray([math.ceil(MARGIN_MM / s) for s in grid.spacing])
    origin = np.asarray(grid.origin, dtype=np.float64) - grid.direction_matrix @ (pads * np.asarray(grid.spacing))
    return Grid(tuple(int(n + 2 * p) for n, p in zip(grid.size, pads)), grid.spacing, tuple(origin.tolist()), grid.direction)
