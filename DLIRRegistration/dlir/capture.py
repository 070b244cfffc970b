"""Capture: the global affine alignment of two images from any starting position (two subjects, different fields
of view, origins hundreds of mm apart).

The search runs on a coarse pyramid of the normalised images (``levels_mm``, 8 then 4 mm by default), on their
own axis-aligned LPS grids, inside a foreground (body) mask of the fixed image found automatically, so that air,
the table and a field of view that reaches further in one image than in the other do not drive it:

1. Starts (fixed point -> moving point, LPS mm): the header (identity), the grids' centres, the foregrounds'
   centres of mass, their principal axes, and, along every axis where the two foregrounds' extents differ (a
   partial field of view), the foregrounds' lower or upper ends put on each other.
2. Every start is scored by the masked NCC on the coarsest level; the best ``keep`` are optimised there
   (translation, rotation and scale: a similarity transform with one scale per axis), the best of them on
   the finer levels (all 12 affine parameters); the transform with the highest NCC wins.

The similarity is global NCC (or, for images of different contrasts, MIND-SSC descriptors compared by their mean
squared difference: :mod:`dlir.modality`) over a fixed random subset of the fixed foreground's voxels that land inside the
moving image (elastix's rule: a shorter scan does not count against the true alignment), scaled down in proportion
when fewer than :data:`FULL_OVERLAP` of them do (so that sliding the anatomy out of the moving image never pays).
Everything is a few hundred steps on a few thousand points: about half a second on a CPU core.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Grid, rotation_matrix, sample
from .modality import compare, features
from .transforms import AffineTransform, grid_points


#: the similarity counts in full when at least this share of the fixed foreground lands inside the moving image,
#: and is scaled down in proportion below it (so that sliding the anatomy out of the moving image never pays)
FULL_OVERLAP = 0.5
#: the searched transform must beat the plain starts' similarity by this much on the finest level to be kept
CLEAR_GAIN = 0.005
#: an image with fewer coarse voxels than this along an axis of the coarsest level is not searched
MIN_COARSE_VOXELS = 4


@dataclass(frozen=True)
class CaptureSettings:
    """The search's pyramid (mm, coarse to fine), steps per level and Adam step sizes."""

    levels_mm: tuple[float, ...] = (8.0, 4.0)
    steps: tuple[int, ...] = (60, 40)
    samples: int = 5_000  # foreground voxels of the fixed image per level (a fixed random subset)
    descriptor_samples: int = 2_500  # ... comparing MIND-SSC descriptors (smooth: half suffice, same Dice, a third less time)
    keep: int = 3  # starts optimised on the coarsest level
    translation_step_mm: float = 2.0  # Adam step of the translation on the 8 mm level (mm; in proportion on others)
    angle_step: float = 0.02  # radians
    scale_step: float = 0.01  # log scale
    shear_step: float = 0.005
    decay: float = 0.97  # the step sizes shrink by this factor per step
    max_scale: float = 1.6  # the scale of any axis stays within [1 / max_scale, max_scale]


@dataclass
class CoarseImage:
    """A normalised image ``[1, 1, D, H, W]`` on an axis-aligned isotropic ``grid`` with its foreground mask (same
    shape) and what the search compares of it: ``features`` ``[1, C, D, H, W]`` of the similarity ``kind``
    (:func:`dlir.modality.features`; the image itself for ``ncc``)."""

    image: torch.Tensor
    grid: Grid
    mask: torch.Tensor
    kind: str = "ncc"
    features: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.features = features(self.kind, self.image, self.grid.spacing[0])


@dataclass
class Capture:
    """The captured alignment (fixed -> moving, LPS mm) and the search's record."""

    transform: AffineTransform
    similarity: float  # the masked similarity at the finest level (NCC or MIND-SSC, as searched)
    start: str  # the start it came from
    scores: dict[str, float] = field(default_factory=dict)  # every start's NCC before optimisation (coarsest level)


def foreground(image: torch.Tensor) -> torch.Tensor:
    """The foreground (body) mask ``[1, 1, D, H, W]`` (bool) of a coarse normalised image.

    Intensities above half of Otsu's threshold, closed by one voxel, holes filled in every axial (k) slice (the
    lungs, the ventricles), then dilated by one voxel so that the outline itself, where the edges are, is in.
    The whole grid when that leaves nothing (an image of a few bright voxels).
    """
    values = image.flatten()
    threshold = 0.5 * _otsu(values)
    mask = image > threshold
    mask = _erode(_dilate(mask))
    mask = _dilate(_fill_slices(mask))
    return mask if bool(mask.any()) else torch.ones_like(mask)


