"""Registration losses: global and local normalised cross-correlation (MIND-SSC for different contrasts lives in
:mod:`dlir.modality`), bending energy, a folding penalty, and
THE objective composition (:func:`objective`) that a stage's training loss (:func:`stage_loss`) and accurate mode
(:mod:`dlir.refine`) both use.

Images are ``[N, C, D, H, W]``; displacement fields ``[N, 3, D, H, W]`` in mm.  The DLIR loss is
``-NCC + alpha * bending energy`` (paper eq. 1); accurate mode adds ``fold_weight * folding penalty``.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .modality import mind_similarity, mind_ssc, ncc  # noqa: F401  (ncc: THE global NCC, used across the engine as losses.ncc)
from .recipe import StageSpec

#: det J of a displacement below this, at the corners of its grid cells, is penalised (a margin above folding)
MIN_JACOBIAN = 0.3


def local_ncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Mean local (windowed) NCC per pair, ``[N]``: NCC in cubes of ``window`` voxels, averaged.

    Better than global NCC for large deformations and spatially varying intensity (the squared
    form of voxelmorph's LNCC is not used: this one is a true correlation in [-1, 1]).
    """
    pad = window // 2
    pool = lambda x: F.avg_pool3d(x, window, stride=1, padding=pad, count_include_pad=False)  # noqa: E731
    mf, mm = pool(fixed), pool(warped)
    var_f = (pool(fixed * fixed) - mf * mf).clamp(min=0)
    var_m = (pool(warped * warped) - mm * mm).clamp(min=0)
    cov = pool(fixed * warped) - mf * mm
    return (cov / torch.sqrt(var_f * var_m + eps)).flatten(1).mean(1)


