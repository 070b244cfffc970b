"""The exported transform evaluated on the full-resolution fixed grid separably, with its det J analytic.

The transform that full resolution evaluates (and ``transform.h5`` holds, :mod:`dlir.export`) is
``T = L o R`` (fixed point -> moving point, LPS mm): ``L(y) = A y + b`` one affine, ``R(x) = x + u(x)``
with ``u`` a displacement field on a coarse grid (4-6 mm), trilinear between its voxel centres and
extended by its border values outside (ITK's ``DisplacementFieldTransform`` with linear interpolation,
padded by its border values).  When the field's grid is parallel to the fixed grid, axis for axis
(:meth:`dlir.transforms.Composite.merged_fields` puts the merged field there), trilinear interpolation
is three one-dimensional linear interpolations, one per fixed axis, and everything full resolution
needs is affine in ``(x, u(x))`` or a polynomial of the position inside a field cell:

* along each axis a fixed index ``i`` falls in a *segment* of the field's axis: a cell ``[m, m + 1]``
  of its nodes, or the part before the first node or after the last one (where the border value
  extends); ``t`` = the continuous field index minus the segment's anchor (``m``; the first or last
  node).  Along the fixed grid's i axis every output is ``W0[segment] + t * W1[segment]``: tables with
  one entry per segment per row (j, k), a few times fewer than the voxels, then one gather and one
  multiply-add per voxel;
* the moving image's continuous index of ``T(x)`` and the displacement ``T(x) - x`` are affine in
  ``(x, u(x))``: their tables are made from ``u``'s;
* ``dT/dx = A (I + du/dx)``, and ``du/dx`` is the derivative of the trilinear interpolation (chain rule:
  differences of neighbouring nodes along one axis, interpolated along the two others; 0 where the
  border value extends).  Along i inside a segment the column ``du/di`` is constant and the two others
  are linear in ``t``, so ``det`` is a quadratic in ``t``: tables of its three coefficients.

The det J is thus that of the transform itself (exact for the trilinear field, discontinuous across
cell faces, where it takes the cell on the side of larger field index), not central differences of
sampled points: both agree wherever a voxel's two neighbours lie in its own cell
(``Testing/engine/test_separable.py`` states the bound elsewhere).  Tables are built in float64 (det J's
coefficients, of order 1, in float32) and rounded once to float32; a voxel's value is one float32
multiply-add of them (a few float32 ulps of the moving index, within 1e-4 mm of ITK evaluating
``transform.h5`` in double precision).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .geometry import Grid
from .transforms import AffineTransform, Composite, DisplacementField, SpatialTransform, parallel_axes

#: a continuous field index this close to a whole number (field index units) is taken as on that node
_ON_NODE = 1e-9


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op threads set to one inside the block (restored after): for the tables' dozens of operations on
    arrays of rows x cells, each too small for the thread pool to gain, which costs several times on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class _Axis:
    """One fixed axis against the parallel field axis: per fixed index its segment and ``t`` (field index units, from
    the segment's anchor), through ``c = slope * index + offset`` (c: the field's continuous index)."""

    segment: torch.Tensor  # int64 [n]: 0 .. nodes-2 cells, nodes-1 before the first node, nodes after the last
    t: torch.Tensor  # float64 [n]: c - anchor(segment)
    anchor: torch.Tensor  # float64 [nodes + 1]: m for cell m, 0 before the first node, nodes-1 after the last
    slope: float  # d c / d fixed index
    offset: float

    @classmethod
    def of(cls, size: int, slope: float, offset: float, nodes: int) -> "_Axis":
        """The segments of the fixed indices ``0 .. size-1`` on a field axis of ``nodes`` nodes."""
        c = torch.arange(size, dtype=torch.float64) * slope + offset
        c = torch.where((c - c.round()).abs() < _ON_NODE, c.round(), c)  # on a node: exactly (its cell is then the next one)
        cell = c.floor().clamp(0, max(nodes - 2, 0)).long()
        before, after = c < 0, c > nodes - 1
        if nodes < 2:  # no cell: every index lies before or after the one node (at it: before, t = 0)
            before = c <= 0
            after = ~before
        segment = torch.where(before, nodes - 1, torch.where(after, nodes, cell))
        anchor = torch.cat([torch.arange(max(nodes - 1, 0), dtype=torch.float64), torch.tensor([0.0, nodes - 1.0])])
        return cls(segment, c - anchor[segment], anchor, slope, offset)

    def part(self, start: int, stop: int) -> "_Axis":
        """The indices ``start .. stop-1`` of this axis."""
        return _Axis(self.segment[start:stop], self.t[start:stop], self.anchor, self.slope, self.offset)

    def t_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(smallest, largest) ``t`` of this axis' indices per segment ``[nodes + 1]``; +inf / -inf for an empty one."""
        count = len(self.anchor)
        low = torch.full((count,), torch.inf, dtype=torch.float64).scatter_reduce(0, self.segment, self.t, "amin")
        high = torch.full((count,), -torch.inf, dtype=torch.float64).scatter_reduce(0, self.segment, self.t, "amax")
        return low, high

    def interpolate(self, tables: tuple[torch.Tensor, torch.Tensor], dim: int,
                    derivative: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(values, derivatives per FIXED index or None) at this axis' indices of node values given by their segment
        tables along ``dim`` (:func:`segment_tables`)."""
        a, b = (v.index_select(dim, self.segment) for v in tables)
        shape = [1] * a.dim()
        shape[dim] = -1
        return a + b * self.t.view(shape), (b * self.slope if derivative else None)


def segment_tables(nodes: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V0, V1)``: the segment tables of ``nodes`` (values at the field's nodes along ``dim``), one entry per segment
    along ``dim`` (:class:`_Axis`): the value at the anchor and the change per field index unit (0 where the border
    value extends)."""
    n = nodes.shape[dim]
    first, last = nodes.narrow(dim, 0, 1), nodes.narrow(dim, n - 1, 1)
    cells = nodes.narrow(dim, 0, n - 1)
    zero = torch.zeros_like(first)
    return torch.cat([cells, first, last], dim), torch.cat([nodes.narrow(dim, 1, n - 1) - cells, zero, zero], dim)


@dataclass(frozen=True)
class SlabTables:
    """The tables of one slab (n slices): per row (k, j) and segment along i (S segments), float64 (det: float32); a
    voxel's value is ``tables[0][..., segment, :] + t * tables[1][..., segment, :]`` (:meth:`SeparableTransform.expand`)."""

    index: torch.Tensor | None  # [2, n, H, S, 3]: the moving image's continuous index (i, j, k) of T(x)
    displacement: torch.Tensor | None  # [2, n, H, S, 3]: T(x) - x, LPS mm
    det: torch.Tensor | None  # [3, n, H, S] float32: det dT/dx = c0 + t (c1 + t c2)
    det_s: float = 0.0  # seconds spent on det J's own tables (the interpolation shared with the other outputs excluded)


class SeparableTransform:
    """``T = L o (x + u(x))`` on a fixed grid parallel to ``u``'s grid, evaluated slab by slab (module docstring).

    Build with :meth:`of` (None when ``T`` does not have that form).  Tables in float64 (det J's in float32); a voxel's
    value in float32 on ``device``.
    """

    def __init__(self, leading: AffineTransform | None, field: DisplacementField, grid: Grid,
                 moving_grid: Grid | None, device: torch.device) -> None:
        self.grid, self.device = grid, device
        nodes = field.field[0].detach().to(device="cpu", dtype=torch.float64)  # [3, Z, Y, X] LPS mm
        self.along_k = segment_tables(nodes, 1)
        to_field = field.grid.physical_to_index() @ grid.index_to_physical()  # fixed index -> field index (diagonal)
        self.axes = [_Axis.of(n, float(to_field[a, a]), float(to_field[a, 3]), field.grid.size[a]) for a, n in enumerate(grid.size)]
        t_low, t_high = self.axes[0].t_range()
        self.used = torch.nonzero(torch.isfinite(t_low))[:, 0]  # the segments along i that hold voxels
        self.t_low, self.t_high = t_low[self.used, None], t_high[self.used, None]
        self.segment_i = self.axes[0].segment.to(device)
        self.t_i = self.axes[0].t.to(device=device, dtype=torch.float32)
        a = np.eye(3) if leading is None else leading.matrix[0].detach().double().cpu().numpy()
        b = np.zeros(3) if leading is None else leading.offset[0].detach().double().cpu().numpy()
        self.basis = grid.index_to_physical()[:3]  # [3, 4]: x = basis @ (i, j, k, 1)
        self.det_scale = float(np.linalg.det(a)) / float(np.linalg.det(self.basis[:, :3]))
        # the outputs affine in (x, u): on_u @ u + on_x @ x + constant
        self.displacement_map = (a, a - np.eye(3), b)
        self.index_map = None
        if moving_grid is not None:
            to_moving = moving_grid.physical_to_index()[:3]
            m = to_moving[:, :3] @ a  # moving index of A (x + u) + b
            self.index_map = (m, m, to_moving[:, :3] @ b + to_moving[:, 3])

    @classmethod
    def of(cls, transform: SpatialTransform, grid: Grid, moving_grid: Grid | None,
           device: torch.device) -> "SeparableTransform | None":
        """The separable evaluator of ``transform`` on ``grid``, or None unless it is one affine (or none) applied after
        one displacement field of one pair whose grid is parallel to ``grid``, axis for axis."""
        leading, rest = Composite.of(transform).split_leading_affine()
        parts = rest.transforms
        if len(parts) != 1 or not isinstance(parts[0], DisplacementField):
            return None
        field = parts[0]
        if field.field.shape[0] != 1 or not parallel_axes(grid, field.grid):
            return None
        return cls(leading, field, grid, moving_grid, device)

    # ------------------------------------------------------------------------------------------- tables
    def tables(self, k0: int, k1: int, index: bool = False, displacement: bool = False, det: bool = False) -> SlabTables:
        """The tables of slices ``k0 .. k1-1`` for the outputs asked for (``index`` needs the moving grid), built on one
        thread (:func:`one_thread`)."""
        with one_thread():
            return self._tables(k0, k1, index, displacement, det)

    def _tables(self, k0: int, k1: int, index: bool, displacement: bool, det: bool) -> SlabTables:
        ax_i, ax_j, ax_k = self.axes
        u_k, du_k = ax_k.part(k0, k1).interpolate(self.along_k, 1, det)  # [3, n, Y, X]: u and du/dk on the slab's slices
        u, du_j = ax_j.interpolate(segment_tables(u_k, 2), 2, det)  # [3, n, H, X]
        u0, u1 = (v.permute(1, 2, 3, 0) for v in segment_tables(u, 3))  # [n, H, S, 3]: u = u0 + t u1 per segment
        rows = self._rows(k0, k1)
        out_index = None if not index or self.index_map is None else self._affine_tables(u0, u1, *self.index_map, rows)
        out_disp = self._affine_tables(u0, u1, *self.displacement_map, rows) if displacement else None
        out_det, det_s = None, 0.0
        if det:
            assert du_k is not None and du_j is not None
            t0 = time.perf_counter()
            du_k = ax_j.interpolate(segment_tables(du_k.float(), 2), 2, False)[0]
            out_det = self._det_tables(u1.float(), du_j.float(), du_k)  # float32: det J's coefficients are of order 1
            det_s = time.perf_counter() - t0
        return SlabTables(out_index, out_disp, out_det, det_s)

    def _rows(self, k0: int, k1: int) -> torch.Tensor:
        """``[n, H, 2]``: the fixed index (j, k) of each row of slices ``k0 .. k1-1``."""
        height = self.grid.size[1]
        j = torch.arange(height, dtype=torch.float64)[None, :].expand(k1 - k0, height)
        k = torch.arange(k0, k1, dtype=torch.float64)[:, None].expand(k1 - k0, height)
        return torch.stack([j, k], dim=-1)

    def _affine_tables(self, u0: torch.Tensor, u1: torch.Tensor, on_u: np.ndarray, on_x: np.ndarray,
                       constant: np.ndarray, rows: torch.Tensor) -> torch.Tensor:
        """Tables ``[2, n, H, S, 3]`` of ``on_u @ u(x) + on_x @ x + constant``, ``x`` the fixed voxel centre (LPS mm),
        whose index along i is ``(anchor + t - offset) / slope`` in a segment."""
        per_index = torch.from_numpy(on_x @ self.basis)  # [3, 4]: the x part as a map of (i, j, k, 1)
        ax = self.axes[0]
        k_u = torch.from_numpy(on_u).T
        row_part = rows @ per_index[:, 1:3].T + (per_index[:, 3] + torch.from_numpy(constant))  # [n, H, 3]
        i_part = ((ax.anchor - ax.offset) / ax.slope)[:, None] * per_index[:, 0]  # [S, 3]
        w0 = (u0 @ k_u).add_(row_part[:, :, None, :]).add_(i_part)
        w1 = (u1 @ k_u).add_(per_index[:, 0] / ax.slope)
        return torch.stack([w0, w1])

    def _det_tables(self, u1: torch.Tensor, du_j: torch.Tensor, du_k: torch.Tensor) -> torch.Tensor:
        """Coefficients ``[3, n, H, S]`` of ``det dT/dx = c0 + t (c1 + t c2)`` per segment along i.

        ``dT/dx = A (B + G) B^-1`` with ``B = dx / d index`` and ``G[:, a] = du / d index_a``, so
        ``det = det A det(B + G) / det B``; ``G[:, i]`` is ``slope_i * u1`` (constant in a segment), the two
        other columns are linear in ``t``.
        """
        ax = self.axes[0]
        basis = torch.from_numpy(self.basis[:, :3]).float()
        col_i = (u1 * ax.slope + basis[:, 0]).unbind(-1)  # 3 x [n, H, S]
        j0, j1 = (v.unbind(0) for v in segment_tables(du_j, 3))
        k0, k1 = (v.unbind(0) for v in segment_tables(du_k, 3))
        j0 = [j0[c] + float(basis[c, 1]) for c in range(3)]
        k0 = [k0[c] + float(basis[c, 2]) for c in range(3)]

        def triple(b: list[torch.Tensor] | tuple[torch.Tensor, ...], c: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
            """col_i . (b x c) per entry."""
            return (col_i[0] * (b[1] * c[2] - b[2] * c[1]) + col_i[1] * (b[2] * c[0] - b[0] * c[2])
                    + col_i[2] * (b[0] * c[1] - b[1] * c[0]))

        return torch.stack([triple(j0, k0), triple(j0, k1) + triple(j1, k0), triple(j1, k1)]).mul_(self.det_scale)

    def bounds(self, tables: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(smallest, largest) value per component (``[c]`` each, float64) over the voxels of a vector output's
        tables ``[2, n, H, S, c]``: linear in ``t`` in a segment, so at the segment's first or last voxel."""
        w0, w1 = (w.index_select(2, self.used) for w in tables)
        at_low, at_high = w1 * self.t_low, w1 * self.t_high
        components = w0.shape[-1]
        least = torch.minimum(at_low, at_high).add_(w0).reshape(-1, components).amin(0)
        most = torch.maximum(at_low, at_high).add_(w0).reshape(-1, components).amax(0)
        return least.numpy(), most.numpy()

    # ------------------------------------------------------------------------------------------- expansion
    def expand(self, tables: torch.Tensor) -> torch.Tensor:
        """A vector output's tables ``[2, n, H, S, c]`` at every voxel of their slab: ``[n, H, W, c]`` float32."""
        _, n, height, count, components = tables.shape
        w = tables.to(device=self.device, dtype=torch.float32).reshape(2, n * height, count, components)
        out = w[0].index_select(1, self.segment_i)  # rows flattened: an index_select along dim 1 is the fastest gather
        out.addcmul_(w[1].index_select(1, self.segment_i), self.t_i[:, None])
        return out.reshape(n, height, -1, components)

    def expand_det(self, tables: torch.Tensor) -> torch.Tensor:
        """det dT/dx at every voxel of the slab of ``tables`` (``[3, n, H, S]``): ``[n, H, W]`` float32."""
        _, n, height, count = tables.shape
        flat = tables.to(device=self.device, dtype=torch.float32).reshape(3, n * height, count)
        c0, c1, c2 = (c.index_select(1, self.segment_i) for c in flat)
        return c2.mul_(self.t_i).add_(c1).mul_(self.t_i).add_(c0).reshape(n, height, -1)