def _otsu(values: torch.Tensor, bins: int = 64) -> float:
    """Otsu's threshold of intensities in [0, 1]."""
    hist = torch.histc(values.float(), bins=bins, min=0.0, max=1.0).double()
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    weight = hist.cumsum(0)
    total = weight[-1]
    mean = (hist * centres).cumsum(0)
    between = (mean[-1] * weight / total - mean) ** 2 / (weight * (total - weight)).clamp(min=1e-12)
    return float(centres[int(torch.argmax(between[:-1]))])


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    return F.max_pool3d(mask.float(), 3, stride=1, padding=1) > 0


def _erode(mask: torch.Tensor) -> torch.Tensor:
    return ~_dilate(~mask)


def _fill_slices(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` with the holes of every k slice filled: background not reachable from the slice's border."""
    background = ~mask[0, 0]  # [D, H, W]
    outside = torch.zeros_like(background)
    outside[:, 0, :] = background[:, 0, :]
    outside[:, -1, :] = background[:, -1, :]
    outside[:, :, 0] = background[:, :, 0]
    outside[:, :, -1] = background[:, :, -1]
    while True:
        grown = F.max_pool2d(outside.float()[:, None], 3, stride=1, padding=1)[:, 0] > 0
        grown &= background
        if torch.equal(grown, outside):
            break
        outside = grown
    return (~outside)[None, None]


def _masked_moments(image: CoarseImage) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(centre of mass, covariance, lower corner, upper corner) of the foreground, LPS mm, weighted by intensity."""
    points = grid_points(image.grid)[0][image.mask[0, 0]].double()  # [n, 3]
    weights = image.image[0, 0][image.mask[0, 0]].double().clamp(min=0) + 1e-6
    centre = (weights[:, None] * points).sum(0) / weights.sum()
    centred = points - centre
    covariance = (weights[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0) / weights.sum()
    return centre.numpy(), covariance.numpy(), points.min(0).values.numpy(), points.max(0).values.numpy()


#: principal axes whose variances differ by less than this share are taken as undetermined (a near-spherical
#: distribution): the principal-axes rotation is then the identity
AXES_DEGENERATE_BELOW = 0.05


def principal_rotation(fixed_covariance: np.ndarray, moving_covariance: np.ndarray) -> np.ndarray:
    """The rotation (fixed -> moving, 3 x 3) that maps each fixed principal axis (eigenvectors of a covariance in
    mm^2, largest variance first) onto the moving one of the same rank.

    Of the axis sign choices that make it a rotation, the one closest to the identity (largest trace), so that
    images already nearly aligned stay so.  The identity when two variances of either image are within
    :data:`AXES_DEGENERATE_BELOW` of each other (the axes are undetermined).
    """
    values_f, axes_f = np.linalg.eigh(fixed_covariance)
    values_m, axes_m = np.linalg.eigh(moving_covariance)
    rotation = np.eye(3)
    if not (_distinct(values_f) and _distinct(values_m)):
        return rotation
    best = -np.inf
    for signs in itertools.product((1, -1), repeat=3):
        candidate = axes_m @ np.diag(signs) @ axes_f.T
        if np.linalg.det(candidate) > 0 and np.trace(candidate) > best:
            best, rotation = float(np.trace(candidate)), candidate
    return rotation


def _distinct(variances: np.ndarray) -> bool:
    """True when the three (ascending) variances differ pairwise by at least AXES_DEGENERATE_BELOW of the larger."""
    v = np.sort(np.abs(variances))
    return bool(v[0] > 0 and all(v[i + 1] - v[i] >= AXES_DEGENERATE_BELOW * v[i + 1] for i in range(2)))


def starts(fixed: CoarseImage, moving: CoarseImage, fixed_grid: Grid, moving_grid: Grid) -> dict[str, np.ndarray]:
    """The named starting transforms (4 x 4 homogeneous matrices, fixed -> moving, LPS mm).

    ``fixed_grid`` / ``moving_grid``: the images' own grids (for the grids' centres).
    """
    cf, covf, lof, hif = _masked_moments(fixed)
    cm, covm, lom, him = _masked_moments(moving)
    out: dict[str, np.ndarray] = {}

    def translation(shift: np.ndarray) -> np.ndarray:
        m = np.eye(4)
        m[:3, 3] = shift
        return m

    out["header"] = np.eye(4)
    out["centres of the grids"] = translation(moving_grid.centre() - fixed_grid.centre())
    out["centres of mass"] = translation(cm - cf)
    rotation = principal_rotation(covf, covm)
    axes = np.eye(4)
    axes[:3, :3] = rotation
    axes[:3, 3] = cm - rotation @ cf
    out["principal axes"] = axes
    extent_f, extent_m = hif - lof, him - lom
    choices = []
    for axis in range(3):
        options = [("centre", (cm - cf)[axis])]
        if abs(extent_f[axis] - extent_m[axis]) > 0.15 * max(extent_f[axis], extent_m[axis]):
            options += [("lower ends", lom[axis] - lof[axis]), ("upper ends", him[axis] - hif[axis])]
        choices.append(options)
    for combination in itertools.product(*choices):
        if all(name == "centre" for name, _ in combination):
            continue
        name = ", ".join(f"{'xyz'[a]}: {n}" for a, (n, _) in enumerate(combination))
        out[f"foreground {name}"] = translation(np.array([shift for _, shift in combination]))
    return out


class _Parameters:
    """``T(x) = S(c + M (x - c) + t)``: a correction about the fixed foreground's centre ``c`` applied before the
    start ``S``; ``M = R(angles) (I + shear) diag(exp(log_scale))``, ``t`` in mm."""

    def __init__(self, start: np.ndarray, centre: np.ndarray) -> None:
        self.start = torch.as_tensor(start, dtype=torch.float32)
        self.centre = torch.as_tensor(centre, dtype=torch.float32)
        self.translation = torch.zeros(3, requires_grad=True)
        self.angles = torch.zeros(3, requires_grad=True)
        self.log_scale = torch.zeros(3, requires_grad=True)
        self.shear = torch.zeros(3, requires_grad=True)

    def matrix(self, max_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, b) of ``T(x) = A x + b``."""
        limit = float(np.log(max_scale))
        scale = torch.exp(limit * torch.tanh(self.log_scale / limit))
        one, zero = torch.ones(()), torch.zeros(())
        s = self.shear
        shear = torch.stack([one, s[0], s[1], zero, one, s[2], zero, zero, one]).reshape(3, 3)
        m = rotation_matrix(self.angles[None])[0] @ shear @ torch.diag(scale)
        correction_offset = self.centre + self.translation - m @ self.centre
        a, b = self.start[:3, :3], self.start[:3, 3]
        return a @ m, a @ correction_offset + b


def _similarity(fixed: CoarseImage, points: torch.Tensor, moving: CoarseImage, matrix: torch.Tensor,
                offset: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Masked similarity (the images' ``kind``) of the fixed foreground ``values`` ``[C, n]`` at ``points`` ``[n, 3]``
    and the moving image's features at their images."""
    moved = (points @ matrix.T + offset).reshape(1, -1, 1, 1, 3)
    warped = sample(moving.features, moving.grid, moved, outside=None).reshape(1, values.shape[0], -1)
    with torch.no_grad():
        inside = moving.grid.contains(moved).float().reshape(1, 1, -1)
    similarity = compare(fixed.kind, values[None], warped, inside)[0]
    return similarity * inside.mean().clamp(max=FULL_OVERLAP) / FULL_OVERLAP


def _foreground_samples(image: CoarseImage, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(LPS points ``[n, 3]``, features ``[C, n]``) of at most ``count`` foreground voxels (a fixed random subset)."""
    points = grid_points(image.grid)[0][image.mask[0, 0]]
    values = image.features[0][:, image.mask[0, 0]]
    if points.shape[0] > count:
        pick = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(0))[:count]
        points, values = points[pick], values[:, pick]
    return points, values


def _optimise(parameters: _Parameters, fixed: CoarseImage, samples: tuple[torch.Tensor, torch.Tensor], moving: CoarseImage,
              steps: int, affine: bool, settings: CaptureSettings) -> float:
    """Adam on the masked similarity at the fixed ``samples`` (:func:`_foreground_samples`) for ``steps`` steps (all 12
    parameters with ``affine``, else no shear); the final NCC.

    A plain Adam (``torch.optim`` would import PyTorch's compiler, seconds of start-up, for a few hundred steps)."""
    points, values = samples
    groups = [(parameters.translation, settings.translation_step_mm * fixed.grid.spacing[0] / 8.0),
              (parameters.angles, settings.angle_step), (parameters.log_scale, settings.scale_step)]
    if affine:
        groups.append((parameters.shear, settings.shear_step))
    moments = [(torch.zeros(3), torch.zeros(3)) for _ in groups]
    beta1, beta2 = 0.9, 0.999
    for step in range(1, steps + 1):
        loss = -_similarity(fixed, points, moving, *parameters.matrix(settings.max_scale), values)
        grads = torch.autograd.grad(loss, [tensor for tensor, _ in groups])
        with torch.no_grad():
            for (tensor, rate), grad, (m, v) in zip(groups, grads, moments):
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                size = rate * settings.decay ** (step - 1) * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
                tensor.sub_(size * m / (v.sqrt() + 1e-8))
    with torch.no_grad():
        return float(_similarity(fixed, points, moving, *parameters.matrix(settings.max_scale), values))


def capture(pyramid: list[tuple[CoarseImage, CoarseImage]], fixed_grid: Grid, moving_grid: Grid,
            settings: CaptureSettings = CaptureSettings()) -> Capture:
    """The captured affine alignment (fixed -> moving, LPS mm) of the images of ``pyramid`` (per level of
    ``settings.levels_mm``, coarse to fine: (fixed, moving) coarse images with their foregrounds).

    ``fixed_grid`` / ``moving_grid``: the images' own grids.  The similarity is the coarse images' ``kind``.  The
    optimised transform is kept only when it beats
    the plain starts (the header, the grids' centres) on the finest level by :data:`CLEAR_GAIN`: the search never
    makes an aligned pair, or images too unlike to compare, worse than the simple alignments.  Images thinner than
    :data:`MIN_COARSE_VOXELS` voxels along an axis of the coarsest level are not searched (the grids' centres).
    Runs on the CPU, in float32.
    """
    named = starts(pyramid[0][0], pyramid[0][1], fixed_grid, moving_grid)
    if min(min(image.grid.size) for image in pyramid[0]) < MIN_COARSE_VOXELS:
        start = named["centres of the grids"]
        return Capture(_affine(torch.as_tensor(start[:3, :3]), torch.as_tensor(start[:3, 3])), math.nan,
                       "centres of the grids (an image too thin to search)")
    with torch.enable_grad():
        count = settings.samples if pyramid[0][0].kind == "ncc" else settings.descriptor_samples
        samples = [_foreground_samples(fixed, count) for fixed, _ in pyramid]
        coarse_fixed, coarse_moving = pyramid[0]
        centre = _masked_moments(coarse_fixed)[0]
        scores = {name: _score(start, coarse_fixed, samples[0], coarse_moving) for name, start in named.items()}
        ranked = sorted(scores, key=scores.__getitem__, reverse=True)[: settings.keep]
        candidates = []
        for name in ranked:
            parameters = _Parameters(named[name], centre)
            score = _optimise(parameters, coarse_fixed, samples[0], coarse_moving, settings.steps[0], False, settings)
            candidates.append((score, name, parameters))
        score, name, best = max(candidates, key=lambda c: c[0])
        for (fixed, moving), level_samples, steps in zip(pyramid[1:], samples[1:], settings.steps[1:]):
            score = _optimise(best, fixed, level_samples, moving, steps, True, settings)
        with torch.no_grad():
            matrix, offset = best.matrix(settings.max_scale)
    finest_fixed, finest_moving = pyramid[-1]
    for plain in ("header", "centres of the grids"):
        plain_score = _score(named[plain], finest_fixed, samples[-1], finest_moving)
        if not score > plain_score + CLEAR_GAIN:
            start = named[plain]
            matrix, offset, score, name = torch.as_tensor(start[:3, :3]), torch.as_tensor(start[:3, 3]), plain_score, plain
    return Capture(_affine(matrix, offset), score, name, scores)


def _score(start: np.ndarray, fixed: CoarseImage, samples: tuple[torch.Tensor, torch.Tensor], moving: CoarseImage) -> float:
    """The similarity of a start (4 x 4, fixed -> moving) at the fixed ``samples`` of one level, unoptimised."""
    points, values = samples
    m = torch.as_tensor(start, dtype=torch.float32)
    with torch.no_grad():
        return float(_similarity(fixed, points, moving, m[:3, :3], m[:3, 3], values))


def _affine(matrix: torch.Tensor, offset: torch.Tensor) -> AffineTransform:
    return AffineTransform(matrix.detach().float()[None], offset.detach().float()[None])
