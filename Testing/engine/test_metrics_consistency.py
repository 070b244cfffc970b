"""One implementation of the metrics: training validation, ``register`` and ``evaluate`` give the
same Dice, folding fraction and Jacobian std on the same label maps and the same field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dlir.evaluation.evaluate import score
from dlir.evaluation.scores import MethodOutput
from dlir.geometry import Grid, image_to_tensor
from dlir.metrics import jacobian_determinant_image, jacobian_std
from dlir.pairs import PairData, sample_pair
from dlir.pipeline import PreparedImage
from dlir.register import register
from dlir.stack import load_stack
from dlir.training.trainer import TrainingPair, validation_scores
from dlir.transforms import DisplacementField


@pytest.fixture(scope="module")
def sample() -> dict[str, sitk.Image]:
    files = sample_pair()
    return {name: sitk.ReadImage(str(getattr(files, name))) for name in ("fixed", "moving", "fixed_labels", "moving_labels")}


def training_pair(images: dict[str, sitk.Image]) -> TrainingPair:
    """The sample images as a training validation pair on their own grids (intensities as they are)."""
    def prepared(image: sitk.Image) -> PreparedImage:
        return PreparedImage(image_to_tensor(image), Grid.from_image(image))

    return TrainingPair(prepared(images["fixed"]), prepared(images["moving"]),
                        image_to_tensor(images["fixed_labels"]), image_to_tensor(images["moving_labels"]))


def pair_data(images: dict[str, sitk.Image], mask: sitk.Image | None) -> PairData:
    return PairData(sample_pair(), images["fixed"], images["moving"], images["fixed_labels"], images["moving_labels"],
                    mask, None, None, None)


def as_transform(displacement: sitk.Image) -> DisplacementField:
    """A displacement image (LPS mm on the fixed grid) as the engine's transform."""
    field = torch.from_numpy(sitk.GetArrayFromImage(displacement)).movedim(-1, 0)[None]
    return DisplacementField(field, Grid.from_image(displacement))


def test_training_register_and_evaluate_agree_on_a_registration(sample: dict[str, sitk.Image], fresh_stack_file: Path) -> None:
    mask = sitk.Cast(sample["fixed_labels"] > 0, sitk.sitkUInt8)
    reg = register(sample["fixed"], sample["moving"], load_stack(fresh_stack_file), moving_labels=sample["moving_labels"],
                   fixed_mask=mask, device="cpu", refine=15)
    assert reg.jacobian_std > 1e-3  # refinement made a real, non-uniform field

    evaluated = score(pair_data(sample, mask), "dlir", MethodOutput(reg.displacement, reg.warped, reg.warped_labels))
    assert evaluated.folding_fraction == reg.folding_fraction
    # one statistic, two det J maps of one transform: register differentiates the exported transform's coarse field
    # analytically (dlir.separable), evaluate takes central differences of its dense displacement, as for elastix and
    # ANTs; test_separable.py bounds the gap between the two maps (mean 0.01), here it moves the std by < 15 %
    dense = jacobian_determinant_image(reg.displacement)
    inside = sitk.Resample(mask, dense, sitk.Transform(), sitk.sitkNearestNeighbor)
    assert evaluated.jacobian_std == pytest.approx(jacobian_std(sitk.GetArrayFromImage(dense), sitk.GetArrayFromImage(inside)), rel=1e-5)
    assert reg.jacobian_std == pytest.approx(evaluated.jacobian_std, rel=0.15)

    _, folding, dice = validation_scores(training_pair(sample), as_transform(reg.displacement))
    assert folding == evaluated.folding_fraction_image
    assert sorted(dice) == sorted(evaluated.labels) == [1, 2, 3, 4]
    for label, value in dice.items():  # the same labels, warped once by the registration and once through its field
        assert value == pytest.approx(evaluated.labels[label]["dice"], abs=2e-3)


def test_training_and_evaluate_agree_on_a_folded_field(sample: dict[str, sitk.Image]) -> None:
    """A field that folds a known region: the same folding fraction and Dice from both, and register's statistics."""
    fixed = sample["fixed"]
    grid = Grid.from_image(fixed)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in grid.shape), indexing="ij")
    centre = np.array(grid.shape) / 2
    bump = np.exp(-((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2) / (2 * 4.0 ** 2))
    field = np.zeros((*grid.shape, 3))
    field[..., 0] = -12.0 * (i - centre[2]) * bump  # x displacement (mm) against x: det < 0 near the centre
    displacement = sitk.GetImageFromArray(field.astype(np.float32), isVector=True)
    displacement.CopyInformation(fixed)
    warped_labels = sitk.Resample(sample["moving_labels"], fixed, sitk.DisplacementFieldTransform(
        sitk.Cast(displacement, sitk.sitkVectorFloat64)), sitk.sitkNearestNeighbor, 0)

    evaluated = score(pair_data(sample, None), "folded", MethodOutput(displacement, fixed, warped_labels))
    _, folding, dice = validation_scores(training_pair(sample), as_transform(displacement))
    assert 0 < folding < 0.01
    assert folding == evaluated.folding_fraction_image
    for label, value in dice.items():
        assert value == pytest.approx(evaluated.labels[label]["dice"], abs=2e-3)
