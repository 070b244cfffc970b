"""Synthetic-shape training pairs: random label maps, random images drawn from them, and a random
deformation between two independent draws (the idea of SynthMorph, Hoffmann et al., IEEE TMI 2022:
a network trained on such pairs alone learns registration, not one anatomy or one contrast).

A label map is the argmax over ``n`` smooth random noise volumes (``n`` drawn per map in
``[labels_min, labels_max]``, the noise smoothed at a blob size drawn per map in ``[blob_mm_min,
blob_mm_max]`` mm).  An image of a label map gives each label a random mean and spread, then a
Gaussian blur, a smooth multiplicative bias field, a random gamma, Gaussian noise and, with some
probability, thick-slice partial volume along a random axis; intensities end in [0, 1].  A pair is
one label map seen twice: ``moving`` = one image of it, ``fixed(x)`` = another, independent image
of it sampled at ``T(x)`` (with probability ``same_contrast`` the two images share the labels' means and
spreads, and differ in blur, bias, gamma, noise and slices only), with ``T`` (fixed point -> moving point, LPS mm) a random smooth
deformation and affine (:func:`dlir.training.synthetic.random_transform`), so the fixed labels are
the moving labels carried by ``T``.  A pair of two draws (two subjects of one random anatomy, the
trainer's share ``two_draws``) takes the fixed image from a second label map whose noise shares all
but ``two_draws_difference`` of its variance with the first's (:func:`two_label_maps`): the fixed
labels are the second map carried by ``T``, and no transform matches the two maps exactly.  The grid is axis-aligned and isotropic (``size`` voxels of
``spacing_mm`` per side, centred on the origin).  All randomness comes from one ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch

from ..geometry import Grid, sample
from ..preprocess import gaussian_smooth
from ..transforms import Composite, grid_points
from .augment import bias_field, smooth_noise, thick_slices, uniform
from .config import ShapeSpec, SyntheticSpec
from .synthetic import random_transform


def shape_grid(spec: ShapeSpec) -> Grid:
    """The isotropic, axis-aligned grid of the shapes, centred on the origin (LPS mm)."""
    half = (spec.size - 1) * spec.spacing_mm / 2
    return Grid((spec.size,) * 3, (spec.spacing_mm,) * 3, (-half,) * 3, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def _label_noise(spec: ShapeSpec, generator: torch.Generator, n_labels: int | None) -> tuple[torch.Tensor, int]:
    """(smooth noise ``[1, n, D, H, W]``, lattice cells across): ``n`` labels and a blob size drawn from ``spec``."""
    n = n_labels if n_labels is not None else int(torch.randint(spec.labels_min, spec.labels_max + 1, (1,), generator=generator))
    blob = uniform(generator, spec.blob_mm_min, spec.blob_mm_max)
    cells = max(2, math.ceil(spec.size * spec.spacing_mm / blob) + 1)
    return smooth_noise(n, (spec.size,) * 3, cells, generator), cells


def _labels_of(noise: torch.Tensor) -> torch.Tensor:
    """The label map (int64, labels 1..n) of ``n`` noise channels: the argmax."""
    return (noise.argmax(dim=1, keepdim=True) + 1).long()


def label_map(spec: ShapeSpec, generator: torch.Generator, n_labels: int | None = None) -> torch.Tensor:
    """A random label map ``[1, 1, D, H, W]`` (int64, labels 1..n) on :func:`shape_grid`."""
    return _labels_of(_label_noise(spec, generator, n_labels)[0])


def two_label_maps(spec: ShapeSpec, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random label maps of one random anatomy (two subjects), like :func:`label_map`'s and on its grid.

    Both have the same labels and blob size; the second's noise is ``sqrt(1 - d) a + sqrt(d) b`` for the first's
    noise ``a``, an independent draw ``b`` and ``d = spec.two_draws_difference`` (the share of its variance drawn
    anew), so each label lies roughly where it lies in the first map (``d`` = 0: the same map; 1: unrelated maps).
    """
    first, cells = _label_noise(spec, generator, None)
    other = smooth_noise(first.shape[1], (spec.size,) * 3, cells, generator)
    d = spec.two_draws_difference
    return _labels_of(first), _labels_of(math.sqrt(1 - d) * first + math.sqrt(d) * other)


def draw_contrast(n: int, spec: ShapeSpec, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(means, spreads) of labels ``0..n``: a random contrast, means in [0, 1], spreads in [0, ``spec.spread``]."""
    return torch.rand(n + 1, generator=generator), torch.rand(n + 1, generator=generator) * spec.spread


def draw_image(labels: torch.Tensor, spec: ShapeSpec, generator: torch.Generator,
               contrast: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """A random image ``[1, 1, D, H, W]`` in [0, 1] of a label map (see the module docstring); ``contrast``
    (:func:`draw_contrast`) fixes the labels' means and spreads instead of drawing them."""
    n = int(labels.max())
    means, spreads = contrast if contrast is not None else draw_contrast(n, spec, generator)
    index = labels[0, 0]
    image = means[index] + spreads[index] * torch.randn(index.shape, generator=generator)
    image = gaussian_smooth(image[None, None], [uniform(generator, 0.0, spec.blur_mm) / spec.spacing_mm] * 3)
    if spec.bias > 0:
        image = bias_field(image, spec.bias, generator)
    low, high = image.amin(), image.amax()
    image = (image - low) / (high - low).clamp(min=1e-6)
    if spec.gamma > 0:
        image = image ** math.exp(uniform(generator, -spec.gamma, spec.gamma))
    if float(torch.rand(1, generator=generator)) < spec.thick_slice_probability:
        image = thick_slices(image, generator, spec.thick_slice_max)
    if spec.noise > 0:
        image = image + torch.randn(image.shape, generator=generator) * uniform(generator, 0.0, spec.noise)
    return image.clamp(0, 1)


def shape_pair(
    spec: ShapeSpec, deformation: SyntheticSpec, generator: torch.Generator, two_draws: bool = False
) -> tuple[torch.Tensor, torch.Tensor, Composite, torch.Tensor, torch.Tensor, Grid]:
    """(fixed, moving, T, fixed labels, moving labels, grid): two independent images of one random label map under ``T``,
    or with ``two_draws`` of two label maps of one anatomy (:func:`two_label_maps`: the fixed one's under ``T``).

    Images ``[1, 1, D, H, W]`` in [0, 1]; labels int64 of the same shape; ``T`` maps fixed points to
    moving points (LPS mm) and is drawn from ``deformation`` (smooth field and affine ranges).
    """
    grid = shape_grid(spec)
    moving_labels, other_labels = two_label_maps(spec, generator) if two_draws else (label_map(spec, generator),) * 2
    transform = random_transform(deformation, grid, generator)
    points = transform(grid_points(grid, 1))
    fixed_labels = sample(other_labels.float(), grid, points, mode="nearest").long()
    shared = None
    if spec.same_contrast > 0 and float(torch.rand(1, generator=generator)) < spec.same_contrast:
        shared = draw_contrast(int(max(moving_labels.max(), other_labels.max())), spec, generator)
    moving = draw_image(moving_labels, spec, generator, shared)
    fixed = sample(draw_image(other_labels, spec, generator, shared), grid, points)
    return fixed, moving, transform, fixed_labels, moving_labels, grid
