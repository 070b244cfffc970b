"""Instance optimisation ("accurate mode"): the networks' transform refined on the pair itself,
coarse to fine, without folding.

The networks give ``T_net = P o N`` (fixed point -> moving point, LPS mm): ``P`` the leading
affine transforms (initial alignment, affine stages), ``N`` the non-linear rest (the B-spline
stages' fields).  Refinement makes it

    ``T = P o C o (x + u(x))``

``C`` an affine correction (12 parameters, starting at the identity) and ``u`` one displacement
field (LPS mm, trilinear) on a grid of ``grid_spacings_mm[-1]`` (6 mm) along the fixed image's axes
(:func:`displacement_grid`: full resolution then evaluates it separably, :mod:`dlir.separable`), starting
as ``N`` sampled on that grid, so refinement starts where the networks left off; when that
field folds (networks meeting images unlike their training data, e.g. two subjects), ``u`` starts at 0 and
refinement starts from ``P`` alone.
Levels go coarse to fine: level ``k`` adds a residual displacement on a grid of
``grid_spacings_mm[k]`` (24, 12, 6 mm) and measures the similarity on the images anti-aliased for
``level_spacings_mm[k]`` times the base spacing (the fixed image's finest spacing, at least
:attr:`RefineSettings.finest_mm`); after the level its residual is added into ``u``.

Objective (per step): ``-similarity + alpha * bending energy + fold_weight * penalty(det J)``.  The similarity is
global NCC for images of one contrast, or, for different contrasts (``similarity="mind"``), the MIND-SSC
descriptors' ``1 - MSD / MIND_SCALE`` (:mod:`dlir.modality`): descriptors of both images computed once per level on
the fixed image's isotropic grid of the level's spacing, the moving image's after the affine part of the transform
at the level's start (the descriptors are not rotation invariant), and interpolated at the points.  Either is
measured as elastix does on random fixed VOXELS (centres, where the fixed intensities are
known exactly: interpolating the fixed image between voxels biases the estimate), inside the fixed
mask when one is given; samples that land outside the moving image do not count.  Each level
draws a pool of ``pool x samples`` voxels once and the steps take them batch by batch (stochastic
gradient steps; Adam with step sizes growing over ``warmup`` steps, then shrinking by ``decay`` per step).  Bending energy (per mm^2)
and the folding penalty ``mean(relu(MIN_JACOBIAN - det J)^2)`` (:mod:`dlir.losses`) are evaluated on the level's grid
(det J w.r.t. physical coordinates at the 8 corners of every cell, from its edges, so that no fold hides between
nodes)
every ``penalty_every`` steps: no folding by penalty.

Stopping: ``"auto"`` runs every level until the mean loss of the last ``window`` steps improves on
the previous window's by less than ``tolerance`` times the level's gain so far (at least
``min_steps``, at most ``max_steps``); a level whose result is no better than its start (the mean
objective of the same batches before and after) is undone, so an aligned pair stays exactly where it is; a number N (``--refine N``, for experiments) runs exactly N
steps at the finest level only.  The same code runs on a GPU (all tensors on the images' device;
the random draws on the CPU).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from .errors import InputError
from .geometry import Grid, sample
from .losses import corner_jacobians, objective
from .modality import compare, features
from .pipeline import PreparedImage
from .preprocess import network_grid, sample_source
from .transforms import (AffineTransform, Composite, DisplacementField, SpatialTransform, covering_grid, displacement_on_grid,
                         grid_points)

#: ``"auto"`` (accurate mode: all levels, each to convergence) or a number of steps at the finest level
Refinement = int | Literal["auto"]
#: ``report(level, levels, step, limit, loss)`` after every optimiser step (progress, cancel); ``limit`` is the
#: level's most steps
Report = Callable[[int, int, int, int, float], None]
#: CPU threads of the refinement: its steps are many small operations that a second thread hardly speeds up, and
#: one thread leaves a core to whatever else runs
CPU_THREADS = 1


@dataclass(frozen=True)
class RefineSettings:
    """Accurate mode's settings (spacings in mm, steps per level coarse to fine)."""

    level_spacings_mm: tuple[float, ...] = (4.0, 2.0, 1.0)  # image pyramid, times the base spacing
    grid_spacings_mm: tuple[float, ...] = (24.0, 12.0, 6.0)  # the displacement's grid per level (the last one is exported)
    finest_mm: float = 1.5  # the base spacing is at least this (a cap on the work for sub-mm images)
    samples: tuple[int, ...] = (4096, 8192, 8192)  # random fixed points per step (16384 at the finest level: up to 0.004 Dice more on the development pairs, 20-30 % more time)
    descriptor_samples: tuple[int, ...] = (2048, 4096, 8192)  # ... comparing MIND-SSC descriptors (smooth: half suffice but at the finest level, where 4096 cost 0.005-0.012 Dice)
    pool: int = 16  # each level draws this many steps' worth of random points once; steps take them batch by batch
    max_steps: tuple[int, ...] = (100, 100, 100)
    min_steps: int = 16
    learning_rate_mm: tuple[float, ...] = (0.5, 0.3, 0.1)  # Adam step of the displacement (mm)
    decay: float = 0.98  # the step sizes shrink by this factor per step (stochastic steps settle)
    warmup: int = 10  # ... after growing linearly over this many steps (Adam's first steps are full-size in every direction)
    affine_learning_rate: float = 0.002  # Adam step of the affine correction (matrix entries; translation in mm x 100)
    alpha: float = 2.0  # bending energy weight (per mm^2): keeps det J plausible between two subjects
    fold_weight: float = 10.0
    penalty_every: int = 4  # bending and folding penalties on every this many steps (weighted up), the costly part of a step
    tolerance: float = 0.02  # stop a level when its last ``window`` steps improved the loss by less than this share of its gain
    window: int = 8  # a multiple of penalty_every, so every window holds the same mix of steps (12: 20-60 % more steps, Dice within 0.004)
    seed: int = 0


