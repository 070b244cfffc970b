"""Analytic tests of the B-spline upsampler, composition, Jacobian and losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dlir.geometry import Grid, rotation_matrix
from dlir.losses import MIN_JACOBIAN, bending_energy, corner_jacobians, folding_penalty, local_ncc, ncc, objective
from dlir.nets import AffineNet, BSplineNet, BSplineUpsample, _first_block_by_slices
from dlir.transforms import (
    AffineBounds,
    AffineTransform,
    Composite,
    DisplacementField,
    affine_from_parameters,
    displacement_on_grid,
    jacobian_determinant,
    map_grid,
    resample_parallel,
    warp,
)

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def oblique(angles: tuple[float, float, float]) -> tuple[float, ...]:
    return tuple(rotation_matrix(torch.tensor([angles], dtype=torch.float64))[0].flatten().tolist())


# ------------------------------------------------------------------------------- B-spline kernel
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_bspline_reproduces_constant_fields(factor: int) -> None:
    cp = torch.full((1, 3, 3, 4, 5), 2.5)
    dense = BSplineUpsample(factor)(cp)
    assert dense.shape == (1, 3, 3 * factor, 4 * factor, 5 * factor)
    assert torch.allclose(dense, torch.full_like(dense, 2.5), atol=1e-5)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_bspline_reproduces_linear_fields(factor: int) -> None:
    """Control point c sits at voxel c*f + (f-1)/2; a linear control field gives the same line."""
    n = (4, 3, 5)  # d, h, w
    c = [torch.arange(k, dtype=torch.float64) for k in n]
    cz, cy, cx = torch.meshgrid(*c, indexing="ij")
    cp = torch.stack([0.7 * cx - 0.2 * cy + 1, 1.5 * cz + 0.3, -0.4 * cx + 0.9 * cy - 0.6 * cz])[None]
    dense = BSplineUpsample(factor).double()(cp)
    v = [(torch.arange(k * factor, dtype=torch.float64) - (factor - 1) / 2) / factor for k in n]
    vz, vy, vx = torch.meshgrid(*v, indexing="ij")
    expected = torch.stack([0.7 * vx - 0.2 * vy + 1, 1.5 * vz + 0.3, -0.4 * vx + 0.9 * vy - 0.6 * vz])[None]
    assert torch.allclose(dense, expected, atol=1e-9)


def test_bspline_kernel_is_local_and_smooth() -> None:
    cp = torch.zeros(1, 1, 5, 5, 5)
    cp[0, 0, 2, 2, 2] = 1.0
    dense = BSplineUpsample(4)(cp)[0, 0]
    # support: 4 control-point intervals = 16 voxels around the centre voxel 2*4+1.5
    nonzero = torch.nonzero(dense[9] > 1e-7)
    assert nonzero[:, 0].min() >= 2 and nonzero[:, 0].max() <= 17
    # the control point sits between voxels 9 and 10: the peak is B3(0.5 / 4) ** 3
    b3 = (4 - 6 * 0.125**2 + 3 * 0.125**3) / 6
    assert math.isclose(float(dense.max()), b3**3, rel_tol=1e-5)


# ------------------------------------------------------------------------------- networks
def test_networks_start_at_identity_and_are_fully_convolutional() -> None:
    torch.manual_seed(0)
    affine, bspline = AffineNet(channels=8, depth=3), BSplineNet(levels=2, channels=8)
    f, m = torch.rand(2, 1, 16, 24, 20), torch.rand(2, 1, 20, 16, 12)
    raw = affine(f, m)
    assert raw.shape == (2, 12) and torch.all(raw == 0)
    t = affine_from_parameters(raw, torch.zeros(2, 3), 50.0)
    assert torch.allclose(t.matrix, torch.eye(3).expand(2, 3, 3)) and torch.all(t.offset == 0)
    for shape in ((16, 24, 20), (32, 8, 12)):
        out = bspline(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape))
        assert out.shape == (1, 3, *(s // 4 for s in shape))


@pytest.mark.parametrize("depth", [8, 7])
def test_the_bspline_nets_first_block_by_slices_equals_the_layers(depth: int) -> None:
    """Without autograd on a CPU the first convolution block runs two slices at a time: the same numbers."""
    torch.manual_seed(3)
    net = BSplineNet(levels=2, channels=8)
    torch.nn.init.normal_(net.output.weight)  # not the identity start, so the whole net's output is compared
    fixed, moving = torch.rand(1, 1, depth, 12, 8), torch.rand(1, 1, depth, 12, 8)
    layers = net.features[:3](torch.cat([fixed, moving], dim=1))
    with torch.no_grad():
        by_slices = _first_block_by_slices(net.features[0], net.features[2], torch.cat([fixed, moving], dim=1))
        assert by_slices.shape == layers.shape
        assert torch.allclose(by_slices, layers, atol=1e-6)
        if depth % 4 == 0:
            assert torch.allclose(net(fixed, moving), net.output(net.features(torch.cat([fixed, moving], dim=1))), atol=1e-6)


def test_affine_parameters_are_constrained_as_in_the_paper() -> None:
    raw = torch.full((1, 12), 50.0)
    t = affine_from_parameters(raw, torch.zeros(1, 3), 10.0, AffineBounds())
    scale = torch.linalg.svdvals(t.matrix[0])
    assert scale.max() < 1.5 * (1 + math.pi) ** 2 + 1e-3  # scale <= 1.5, shear bounded
    raw = torch.zeros(1, 12)
    raw[0, 6:9] = torch.tensor([100.0, -100.0, 0.0])
    t = affine_from_parameters(raw, torch.zeros(1, 3), 10.0)
    assert torch.allclose(torch.diagonal(t.matrix[0]), torch.tensor([1.5, 0.5, 1.0]))


# ------------------------------------------------------------------------------- composition
def smooth_field(grid: Grid, amplitude: float, phase: float) -> torch.Tensor:
    pts = grid.physical_points(dtype=torch.float64)
    waves = [torch.sin(pts[..., (a + 1) % 3] / 9.0 + phase + a) for a in range(3)]
    return (amplitude * torch.stack(waves)).float()[None]


def test_warping_once_with_the_composition_equals_warping_stage_by_stage() -> None:
    fixed_grid = Grid((24, 20, 16), (1.5, 1.5, 2.0), (-18.0, -15.0, -16.0), oblique((0.1, -0.2, 0.3)))
    field_grid = Grid((28, 26, 22), (1.6, 1.6, 1.6), (-22.0, -20.0, -18.0), IDENTITY)
    moving_grid = Grid((30, 28, 20), (1.4, 1.2, 2.2), (-21.0, -17.0, -22.0), oblique((-0.2, 0.1, 0.0)))
    moving = torch.rand(1, 1, *moving_grid.shape)
    t1 = AffineTransform(rotation_matrix(torch.tensor([[0.05, 0.02, -0.04]])) * 1.03, torch.tensor([[1.5, -2.0, 0.5]]))
    t2 = DisplacementField(smooth_field(field_grid, 2.0, 0.0), field_grid)
    t3 = DisplacementField(smooth_field(field_grid, 1.5, 1.0), field_grid)
    once = warp(moving, moving_grid, Composite([t1, t2, t3]), fixed_grid)
    # stage by stage: warp through T1 onto an intermediate grid is lossy, so compose the point maps
    # explicitly in the documented order: T = T1 o T2 o T3 (T3 applied first)
    pts = fixed_grid.physical_points()[None]
    by_stage = warp(moving, moving_grid, lambda p: t1(t2(t3(p))), fixed_grid)
    assert torch.equal(once, by_stage)
    # and the composed displacement field reproduces the composition when used as one transform
    u = displacement_on_grid(Composite([t1, t2, t3]), fixed_grid)
    assert torch.allclose(pts + u[0].movedim(0, -1), t1(t2(t3(pts))), atol=1e-4)
    assert torch.allclose(warp(moving, moving_grid, DisplacementField(u, fixed_grid), fixed_grid), once, atol=1e-5)


def test_stage_inputs_points_merge_the_earlier_fields_within_a_tenth_of_a_mm() -> None:
    """map_grid (where a stage samples its inputs): the earlier stages' fields merged on the grid of the one applied
    first, evaluated separably, deviate from evaluating them one after the other by the merge's interpolation only
    (here fields of strong curvature, 3 mm waves 57 mm long; on the real pairs 0.012-0.028 mm on average)."""
    coarse = Grid((14, 13, 11), (8.0, 8.0, 8.0), (-52.0, -48.0, -40.0), IDENTITY)
    medium = Grid((27, 25, 21), (4.0, 4.0, 4.0), (-52.0, -48.0, -40.0), IDENTITY)
    stage = Grid((52, 48, 40), (2.0, 2.0, 2.0), (-51.0, -47.0, -39.0), IDENTITY)
    affine = AffineTransform(rotation_matrix(torch.tensor([[0.05, -0.03, 0.02]])) * 1.02, torch.tensor([[2.0, -1.0, 0.5]]))
    earlier = Composite([affine, DisplacementField(smooth_field(coarse, 3.0, 0.0), coarse),
                         DisplacementField(smooth_field(medium, 1.5, 1.0), medium)])
    exact = earlier(stage.physical_points()[None])
    mapped = map_grid(earlier, stage)
    assert mapped.shape == exact.shape
    error = (mapped - exact).norm(dim=-1)
    assert float(error.mean()) < 0.1 and float(error.max()) < 0.5  # of the stage's 2 mm voxels: 1/20 and 1/4
    # a batch of pairs (training) takes the pointwise path through the same merged field
    batch = Composite([AffineTransform(affine.matrix.expand(2, 3, 3), affine.offset.expand(2, 3)),
                       *[DisplacementField(t.field.expand(2, -1, -1, -1, -1), t.grid) for t in earlier.transforms[1:]]])
    assert torch.allclose(map_grid(batch, stage, batch=2), mapped.expand(2, -1, -1, -1, -1), atol=1e-4)


def test_separable_resampling_equals_the_pointwise_sampler_with_its_outside() -> None:
    """resample_parallel (a fixed image onto its network grid) = sample_source: trilinear, border values kept up to
    half a voxel beyond the image, 0 outside it; here with a flipped axis, anisotropic voxels and a grid overhanging
    the image on every side.  An oblique grid is not separable: None."""
    from dlir.preprocess import sample_source

    torch.manual_seed(4)
    flipped = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    extent = Grid((20, 18, 12), (1.0, 1.2, 2.5), (9.5, -10.0, -14.0), flipped)  # the image's own grid
    source = Grid((10, 9, 6), (2.0, 2.4, 5.0), (9.0, -9.4, -12.75), flipped)  # its block-averaged copy
    target = Grid((13, 14, 9), (2.0, 2.0, 4.0), (-13.0, -14.0, -18.0), IDENTITY)
    image = torch.rand(1, 1, *source.shape)
    expected = sample_source(image, source, extent, target.physical_points()[None])
    got = resample_parallel(image[0], source, target, extent=extent)
    assert got is not None and got.shape == expected.shape[1:]
    assert torch.allclose(got[None], expected, atol=1e-5)
    assert bool((expected == 0).any()) and bool((expected > 0).any())  # the overhang is really outside
    assert resample_parallel(image[0], source, Grid((13, 14, 9), (2.0, 2.0, 4.0), (-13.0, -14.0, -18.0),
                                                    oblique((0.1, 0.0, 0.0)))) is None


def test_composition_order_matters_and_is_documented() -> None:
    shift = AffineTransform.translation(torch.tensor([[10.0, 0.0, 0.0]]))
    scale = AffineTransform(torch.eye(3)[None] * 2, torch.zeros(1, 3))
    p = torch.tensor([[[1.0, 1.0, 1.0]]])
    assert Composite([shift, scale])(p).tolist() == [[[12.0, 2.0, 2.0]]]  # scale first, then shift
    assert Composite([scale, shift])(p).tolist() == [[[22.0, 2.0, 2.0]]]
    assert (shift @ scale)(p).tolist() == [[[12.0, 2.0, 2.0]]] and shift.compose(scale).matrix.dtype == torch.float32


def test_the_composite_algebra_keeps_the_map() -> None:
    """Flattening, folding affines, splitting the leading affine and merging fields: the same T (fields merged: exact
    at the first-applied field's voxel centres)."""
    grid = Grid((9, 8, 7), (4.0, 4.0, 4.0), (-16.0, -14.0, -12.0), IDENTITY)
    rng = torch.Generator().manual_seed(0)
    fields = [DisplacementField(torch.randn((1, 3, 7, 8, 9), generator=rng, dtype=torch.float64), grid) for _ in range(2)]
    shift = AffineTransform.translation(torch.tensor([[3.0, -2.0, 1.0]], dtype=torch.float64))
    rotate = AffineTransform(torch.as_tensor(rotation_matrix(torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64))),
                             torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64))
    t = Composite([Composite([shift, rotate]), fields[0], rotate, Composite([fields[1]])])
    pts = grid.physical_points(dtype=torch.float64)[None]
    expected = t(pts)
    assert [type(p) for p in t.flattened().transforms] == [AffineTransform, AffineTransform, DisplacementField,
                                                             AffineTransform, DisplacementField]
    assert len(t.with_affines_folded().transforms) == 4
    assert torch.allclose(t.with_affines_folded()(pts), expected, atol=1e-9)
    leading, rest = t.split_leading_affine()
    assert leading is not None and torch.allclose(leading(rest(pts)), expected, atol=1e-9)
    assert Composite([fields[0]]).split_leading_affine()[0] is None
    merged = Composite([shift, fields[0], fields[1]]).merged_fields()
    assert len(merged.transforms) == 2 and merged.transforms[1].grid == grid
    # the merged field is computed at float32 voxel centres (as every network grid's points)
    assert torch.allclose(merged(pts), Composite([shift, fields[0], fields[1]])(pts), atol=1e-5)


