"""Known transforms are recovered: an affine by optimising the affine stage's network on the pair
alone, a smooth field by accurate mode (instance optimisation from an untrained B-spline stage)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from dlir.geometry import Grid, image_to_tensor, rotation_matrix
from dlir.losses import ncc
from dlir.pipeline import PreparedImage, stage_inputs
from dlir.preprocess import normalise_intensity
from dlir.recipe import IntensitySpec, StageSpec
from dlir.register import register
from dlir.stages import AffineStage
from dlir.transforms import AffineTransform, Composite, DisplacementField, warp
from testdata import identity_bspline_stack


def test_affine_stage_recovers_a_known_affine(template_4mm: sitk.Image) -> None:
    torch.manual_seed(0)
    grid = Grid.from_image(template_4mm)
    centre = grid.centre()
    rotation = rotation_matrix(torch.tensor([[0.08, -0.05, 0.1]], dtype=torch.float64))[0].numpy()
    matrix = rotation @ np.array([[1, 0.03, 0], [0, 1, -0.02], [0, 0, 1]]) @ np.diag([1.05, 0.96, 1.02])
    translation = np.array([4.0, -3.0, 2.0])
    truth = sitk.AffineTransform(3)
    truth.SetMatrix(matrix.flatten().tolist())
    truth.SetCenter(centre.tolist())
    truth.SetTranslation(translation.tolist())
    fixed = sitk.Resample(template_4mm, template_4mm, truth, sitk.sitkLinear, 0.0)

    spec = StageSpec("affine", spacing_mm=(4.0, 4.0, 4.0), depth=3, channels=16)
    stage = AffineStage(spec)
    f_img = PreparedImage(normalise_intensity(image_to_tensor(fixed), IntensitySpec()), grid)
    m_img = PreparedImage(normalise_intensity(image_to_tensor(template_4mm), IntensitySpec()), grid)
    identity = AffineTransform.translation(torch.zeros(1, 3))
    stage_grid, f, m = stage_inputs(spec, f_img, m_img, identity)
    optimiser = torch.optim.Adam(stage.parameters(), lr=1e-3)
    for _ in range(120):
        warped = stage_inputs(spec, f_img, m_img, Composite([identity, stage(f, m, stage_grid)]))[2]
        loss = -ncc(f, warped).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        found = stage(f, m, stage_grid)
    offset = centre - matrix @ centre + translation
    assert np.abs(found.matrix[0].double().numpy() - matrix).max() < 2e-3
    assert np.abs(found.offset[0].double().numpy() - offset).max() < 0.2  # mm


def test_bspline_stage_recovers_a_known_smooth_field(template_4mm: sitk.Image) -> None:
    grid = Grid.from_image(template_4mm)
    q = grid.physical_points(dtype=torch.float64) - torch.tensor(grid.centre())
    truth = torch.stack([3 * torch.sin(q[..., 1] / 20), 3 * torch.cos(q[..., 2] / 22), 2.5 * torch.sin(q[..., 0] / 18 + 0.5)])
    truth = truth.float()[None]
    fixed_t = warp(image_to_tensor(template_4mm), grid, DisplacementField(truth, grid), grid)
    fixed = sitk.GetImageFromArray(fixed_t[0, 0].numpy())
    fixed.CopyInformation(template_4mm)

    result = register(fixed, template_4mm, identity_bspline_stack("one-bspline"), refine="auto", device="cpu")
    found = torch.from_numpy(sitk.GetArrayFromImage(result.displacement)).movedim(-1, 0)[None]
    brain = fixed_t[0, 0] > 40
    error = (found - truth).norm(dim=1)[0][brain]
    magnitude = truth.norm(dim=1)[0][brain]
    assert float(magnitude.mean()) > 3.0
    assert float(error.mean()) < 0.3, f"mean error {float(error.mean()):.3f} mm"
    assert result.folding_fraction < 1e-3