@dataclass
class RefineResult:
    """The refined transforms and what the optimisation did (for the run's summary)."""

    transforms: list[SpatialTransform]
    steps: list[int] = field(default_factory=list)  # per level
    losses: list[float] = field(default_factory=list)  # final loss per level
    seconds: list[float] = field(default_factory=list)
    level_spacings: list[float] = field(default_factory=list)
    networks_field: bool = True  # False: no network made a field, or it folded; refinement started from the affine part

    def summary(self) -> dict[str, list[float] | bool]:
        """JSON-ready: per level (coarse to fine) its spacing (mm), steps, final loss and seconds; whether it started
        from the networks' field."""
        return {"level_spacing_mm": [round(s, 3) for s in self.level_spacings], "steps": [float(n) for n in self.steps],
                "loss": [round(x, 5) for x in self.losses], "seconds": [round(t, 3) for t in self.seconds],
                "started_from_networks_field": self.networks_field}


def check_refinement(refinement: Refinement) -> None:
    """One sentence when ``refinement`` is neither ``"auto"`` nor a non-negative number of steps."""
    if refinement == "auto":
        return
    if isinstance(refinement, bool) or not isinstance(refinement, int) or refinement < 0:
        raise InputError(f"refinement must be 'auto' (accurate mode) or a number of steps >= 0, not {refinement!r}")


def base_spacing(fixed_grid: Grid, settings: RefineSettings) -> float:
    """The finest level's spacing (mm): the fixed image's finest spacing, at least ``settings.finest_mm``."""
    return max(min(fixed_grid.spacing), settings.finest_mm)


def displacement_grid(fixed_grid: Grid, spacing: float) -> Grid:
    """A grid of ``spacing`` mm (isotropic) along the fixed image's axes (its direction), whose nodes cover the fixed
    voxel centres and one node more on every side (:func:`dlir.transforms.covering_grid`)."""
    return covering_grid(fixed_grid, spacing, margin=spacing)