# ------------------------------------------------------------------------------- Jacobian
def test_jacobian_of_a_pure_scale_on_an_oblique_anisotropic_grid() -> None:
    grid = Grid((12, 10, 8), (0.8, 1.3, 2.5), (5.0, -3.0, 7.0), oblique((0.3, -0.2, 0.5)))
    pts = grid.physical_points(dtype=torch.float64)
    field = (0.2 * pts).movedim(-1, 0)[None]
    det = jacobian_determinant(field, grid)
    assert torch.allclose(det, torch.full_like(det, 1.728), atol=1e-9)


def test_jacobian_detects_a_fold() -> None:
    grid = Grid((20, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    x = grid.physical_points(dtype=torch.float64)[..., 0]
    field = torch.zeros(1, 3, *grid.shape, dtype=torch.float64)
    field[0, 0] = -1.8 * torch.exp(-((x - 10.0) ** 2) / 8.0) * (x - 10.0)  # x + u(x) decreases near x = 10
    det = jacobian_determinant(field, grid)
    folding = float((det <= 0).double().mean())
    assert 0 < folding < 0.5
    assert float(det.min()) < 0 and float(det.max()) > 1


# ------------------------------------------------------------------------------- losses
def test_ncc_is_one_for_identical_images_and_invariant_to_linear_intensity_maps() -> None:
    torch.manual_seed(1)
    a = torch.rand(2, 1, 10, 12, 14)
    assert torch.allclose(ncc(a, a), torch.ones(2), atol=1e-5)
    assert torch.allclose(ncc(a, 3.0 * a + 7.0), torch.ones(2), atol=1e-5)
    assert torch.allclose(ncc(a, -a), -torch.ones(2), atol=1e-5)
    assert float(ncc(a, torch.rand_like(a)).abs().max()) < 0.1
    assert torch.allclose(local_ncc(a, 2.0 * a + 1.0, window=5), torch.ones(2), atol=1e-3)


def test_bending_energy_is_zero_for_affine_fields_and_exact_for_a_quadratic() -> None:
    grid = Grid((12, 11, 10), (1.5, 2.0, 2.5), (0.0, 0.0, 0.0), IDENTITY)
    pts = grid.physical_points(dtype=torch.float64)
    affine = (pts @ torch.tensor([[0.1, 0.2, -0.1], [0.0, 0.3, 0.1], [0.2, 0.0, -0.2]], dtype=torch.float64).T + 4.0)
    assert float(bending_energy(affine.movedim(-1, 0)[None], grid.spacing)) < 1e-20
    x, y, z = pts.unbind(-1)
    quad = torch.stack([0.5 * 0.02 * x**2, 0.03 * x * y, torch.zeros_like(z)]).movedim(0, 0)[None]
    # u_xx of component 0 = 0.02; u_xy of component 1 = 0.03: P = 0.02^2 + 2 * 0.03^2
    assert math.isclose(float(bending_energy(quad, grid.spacing)), 0.02**2 + 2 * 0.03**2, rel_tol=1e-9)


def test_bending_energy_matches_between_resolutions() -> None:
    coarse = Grid((10, 10, 10), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), IDENTITY)
    fine = Grid((20, 20, 20), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), IDENTITY)
    energies = []
    for grid in (coarse, fine):
        x = grid.physical_points(dtype=torch.float64)[..., 0]
        u = torch.zeros(1, 3, *grid.shape, dtype=torch.float64)
        u[0, 1] = 0.01 * x**2
        energies.append(float(bending_energy(u, grid.spacing)))
    assert np.allclose(energies, 0.02**2)


