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
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .geometry import Grid, rotation_matrix
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
    to_index: torch.Tensor = field(init=False)  # [3, 4]: LPS point (mm) -> continuous index (i, j, k)
    size: torch.Tensor = field(init=False)  # [3]: voxels along i, j, k

    def __post_init__(self) -> None:
        self.features = features(self.kind, self.image, self.grid.spacing[0])
        self.to_index = torch.as_tensor(self.grid.physical_to_index()[:3], dtype=torch.float32)
        self.size = torch.as_tensor(self.grid.size, dtype=torch.float32)


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
    """``mask`` with the holes of every k slice filled: background not 8-connected, within its slice, to the slice's
    border.  One labelling of the background's connected components (SimpleITK) with the slices kept apart by empty
    slices between them, so that no component reaches across slices."""
    background = ~mask[0, 0].cpu().numpy()  # [D, H, W]
    spaced = np.zeros((2 * background.shape[0] - 1, *background.shape[1:]), dtype=np.uint8)
    spaced[::2] = background
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(spaced), True))[::2]
    edges = np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    outside = np.isin(labels, np.unique(edges[edges > 0]))
    return torch.from_numpy(~outside).to(mask.device)[None, None]


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
    """``K`` searched transforms ``T_k(x) = S_k(c + M_k (x - c) + t_k)``: a correction about the fixed foreground's
    centre ``c`` applied before the start ``S_k``; ``M = R(angles) (I + shear) diag(exp(log_scale))``, ``t`` in mm.

    The starts are searched side by side (one sampling pass for all of them per step): each has its own parameters,
    and the sum of their losses gives each one its own gradient."""

    def __init__(self, starts: np.ndarray, centre: np.ndarray) -> None:
        self.start = torch.as_tensor(starts, dtype=torch.float32).reshape(-1, 4, 4)
        self.centre = torch.as_tensor(centre, dtype=torch.float32)
        count = self.start.shape[0]
        self.translation = torch.zeros(count, 3, requires_grad=True)
        self.angles = torch.zeros(count, 3, requires_grad=True)
        self.log_scale = torch.zeros(count, 3, requires_grad=True)
        self.shear = torch.zeros(count, 3, requires_grad=True)

    def select(self, index: int) -> "_Parameters":
        """The ``index``-th transform alone (its parameters copied; a fresh search state)."""
        one = _Parameters(self.start[index].numpy(), self.centre.numpy())
        with torch.no_grad():
            for name in ("translation", "angles", "log_scale", "shear"):
                getattr(one, name).copy_(getattr(self, name)[index:index + 1])
        return one

    def matrix(self, max_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(A ``[K, 3, 3]``, b ``[K, 3]``) of ``T_k(x) = A_k x + b_k``."""
        limit = float(np.log(max_scale))
        scale = torch.exp(limit * torch.tanh(self.log_scale / limit))
        one, zero = torch.ones_like(self.shear[:, 0]), torch.zeros_like(self.shear[:, 0])
        s0, s1, s2 = self.shear.unbind(1)
        shear = torch.stack([one, s0, s1, zero, one, s2, zero, zero, one], 1).reshape(-1, 3, 3)
        m = rotation_matrix(self.angles) @ shear * scale[:, None, :]  # R (I + shear) diag(scale)
        correction_offset = self.centre + self.translation - m @ self.centre
        a, b = self.start[:, :3, :3], self.start[:, :3, 3]
        return a @ m, (a @ correction_offset[:, :, None])[:, :, 0] + b


def _similarity(fixed: CoarseImage, points: torch.Tensor, moving: CoarseImage, matrix: torch.Tensor,
                offset: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Masked similarity ``[K]`` (the images' ``kind``) of the fixed foreground ``values`` ``[C, n]`` at ``points``
    ``[n, 3]`` and the moving image's features at their images under each of ``K`` affine maps (``matrix`` ``[K, 3, 3]``,
    ``offset`` ``[K, 3]``), sampled in one pass."""
    count, channels, n = matrix.shape[0], values.shape[0], points.shape[0]
    rotation, shift = moving.to_index[:, :3], moving.to_index[:, 3]
    index = torch.einsum("kij,nj->kni", rotation @ matrix, points) + (offset @ rotation.T + shift)[:, None, :]  # [K, n, 3]
    with torch.no_grad():  # inside the moving image: continuous index in [-0.5, size - 0.5] (as dlir.geometry.sample)
        inside = ((index >= -0.5) & (index <= moving.size - 0.5)).all(-1).float()[:, None, :]  # [K, 1, n]
    coordinates = index * (2.0 / (moving.size - 1).clamp(min=1)) - 1.0  # grid_sample's (align_corners)
    warped = F.grid_sample(moving.features, coordinates.reshape(1, -1, 1, 1, 3), mode="bilinear", padding_mode="border",
                           align_corners=True)  # border values extended beyond the buffer
    warped = warped.reshape(channels, count, n).transpose(0, 1)  # [K, C, n]
    similarity = compare(fixed.kind, values[None].expand(count, -1, -1), warped, inside)
    return similarity * inside.mean((1, 2)).clamp(max=FULL_OVERLAP) / FULL_OVERLAP


def _foreground_samples(image: CoarseImage, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(LPS points ``[n, 3]``, features ``[C, n]``) of at most ``count`` foreground voxels (a fixed random subset)."""
    points = grid_points(image.grid)[0][image.mask[0, 0]]
    values = image.features[0][:, image.mask[0, 0]]
    if points.shape[0] > count:
        pick = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(0))[:count]
        points, values = points[pick], values[:, pick]
    return points, values


def _optimise(parameters: _Parameters, fixed: CoarseImage, samples: tuple[torch.Tensor, torch.Tensor], moving: CoarseImage,
              steps: int, affine: bool, settings: CaptureSettings) -> torch.Tensor:
    """Adam on the masked similarity at the fixed ``samples`` (:func:`_foreground_samples`) for ``steps`` steps, every
    searched transform at once (all 12 parameters with ``affine``, else no shear); the final similarities ``[K]``.

    A plain Adam (``torch.optim`` would import PyTorch's compiler, seconds of start-up, for a few hundred steps)."""
    points, values = samples
    groups = [(parameters.translation, settings.translation_step_mm * fixed.grid.spacing[0] / 8.0),
              (parameters.angles, settings.angle_step), (parameters.log_scale, settings.scale_step)]
    if affine:
        groups.append((parameters.shear, settings.shear_step))
    moments = [(torch.zeros_like(tensor), torch.zeros_like(tensor)) for tensor, _ in groups]
    beta1, beta2 = 0.9, 0.999
    for step in range(1, steps + 1):
        loss = -_similarity(fixed, points, moving, *parameters.matrix(settings.max_scale), values).sum()
        grads = torch.autograd.grad(loss, [tensor for tensor, _ in groups])
        with torch.no_grad():
            for (tensor, rate), grad, (m, v) in zip(groups, grads, moments):
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                size = rate * settings.decay ** (step - 1) * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
                tensor.sub_(size * m / (v.sqrt() + 1e-8))
    with torch.no_grad():
        return _similarity(fixed, points, moving, *parameters.matrix(settings.max_scale), values)


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
        names = list(named)
        scores = dict(zip(names, _scores([named[n] for n in names], coarse_fixed, samples[0], coarse_moving)))
        ranked = sorted(scores, key=scores.__getitem__, reverse=True)[: settings.keep]
        searched = _Parameters(np.stack([named[name] for name in ranked]), centre)
        optimised = _optimise(searched, coarse_fixed, samples[0], coarse_moving, settings.steps[0], False, settings)
        index = int(torch.argmax(optimised))
        score, name, best = float(optimised[index]), ranked[index], searched.select(index)
        for (fixed, moving), level_samples, steps in zip(pyramid[1:], samples[1:], settings.steps[1:]):
            score = float(_optimise(best, fixed, level_samples, moving, steps, True, settings)[0])
        with torch.no_grad():
            matrix, offset = (value[0] for value in best.matrix(settings.max_scale))
    finest_fixed, finest_moving = pyramid[-1]
    plain_names = ("header", "centres of the grids")
    for plain, plain_score in zip(plain_names, _scores([named[n] for n in plain_names], finest_fixed, samples[-1], finest_moving)):
        if not score > plain_score + CLEAR_GAIN:
            start = named[plain]
            matrix, offset, score, name = torch.as_tensor(start[:3, :3]), torch.as_tensor(start[:3, 3]), plain_score, plain
    return Capture(_affine(matrix, offset), score, name, scores)


def _scores(starts: list[np.ndarray], fixed: CoarseImage, samples: tuple[torch.Tensor, torch.Tensor],
            moving: CoarseImage) -> list[float]:
    """The similarities of ``starts`` (4 x 4 each, fixed -> moving) at the fixed ``samples`` of one level, unoptimised."""
    points, values = samples
    m = torch.as_tensor(np.stack(starts), dtype=torch.float32)
    with torch.no_grad():
        return [float(v) for v in _similarity(fixed, points, moving, m[:, :3, :3], m[:, :3, 3], values)]


def _affine(matrix: torch.Tensor, offset: torch.Tensor) -> AffineTransform:
    return AffineTransform(matrix.detach().float()[None], offset.detach().float()[None])
