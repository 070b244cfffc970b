"""Intensity normalisation: percentiles by partition equal torch.quantile; windows clip."""

from __future__ import annotations

import pytest
import torch

from dlir.preprocess import normalise_intensity, percentiles
from dlir.recipe import IntensitySpec


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 100_003])
@pytest.mark.parametrize("qs", [(0.5, 99.5), (0.0, 100.0), (50.0, 12.5)])
def test_percentiles_equal_torch_quantile(n: int, qs: tuple[float, float]) -> None:
    values = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * 1000 - 200
    expected = [float(torch.quantile(values, q / 100)) for q in qs]
    assert percentiles(values, qs) == pytest.approx(expected, abs=1e-9)


def test_normalisation_maps_percentiles_and_windows_to_the_unit_range() -> None:
    image = torch.arange(1000, dtype=torch.float32).view(1, 1, 10, 10, 10)
    scaled = normalise_intensity(image, IntensitySpec("percentile", 1.0, 99.0))
    assert float(scaled.min()) == 0.0 and float(scaled.max()) == 1.0
    assert float(scaled.flatten()[500]) == pytest.approx((500 - 9.99) / (989.01 - 9.99), abs=1e-6)
    ct = normalise_intensity(image - 1500, IntensitySpec("window", -1000.0, 600.0))
    assert float(ct.flatten()[0]) == 0.0 and float(ct.flatten()[999]) == pytest.approx((999 - 1500 + 1000) / 1600)
