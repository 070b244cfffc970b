"""What evaluating a method on a pair yields: its outputs (:class:`MethodOutput`) and its numbers
(:class:`Score`), and how methods are named in tables.  Shared by the evaluation, the benchmark
and the plots.  Distances in mm, times in s; everything on the fixed grid (LPS mm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..metrics import tre_summary

IDENTITY = "identity"
#: label metrics, in table order
LABEL_METRICS = ("dice", "hd", "hd95", "asd")


@dataclass
class MethodOutput:
    """What one method produced for one pair, on the fixed grid (LPS mm).

    ``displacement`` is ``None`` for the identity (before registration).  ``timings`` are seconds
    per step; ``total_s`` is the end-to-end time when it was measured as a whole (read, register,
    write), else the sum of the steps.  ``peak_rss_mb`` is the peak memory of the process that ran
    the method, when it ran in its own process (``dlir bench``).
    """

    displacement: sitk.Image | None
    warped: sitk.Image
    warped_labels: sitk.Image | None
    timings: dict[str, float] = field(default_factory=dict)
    total_s: float | None = None
    peak_rss_mb: float | None = None

    @property
    def time_s(self) -> float:
        return self.total_s if self.total_s is not None else float(sum(self.timings.values()))


@dataclass
class Score:
    """The numbers of one method on one pair (distances in mm, times in s)."""

    pair: str
    method: str
    labels: dict[int, dict[str, float]]  # label -> dice, hd, hd95, asd
    tre: np.ndarray | None  # per landmark, mm
    gt_error: dict[str, float]  # mean, max (fixed image); mask_mean, mask_max (evaluation mask)
    folding_fraction: float  # det J <= 0, share of the evaluation mask (NaN for the identity)
    folding_fraction_image: float  # det J <= 0, share of the whole fixed image
    jacobian_std: float  # inside the evaluation mask
    jacobian_sample: np.ndarray | None  # det J values inside the mask (subsampled), for histograms
    timings: dict[str, float]
    time_s: float
    peak_rss_mb: float | None = None

    def label_mean(self, metric: str) -> float:
        """Mean of ``metric`` over this pair's labels (NaN without labels)."""
        values = [v[metric] for v in self.labels.values()]
        return float(np.mean(values)) if values else math.nan

    def tre_stat(self, stat: str) -> float:
        """``mean``, ``median``, ``max`` or ``std`` of this pair's landmark errors (mm, :func:`~dlir.metrics.tre_summary`);
        NaN without landmarks."""
        return tre_summary(np.empty(0) if self.tre is None else self.tre)[stat]


def display_name(method: str) -> str:
    """A method key as the tables show it."""
    if method == IDENTITY:
        return "Before registration"
    base, _, device = method.partition("@")
    name = {"elastix": "elastix", "elastix-mi": "elastix MI", "ants": "ANTs SyN"}.get(base, "DLIR")
    if base == "dlir+accurate":
        name += " accurate"
    elif base.startswith("dlir+refine"):
        name += f" + refine {base[len('dlir+refine'):]}"
    return f"{name} ({device})" if device else name


def methods_in_order(scores: Sequence[Score]) -> list[str]:
    return list(dict.fromkeys(s.method for s in scores))
