"""Synthetic training pairs from one image: a random smooth deformation, a small affine and an intensity change.

For an image I on an axis-aligned training grid, a random transform ``T`` (fixed point -> moving
point, LPS mm) gives the pair ``fixed(x) = I(T(x))``, ``moving = I``, so ``T`` is exactly what a
registration of (fixed, moving) should find.  ``T = A o B``: ``B`` a cubic-B-spline-smooth
displacement (control points ``control_point_spacing_mm`` apart, each moved by N(0,
``displacement_mm``) along each axis), then ``A`` an affine about the grid centre (rotations,
scales, shears and shifts drawn uniformly within the configured bounds), the same family as the
development pairs in ``../shared/data``.  Both images then get an independent random gamma and
contrast change and Gaussian noise.  All randomness comes from one ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch

from ..geometry import Grid, rotation_matrix, sample
from ..nets import cubic_bspline
from ..preprocess import gaussian_smooth
from ..transforms import AffineTransform, Composite, DisplacementField, grid_points
from .augment import bias_field, thick_slices, uniform
from .config import SyntheticSpec


def _uniform(generator: torch.Generator, bound: float, n: int = 3) -> torch.Tensor:
    return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def random_affine(spec: SyntheticSpec, grid: Grid, generator: torch.Generator) -> AffineTransform:
    """A random affine about the centre of ``grid`` (LPS mm), within ``spec``'s bounds."""
    angles = _uniform(generator, math.radians(spec.rotation_deg))
    scale = 1 + _uniform(generator, spec.scale)
    shear = _uniform(generator, spec.shear)
    # Rx(a_x) @ Ry(-a_y) @ Rz(a_z): the drawn y angle turns the other way (a rotation range is symmetric)
    rot = rotation_matrix((angles * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))[None], order="xyz")[0]
    upper = torch.eye(3, dtype=torch.float64)
    upper[0, 1], upper[0, 2], upper[1, 2] = shear
    matrix = rot @ upper @ torch.diag(scale)
    centre = torch.as_tensor(grid.centre(), dtype=torch.float64)
    shift = _uniform(generator, spec.translation_mm)
    offset = centre + shift - matrix @ centre
    return AffineTransform(matrix.float()[None], offset.float()[None])


def random_smooth_field(spec: SyntheticSpec, grid: Grid, generator: torch.Generator) -> DisplacementField:
    """A cubic-B-spline-smooth random displacement on ``grid`` (axis-aligned), ``[1, 3, D, H, W]`` LPS mm."""
    extent = [n * s for n, s in zip(grid.size, grid.spacing)]  # x, y, z (mm)
    cells = [max(1, math.ceil(e / spec.control_point_spacing_mm)) for e in extent]
    lattice = torch.randn((1, 3, cells[2] + 3, cells[1] + 3, cells[0] + 3), generator=generator) * spec.displacement_mm
    # evaluate the cubic B-spline at every voxel: separable weights along each axis
    field = lattice
    for dim, axis in ((4, 0), (3, 1), (2, 2)):
        n = grid.size[axis]
        t = (torch.arange(n, dtype=torch.float32) + 0.5) / n * cells[axis]  # lattice coordinate of each voxel centre
        base = t.floor().clamp(max=cells[axis] - 1)
        frac = t - base
        weights = torch.zeros(n, cells[axis] + 3)
        for k in range(4):
            weights[torch.arange(n), (base + k).long()] = cubic_bspline(frac + 1 - k)
        field = torch.movedim(torch.movedim(field, dim, -1) @ weights.T, -1, dim)
    return DisplacementField(field.contiguous(), grid)


def random_transform(spec: SyntheticSpec, grid: Grid, generator: torch.Generator) -> Composite:
    """``T = A o B`` (fixed -> moving, LPS mm) for a fixed image on ``grid``."""
    smooth = random_smooth_field(spec, grid, generator)
    affine = random_affine(spec, grid, generator)
    return Composite([affine, smooth])


def augment_intensity(image: torch.Tensor, spec: SyntheticSpec, generator: torch.Generator,
                      spacing_mm: float = 1.0) -> torch.Tensor:
    """A random scanner-like variation of an image in [0, 1] on a grid of ``spacing_mm`` (a new tensor, clipped to [0, 1]).

    In this order, each only when its setting is above 0: blur, bias field, gamma and contrast,
    thick-slice partial volume, Gaussian noise (see :class:`~dlir.training.config.SyntheticSpec`).
    """
    if spec.blur_mm > 0:
        image = gaussian_smooth(image, [uniform(generator, 0.0, spec.blur_mm) / spacing_mm] * 3)
    if spec.bias > 0:
        image = bias_field(image, spec.bias, generator)
    if spec.intensity > 0:
        gamma = math.exp(float(_uniform(generator, spec.intensity, 1)))
        contrast = 1 + float(_uniform(generator, spec.intensity, 1))
        image = (image.clamp(min=0) ** gamma - 0.5) * contrast + 0.5
    if spec.thick_slice_probability > 0 and float(torch.rand(1, generator=generator)) < spec.thick_slice_probability:
        image = thick_slices(image, generator, int(spec.thick_slice_max))
    if spec.noise > 0:
        image = image + torch.randn(image.shape, generator=generator) * spec.noise
    return image.clamp(0, 1)


def synthetic_pair(
    image: torch.Tensor, grid: Grid, spec: SyntheticSpec, generator: torch.Generator, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, Composite, torch.Tensor | None]:
    """(fixed, moving, T, fixed labels) from ``image`` ``[1, 1, D, H, W]`` in [0, 1] on the axis-aligned ``grid``.

    ``fixed(x) = image(T(x))`` (trilinear, 0 outside), ``moving = image``, both augmented;
    ``labels`` (moving's label map, same grid) are carried to the fixed image by nearest neighbour.
    """
    transform = random_transform(spec, grid, generator)
    points = transform(grid_points(grid, 1, image.device))
    fixed = sample(image, grid, points)
    fixed_labels = None if labels is None else sample(labels, grid, points, mode="nearest")
    spacing = min(grid.spacing)
    return (augment_intensity(fixed, spec, generator, spacing), augment_intensity(image, spec, generator, spacing), transform,
            fixed_labels)