def bending_energy(field: torch.Tensor, spacing: tuple[float, float, float]) -> torch.Tensor:
    """Mean bending energy per pair, ``[N]``, of a displacement ``[N, 3, D, H, W]`` (mm) on a grid of ``spacing`` (x, y, z mm).

    ``P = mean over voxels of sum_c [u_xx^2 + u_yy^2 + u_zz^2 + 2 (u_xy^2 + u_xz^2 + u_yz^2)]``
    with second derivatives per mm (central differences, interior voxels only), the paper's
    eq. 2 on the transform T = x + u (the identity has no second derivative).  0 for affine fields.
    Axes of size < 3 contribute nothing.
    """
    if field.dim() != 5 or field.shape[1] != 3:
        raise ValueError(f"expected a displacement field [N, 3, D, H, W], got {tuple(field.shape)}")
    sx, sy, sz = spacing
    u = field
    # tensor dims: 4 = x (W), 3 = y (H), 2 = z (D)
    def d2(t: torch.Tensor, dim: int, h: float) -> torch.Tensor:
        n = t.shape[dim]
        return (t.narrow(dim, 2, n - 2) - 2 * t.narrow(dim, 1, n - 2) + t.narrow(dim, 0, n - 2)) / (h * h)

    def d1(t: torch.Tensor, dim: int, h: float) -> torch.Tensor:
        n = t.shape[dim]
        return (t.narrow(dim, 2, n - 2) - t.narrow(dim, 0, n - 2)) / (2 * h)

    def crop(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        for dim in (2, 3, 4):
            if dim not in dims and t.shape[dim] > 2:
                t = t.narrow(dim, 1, t.shape[dim] - 2)
        return t

    axes = [(4, sx), (3, sy), (2, sz)]
    usable = [(d, h) for d, h in axes if u.shape[d] >= 3]
    if not usable:
        return torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
    total = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
    for d, h in usable:
        total = total + crop(d2(u, d, h), (d,)).pow(2).flatten(1).mean(1)
    for a in range(len(usable)):
        for b in range(a + 1, len(usable)):
            (da, ha), (db, hb) = usable[a], usable[b]
            cross = d1(d1(u, da, ha), db, hb)
            total = total + 2 * crop(cross, (da, db)).pow(2).flatten(1).mean(1)
    return 3 * total  # each mean ran over components too: x3 gives the sum over components


def corner_jacobians(field: torch.Tensor, spacing: tuple[float, float, float],
                     direction: np.ndarray | None = None) -> list[torch.Tensor]:
    """det J of ``x + u`` (w.r.t. physical LPS mm) at the 8 corners of every cell of a grid, each from the cell's three
    edges that meet there: the trilinear field's det J at the corners of the cell.

    ``field`` ``[1, 3, D, H, W]`` (LPS mm) on a grid of ``spacing`` (i, j, k mm) whose axes are the columns of
    ``direction`` (3 x 3, LPS; None: the identity).  With ``G`` the edge differences per mm along the grid's axes,
    ``du/dx = G R^-1``, so ``det(I + du/dx) = det(R + G) / det R``.  Central differences (one value per node)
    average two cells and can hide a fold in one of them; edges cannot.
    """
    sx, sy, sz = spacing
    r = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    scale = 1.0 / float(np.linalg.det(r))
    u = field[0]
    columns = torch.as_tensor(r, dtype=u.dtype, device=u.device).T.reshape(3, 3, 1, 1, 1)  # R's columns
    # the columns of R + G along the edges: dT / d(mm along the grid's i, j, k axis)
    dx = (u[:, :, :, 1:] - u[:, :, :, :-1]) / sx + columns[0]
    dy = (u[:, :, 1:] - u[:, :, :-1]) / sy + columns[1]
    dz = (u[:, 1:] - u[:, :-1]) / sz + columns[2]
    ends = (slice(None, -1), slice(1, None))  # the cell's lower or upper node along an axis
    out = []
    for ci, cj, ck in itertools.product((0, 1), repeat=3):  # corner (i, j, k): the x edge at its j and k, and so on
        gx, gy, gz = dx[:, ends[ck], ends[cj], :], dy[:, ends[ck], :, ends[ci]], dz[:, :, ends[cj], ends[ci]]
        (a11, a21, a31), (a12, a22, a32), (a13, a23, a33) = gx, gy, gz
        det = a11 * (a22 * a33 - a23 * a32) - a12 * (a21 * a33 - a23 * a31) + a13 * (a21 * a32 - a22 * a31)
        out.append(det if scale == 1.0 else det * scale)
    return out


def folding_penalty(field: torch.Tensor, spacing: tuple[float, float, float], direction: np.ndarray | None = None) -> torch.Tensor:
    """``sum over the 8 cell corners of mean(relu(MIN_JACOBIAN - det J)^2)``, a scalar averaged over the batch: 0
    where det J >= MIN_JACOBIAN at every corner of every cell (:func:`corner_jacobians`).

    ``field`` ``[N, 3, D, H, W]`` (LPS mm) on a grid of ``spacing`` (i, j, k mm) whose axes are the columns of
    ``direction`` (None: the identity).
    """
    return torch.stack([sum(torch.relu(MIN_JACOBIAN - det).pow(2).mean()
                            for det in corner_jacobians(one[None], spacing, direction))
                        for one in field]).mean()


class Objective(NamedTuple):
    """The objective and its terms (scalars): ``loss = -similarity + penalty_scale * (alpha * bending + fold_weight *
    folding)``, to minimise."""

    loss: torch.Tensor
    similarity: torch.Tensor
    bending: torch.Tensor  # mm^-2; 0 without a displacement
    folding: torch.Tensor  # the folding penalty; 0 without a displacement or with fold_weight 0


def objective(similarity: torch.Tensor, displacement: torch.Tensor | None, spacing: tuple[float, float, float] | None,
              alpha: float, fold_weight: float = 0.0, penalty_scale: float = 1.0,
              direction: np.ndarray | None = None) -> Objective:
    """``-similarity + penalty_scale * (alpha * bending energy + fold_weight * folding penalty)`` of a displacement.

    ``similarity``: a scalar (1 = perfect).  ``displacement`` ``[N, 3, D, H, W]`` (mm) on a grid of ``spacing``
    (i, j, k mm) whose axes are the columns of ``direction`` (None: the identity), its bending energy averaged over the
    batch (:func:`bending_energy`, the same along any orthonormal axes) and, when ``fold_weight`` > 0, its
    :func:`folding_penalty`; ``None`` leaves ``-similarity`` alone (an affine stage, or a step that skips the
    penalties).  ``penalty_scale`` weighs the penalties up when they are evaluated on only some steps.
    """
    zero = torch.zeros((), dtype=similarity.dtype, device=similarity.device)
    if displacement is None:
        return Objective(-similarity, similarity, zero, zero)
    if spacing is None:
        raise ValueError("the bending energy of a displacement needs its grid spacing")
    bending = bending_energy(displacement, spacing).mean()
    folding = folding_penalty(displacement, spacing, direction) if fold_weight > 0 else zero
    return Objective(-similarity + penalty_scale * (alpha * bending + fold_weight * folding), similarity, bending, folding)


def similarity(spec: StageSpec, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """A stage's similarity per pair ``[N]`` (1 = perfect): global NCC, local NCC over ``spec.ncc_window`` voxels, or
    MIND-SSC descriptors compared by their mean squared difference (``mind``: any two contrasts, :mod:`dlir.modality`;
    the descriptors' offsets are voxels of the stage's grid)."""
    if spec.similarity == "lncc":
        return local_ncc(fixed, warped, spec.ncc_window)
    if spec.similarity == "mind":
        return mind_similarity(mind_ssc(fixed), mind_ssc(warped))
    return ncc(fixed, warped)


def stage_loss(
    spec: StageSpec,
    fixed: torch.Tensor,
    warped: torch.Tensor,
    displacement: torch.Tensor | None = None,
    spacing: tuple[float, float, float] | None = None,
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Objective:
    """``-similarity(fixed, warped) + spec.alpha * bending energy(displacement)`` (paper eq. 1), plus
    ``spec.fold_weight`` times the folding penalty of ``displacement`` when it is > 0; batch means (:func:`objective`).

    ``displacement`` ``[N, 3, D, H, W]`` (mm) on a grid of ``spacing`` (x, y, z mm) is the stage's
    own field (B-spline stages); ``None`` for an affine stage, which has no bending term.
    ``labels`` = (fixed, warped moving) label probabilities ``[N, L, D, H, W]`` on the grid of
    ``fixed``, when the pair's labels are known: the similarity is then
    ``(1 - spec.dice_weight) * similarity + spec.dice_weight * soft Dice``.
    """
    sim = similarity(spec, fixed, warped).mean()
    if labels is not None and spec.dice_weight > 0:
        sim = (1 - spec.dice_weight) * sim + spec.dice_weight * soft_dice(*labels).mean()
    return objective(sim, displacement, spacing, spec.alpha, spec.fold_weight)


def one_hot(labels: torch.Tensor, values: list[int]) -> torch.Tensor:
    """One channel per label value: ``[N, 1, D, H, W]`` integer labels -> ``[N, len(values), D, H, W]`` float (0/1)."""
    return torch.cat([(labels == v).to(torch.float32) for v in values], dim=1)


def soft_dice(fixed: torch.Tensor, warped: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean soft Dice per pair ``[N]`` (1 = identical) of label probabilities ``[N, L, D, H, W]`` in [0, 1].

    Per label ``(2 sum(f w) + eps) / (sum(f^2) + sum(w^2) + eps)`` (the squared denominators of
    Milletari et al.'s V-Net), averaged over the ``L`` labels; a label absent from both maps counts as
    a perfect overlap.  For one-hot maps this is the usual Dice.  The squares matter for soft maps:
    with ``sum(f) + sum(w)`` below, a map blurred by trilinear warping scores lower than a sharp one
    even where it is aligned, so a label loss would prefer displacements by whole voxels (the identity)
    to the right sub-voxel ones; with squares, ``f == w`` is the unique maximum (the numbers are in
    Testing/benchmarks/RESULTS.md).
    """
    dims = tuple(range(2, fixed.dim()))
    overlap = (fixed * warped).sum(dims)
    total = (fixed * fixed).sum(dims) + (warped * warped).sum(dims)
    return ((2 * overlap + eps) / (total + eps)).mean(1)