def test_corner_jacobians_of_an_affine_field_on_a_rotated_grid_are_its_det() -> None:
    """``u(x) = M x + c`` (LPS mm) sampled on an oblique, anisotropic grid with a flipped axis (det direction -1):
    det J at every cell corner is ``det(I + M)`` w.r.t. physical coordinates; taken as if the grid were axis-aligned
    it is not.  The folding penalty and the objective take the physical det J."""
    rotation = np.asarray(oblique((0.3, -0.5, 0.8))).reshape(3, 3) @ np.diag([1.0, -1.0, 1.0])
    grid = Grid((7, 6, 5), (2.0, 3.0, 4.5), (10.0, -5.0, 3.0), tuple(rotation.ravel().tolist()))
    points = grid.physical_points(dtype=torch.float64)
    m = torch.tensor([[0.2, -0.3, 0.1], [0.4, 0.1, -0.2], [-0.1, 0.25, 0.3]], dtype=torch.float64)
    u = (points @ m.T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).movedim(-1, 0)[None]
    expected = float(torch.linalg.det(torch.eye(3, dtype=torch.float64) + m))
    for det in corner_jacobians(u, grid.spacing, grid.direction_matrix):
        assert det.shape == (4, 5, 6) and torch.allclose(det, torch.full_like(det, expected), rtol=0, atol=1e-12)
    assert not torch.allclose(corner_jacobians(u, grid.spacing)[0], torch.full((4, 5, 6), expected, dtype=torch.float64))
    # a physical fold (det(I + M) = -0.5 everywhere): penalised as such at every corner
    fold = torch.diag(torch.tensor([-1.5, 0.0, 0.0], dtype=torch.float64))
    folded = (points @ fold.T).movedim(-1, 0)[None]
    assert math.isclose(float(folding_penalty(folded, grid.spacing, grid.direction_matrix)), 8 * (MIN_JACOBIAN + 0.5) ** 2,
                        rel_tol=1e-9)
    assert float(objective(torch.tensor(0.0, dtype=torch.float64), folded, grid.spacing, 0.0, 1.0,
                           direction=grid.direction_matrix).folding) > 0