class _Level:
    """One pyramid level: a pool of random fixed voxels with everything about them that does not change while the
    level is optimised, and the moving image's anti-aliased copy.

    Voxels are drawn uniformly over the fixed image (any direction and spacing), or, with a mask, over the set
    voxels of a strided copy of the mask (one per level voxel, jittered by up to half a stride, rounded to a
    voxel, kept only where the mask is set); see :func:`_draw_indices`.  The pool is random, so the optimiser
    steps take it batch after batch (cyclically): a fresh random sample per step, as elastix's random sampler.
    Per pool voxel: its fixed intensity (from the copy anti-aliased for the level), its weight, its image
    through the field so far, and its trilinear corners and weights on this level's residual grid (so the
    residual is evaluated by a gather instead of a ``grid_sample``).
    """

    def __init__(self, spacing: float, fixed: PreparedImage, moving: PreparedImage, mask: np.ndarray | None,
                 field: torch.Tensor, field_grid: Grid, grid: Grid, count: int, generator: torch.Generator,
                 similarity: str = "ncc", affine: AffineTransform | None = None) -> None:
        spacings = (spacing,) * 3
        self.spacing = spacing
        self.similarity = similarity
        self.extent = moving.grid
        self.back: AffineTransform | None = None  # moving points -> the grid of the moving features (None: the same)
        index, weight = _draw_indices(fixed.grid, mask, spacing, count, generator)
        points = fixed.grid.physical_from_index(index).to(fixed.device).reshape(1, -1, 1, 1, 3)
        if similarity == "ncc":  # the intensities themselves, on the images' own (anti-aliased) grids
            self.moving, self.moving_grid = moving.source_for(spacings)
            image, image_grid = fixed.source_for(spacings)
            self.fixed = sample_source(image, image_grid, fixed.grid, points).reshape(1, -1)
        else:  # features of both images on the fixed image's isotropic grid of the level's spacing (dlir.modality)
            self.moving, self.moving_grid, self.back = _moving_features(moving, similarity, spacing, fixed.grid, affine)
            image, image_grid, _ = _moving_features(fixed, similarity, spacing, fixed.grid, None)
            self.fixed = sample(image, image_grid, points, outside=None).reshape(image.shape[1], -1)
        self.weights = weight.to(device=fixed.device, dtype=self.fixed.dtype)
        self.moved = (points + _field_at(field, field_grid, points)).reshape(-1, 3)
        self.corners, self.corner_weights = _trilinear(grid, points.reshape(-1, 3))

    def batch(self, step: int, count: int) -> slice:
        """The pool points of optimiser step ``step``: the pool (already random) taken ``count`` at a time, cyclically."""
        size = self.fixed.shape[1]
        batches = max(1, size // count)
        start = (step % batches) * count
        return slice(start, min(size, start + count))

    def residual_at(self, residual: torch.Tensor, pick: slice) -> torch.Tensor:
        """The residual displacement ``[1, 3, D, H, W]`` (mm, on this level's grid) at the pool points ``pick``, ``[n, 3]``."""
        corners, weights = self.corners[:, pick], self.corner_weights[:, pick]  # [8, n]
        values = residual.reshape(3, -1).index_select(1, corners.reshape(-1)).reshape(3, 8, -1)
        return (values * weights).sum(1).T

    def moving_at(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(moving intensities (or features) ``[1, C, n, 1, 1]`` at ``points``, 1 where the point is inside the moving
        image else 0).

        Outside, the intensity is the border value: its weight is 0, so it never counts.
        """
        at = points if self.back is None else self.back(points.reshape(1, -1, 3)).reshape(points.shape)
        values = sample(self.moving, self.moving_grid, at, outside=None)
        with torch.no_grad():
            inside = self.extent.contains(points).unsqueeze(1).to(values.dtype)
        return values, inside


def _moving_features(image: PreparedImage, similarity: str, spacing: float, fixed_grid: Grid,
                     affine: AffineTransform | None) -> tuple[torch.Tensor, Grid, AffineTransform | None]:
    """(features ``[1, C, D, H, W]``, their grid, the map of moving points onto that grid): ``image`` anti-aliased for
    ``spacing`` mm, resampled through ``affine`` (fixed -> moving, LPS mm; None: the identity) onto the axis-aligned
    isotropic grid of ``spacing`` over the fixed image (0 beyond the image), turned into ``similarity``'s features
    (:func:`dlir.modality.features`).

    Descriptors such as MIND-SSC are not invariant to rotation and scale: computed after the affine part of the
    transform (the level's start), they compare like with like, and a moving point ``y`` is looked up at
    ``affine^-1(y)`` (the returned map).
    """
    grid = network_grid(fixed_grid, (spacing,) * 3)
    values = features(similarity, image.resampled((spacing,) * 3, affine, grid), spacing)
    if affine is None:
        return values, grid, None
    inverse = torch.linalg.inv(affine.matrix.double())
    back = AffineTransform(inverse.float(), -(inverse @ affine.offset.double()[:, :, None])[:, :, 0].float())
    return values, grid, back


def _draw_indices(grid: Grid, mask: np.ndarray | None, spacing: float, count: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(voxel indices ``[count, 3]`` (i, j, k, whole numbers as floats) of random voxels of ``grid``, 0/1 weights
    ``[count]``): uniform over the image, or over the set voxels of ``mask`` taken every ``spacing`` mm, jittered within
    that stride (weight 0 where the jitter leaves the mask)."""
    size = torch.as_tensor(grid.size, dtype=torch.float32)
    if mask is None:
        index = torch.rand((count, 3), generator=generator) * size - 0.5
    else:
        stride = np.maximum(1, np.floor(spacing / np.asarray(grid.spacing))).astype(int)  # i, j, k
        si, sj, sk = (int(v) for v in stride)
        k, j, i = np.nonzero(mask[::sk, ::sj, ::si])
        if k.size == 0:
            raise InputError("no fixed voxel to refine on: the fixed mask is empty")
        candidates = torch.as_tensor(np.stack([i * si, j * sj, k * sk], axis=1), dtype=torch.float32)
        pick = torch.randint(candidates.shape[0], (count,), generator=generator)
        jitter = (torch.rand((count, 3), generator=generator) - 0.5) * torch.as_tensor(stride, dtype=torch.float32)
        index = candidates[pick] + jitter
    index = index.round().clamp(min=torch.zeros(3), max=size - 1)  # voxel centres: where the fixed intensities are known
    weight = torch.ones(count, dtype=torch.bool)
    if mask is not None:
        voxel = index.long().numpy()
        weight &= torch.as_tensor(mask[voxel[:, 2], voxel[:, 1], voxel[:, 0]] > 0)
    return index, weight.float()


def _trilinear(grid: Grid, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat node indices ``[8, n]`` and weights ``[8, n]`` of trilinear interpolation on ``grid`` at ``points`` ``[n, 3]``
    (LPS mm), indices clamped to the grid (border values extended, as ``grid_sample`` with border padding)."""
    size = torch.as_tensor(grid.size, device=points.device)  # i, j, k
    c = grid.continuous_index(points)
    c = torch.minimum(c.clamp(min=0), (size - 1).to(c.dtype))
    lower = torch.minimum(c.floor().long(), (size - 2).clamp(min=0))
    frac = c - lower
    frac = torch.where(size > 1, frac, torch.zeros_like(frac))
    upper = torch.minimum(lower + 1, size - 1)
    corners, weights = [], []
    for dk in (0, 1):
        for dj in (0, 1):
            for di in (0, 1):
                i = upper[:, 0] if di else lower[:, 0]
                j = upper[:, 1] if dj else lower[:, 1]
                k = upper[:, 2] if dk else lower[:, 2]
                corners.append((k * size[1] + j) * size[0] + i)
                wi = frac[:, 0] if di else 1 - frac[:, 0]
                wj = frac[:, 1] if dj else 1 - frac[:, 1]
                wk = frac[:, 2] if dk else 1 - frac[:, 2]
                weights.append(wi * wj * wk)
    return torch.stack(corners), torch.stack(weights)


def _correction(params: torch.Tensor) -> AffineTransform:
    """The affine correction ``x -> (I + M) x + t``: ``params[:9]`` = M, ``params[9:]`` = t / 100 mm (about the origin,
    which is the fixed image's centre in the engine's coordinates)."""
    eye = torch.eye(3, dtype=params.dtype, device=params.device)
    return AffineTransform((eye + params[:9].reshape(3, 3))[None], (100 * params[9:])[None])


def refine(
    transforms: Sequence[SpatialTransform],
    fixed: PreparedImage,
    moving: PreparedImage,
    refinement: Refinement,
    mask: np.ndarray | None = None,
    report: Report | None = None,
    settings: RefineSettings = RefineSettings(),
    similarity: str = "ncc",
) -> RefineResult:
    """Refine the networks' ``transforms`` ``[T0, ..., Tn]`` on this pair; return ``[P o C, N']`` (one affine, one field).

    ``fixed`` / ``moving``: the normalised images; ``mask``: the fixed mask ``[D, H, W]`` on the fixed
    grid (non-zero = use), or None.  ``refinement``: ``"auto"`` or a number of steps at the finest level.
    ``similarity``: ``"ncc"`` (one contrast) or ``"mind"`` (MIND-SSC descriptors, any two contrasts), see
    :mod:`dlir.modality`.
    """
    check_refinement(refinement)
    threads = torch.get_num_threads()
    if fixed.device.type == "cpu":
        torch.set_num_threads(CPU_THREADS)
    try:
        return _refine(transforms, fixed, moving, refinement, mask, report, settings, similarity)
    finally:
        torch.set_num_threads(threads)


def _refine(transforms: Sequence[SpatialTransform], fixed: PreparedImage, moving: PreparedImage, refinement: Refinement,
            mask: np.ndarray | None, report: Report | None, settings: RefineSettings, similarity: str) -> RefineResult:
    leading, rest = Composite(transforms).split_leading_affine()
    field_grid = displacement_grid(fixed.grid, settings.grid_spacings_mm[-1])
    with torch.no_grad():
        displacement = displacement_on_grid(rest, field_grid, 1, fixed.device)
        folded = folds(displacement, field_grid)
        if folded:  # networks meeting unfamiliar images: a fold is no start to refine from
            displacement = torch.zeros_like(displacement)
        networks_field = bool(rest.transforms) and not folded  # False too when no network ran (only affine parts)
    params = torch.zeros(12, device=fixed.device, requires_grad=True)
    base = base_spacing(fixed.grid, settings)
    levels = list(range(len(settings.level_spacings_mm)))
    if refinement != "auto":
        levels = levels[-1:]
    generator = torch.Generator().manual_seed(settings.seed)
    result = RefineResult([], networks_field=networks_field)
    for number, k in enumerate(levels):
        start = time.perf_counter()
        grid = displacement_grid(fixed.grid, settings.grid_spacings_mm[k])
        with torch.no_grad():
            level = _Level(base * settings.level_spacings_mm[k], fixed, moving, mask, displacement, field_grid, grid,
                           settings.pool * _samples(settings, similarity)[k], generator, similarity,
                           _aligned(leading, _correction(params.detach())))
        limit = settings.max_steps[k] if refinement == "auto" else int(refinement)
        step_report = None if report is None else functools.partial(report, number + 1, len(levels))
        residual, history = _optimise_level(level, k, _resample_field(displacement, field_grid, grid), grid, leading,
                                            params, limit, refinement == "auto", step_report, settings)
        with torch.no_grad():
            displacement = displacement + _resample_field(residual, grid, field_grid)
        result.steps.append(len(history))
        result.losses.append(history[-1] if history else float("nan"))
        result.seconds.append(time.perf_counter() - start)
        result.level_spacings.append(level.spacing)
    result.transforms = [_aligned(leading, _correction(params.detach())), DisplacementField(displacement, field_grid)]
    return result


def _optimise_level(level: _Level, k: int, so_far: torch.Tensor, grid: Grid, leading: AffineTransform | None,
                    params: torch.Tensor, limit: int, auto: bool, report: Callable[[int, int, float], None] | None,
                    settings: RefineSettings) -> tuple[torch.Tensor, list[float]]:
    """Optimise level ``k``: a residual displacement on its ``grid`` (mm, added to the displacement ``so_far`` there)
    and the affine correction ``params`` (updated in place), at most ``limit`` steps, to convergence when ``auto``.

    Returns (the residual, detached; the loss of every step).  With ``auto``, a level whose result is no better
    than its start (the mean objective of the first window's batches) is undone: residual 0, ``params`` as before.
    ``report(step, limit, loss)`` after every step.
    """
    residual = torch.zeros_like(so_far, requires_grad=True)
    start_params = params.detach().clone()

    def objective(step: int, penalise: bool) -> torch.Tensor:
        pick = level.batch(step, _samples(settings, level.similarity)[k])
        moved = (level.moved[pick] + level.residual_at(residual, pick)).reshape(1, -1, 1, 1, 3)
        return _objective(so_far + residual if penalise else None, grid, _aligned(leading, _correction(params))(moved),
                          level.fixed[:, pick].reshape(1, level.fixed.shape[0], -1, 1, 1), level.weights[pick].reshape(1, 1, -1, 1, 1), level,
                          settings)

    def baseline() -> float:  # the mean objective of the first window's batches, as the steps weigh them
        with torch.no_grad():
            return sum(float(objective(b, b % settings.penalty_every == 0)) for b in range(settings.window)) / settings.window

    before = baseline()
    optimiser = torch.optim.Adam([
        {"params": [residual], "lr": settings.learning_rate_mm[k]},
        {"params": [params], "lr": settings.affine_learning_rate},
    ])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda n: min(1.0, (n + 1) / settings.warmup) * settings.decay**n)
    history: list[float] = []
    for step in range(limit):
        loss = objective(step, step % settings.penalty_every == 0)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        history.append(float(loss.detach()))
        if report is not None:
            report(step + 1, limit, history[-1])
        if auto and _converged(history, before, settings):
            break
    if auto and baseline() >= before:  # the level found nothing better: undo it
        with torch.no_grad():
            residual.zero_()
            params.copy_(start_params)
    return residual.detach(), history


def _samples(settings: RefineSettings, similarity: str) -> tuple[int, ...]:
    """Random fixed points per step and level: fewer for descriptors, which vary smoothly and are 12 numbers each
    (half the points: 0.003 Dice less and a third less time on the development pairs of different contrasts)."""
    return settings.samples if similarity == "ncc" else settings.descriptor_samples


def _field_at(field: torch.Tensor, grid: Grid, points: torch.Tensor) -> torch.Tensor:
    """A displacement ``[1, 3, D, H, W]`` on ``grid`` at ``points`` ``[1, n, 1, 1, 3]`` (trilinear, border extended), same shape as the points."""
    return sample(field, grid, points, outside=None).reshape(1, 3, -1).transpose(1, 2).reshape(points.shape)


def _resample_field(field: torch.Tensor, grid: Grid, target: Grid) -> torch.Tensor:
    """A displacement on ``grid`` trilinearly resampled onto ``target``'s nodes."""
    return sample(field, grid, grid_points(target, 1, field.device), outside=None)


def _objective(field: torch.Tensor | None, grid: Grid, moved: torch.Tensor, fixed: torch.Tensor, weights: torch.Tensor,
               level: _Level, settings: RefineSettings) -> torch.Tensor:
    """``-NCC(fixed, moving at moved) + penalty_every * (alpha * bending(field) + fold_weight * folding penalty(field))``
    (:func:`dlir.losses.objective`).

    ``field`` is the displacement on this level's ``grid`` (mm), None on the steps that skip the penalties (they
    are evaluated every ``penalty_every`` steps, weighted up accordingly); ``moved`` the fixed points' images ``T(x)``;
    ``weights`` 0 for points that do not count (outside the fixed image or mask; those outside the moving image
    are dropped here).
    """
    values, inside = level.moving_at(moved)
    similarity = compare(level.similarity, fixed, values, inside * weights).mean()
    return objective(similarity, field, grid.spacing, settings.alpha, settings.fold_weight, settings.penalty_every,
                     grid.direction_matrix).loss


def _aligned(leading: AffineTransform | None, correction: AffineTransform) -> AffineTransform:
    """``P o C``: the networks' leading affine ``P`` (None: the identity) after the correction ``C``, as one affine."""
    return correction if leading is None else leading @ correction


def folds(field: torch.Tensor, grid: Grid) -> bool:
    """Whether the displacement ``field`` ``[1, 3, D, H, W]`` (LPS mm, on ``grid``) folds at a corner of a cell."""
    return any(bool((det <= 0).any()) for det in corner_jacobians(field, grid.spacing, grid.direction_matrix))


def _converged(history: list[float], start: float, settings: RefineSettings) -> bool:
    """True (after ``min_steps``) when the mean loss of the last ``window`` steps is below the previous window's by less
    than ``tolerance`` times the level's gain so far (``start``, the mean loss of the first window's batches before
    any step, minus the best window mean), or when no window beats ``start`` (a level that starts converged).
    Window means, because every step takes other random points."""
    w = settings.window
    if len(history) < max(settings.min_steps, 2 * w):
        return False
    means = [sum(history[k - w:k]) / w for k in range(w, len(history) + 1)]
    gain = start - min(means)
    return gain <= 0 or means[-1 - w] - means[-1] <= settings.tolerance * gain