def test_objective_composes_similarity_bending_and_folding() -> None:
    """``-similarity + scale * (alpha * bending + fold_weight * folding)``; the folding penalty is 0 for a field with
    det J >= MIN_JACOBIAN everywhere and positive for a fold; no displacement: ``-similarity`` alone."""
    spacing = (2.0, 2.0, 2.0)
    x = Grid((8, 8, 8), spacing, (0.0, 0.0, 0.0), IDENTITY).physical_points(dtype=torch.float64)[..., 0]
    smooth = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float64)
    smooth[0, 0] = 0.01 * x**2  # det J = 1 + 0.02 x >= 1
    folded = torch.zeros_like(smooth)
    folded[0, 0] = -1.5 * x  # det J = -0.5 everywhere
    sim = torch.tensor(0.8, dtype=torch.float64)
    assert float(folding_penalty(smooth, spacing)) == 0.0
    assert math.isclose(float(folding_penalty(folded, spacing)), 8 * (MIN_JACOBIAN + 0.5) ** 2, rel_tol=1e-9)
    terms = objective(sim, folded, spacing, alpha=2.0, fold_weight=10.0, penalty_scale=4)
    assert math.isclose(float(terms.loss), -0.8 + 4 * (2.0 * float(terms.bending) + 10.0 * float(terms.folding)), rel_tol=1e-12)
    assert float(objective(sim, folded, spacing, alpha=2.0).folding) == 0.0  # fold_weight 0: not evaluated
    assert float(objective(sim, None, None, alpha=2.0).loss) == -0.8
