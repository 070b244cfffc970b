"""Figures of an evaluation (matplotlib, Agg backend, PNG): Dice box plots per label, TRE before
and after, Jacobian histograms, and per pair a panel of the central slices of the three axes.

Slices are shown in the fixed image's voxel grid (index space) with the aspect ratio of its
spacing, so anisotropic images look right; for oblique images the axes are the grid's, not LPS.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..metrics import jacobian_determinant_image
from ..pairs import PairData
from .scores import IDENTITY, MethodOutput, Score, display_name, methods_in_order


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colours(methods: Sequence[str]) -> dict[str, str]:
    palette = ["#9e9e9e", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def dice_boxplot(scores: Sequence[Score], path: Path) -> Path | None:
    """Box plots of Dice per label (over pairs), one box per method; ``None`` when there are no labels."""
    labels = sorted({k for s in scores for k in s.labels})
    if not labels:
        return None
    plt = _pyplot()
    methods = methods_in_order(scores)
    colours = _colours(methods)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(labels) * len(methods) * 0.6 + 2), 4))
    for m, method in enumerate(methods):
        for li, label in enumerate(labels):
            values = [s.labels[label]["dice"] for s in scores if s.method == method and label in s.labels]
            if not values:
                continue
            x = li + (m - (len(methods) - 1) / 2) * width
            box = ax.boxplot([values], positions=[x], widths=width * 0.9, patch_artist=True, showfliers=False)
            box["boxes"][0].set_facecolor(colours[method])
            box["boxes"][0].set_alpha(0.6)
            ax.scatter(np.full(len(values), x), values, s=10, color="k", zorder=3)
    ax.set_xticks(range(len(labels)), [f"label {k}" for k in labels])
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1.02)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[m], alpha=0.6) for m in methods],
              labels=[display_name(m) for m in methods], loc="lower right", fontsize=8)
    ax.set_title("Dice per label (box: pairs)")
    return _save(fig, path, plt)


def tre_plot(scores: Sequence[Score], path: Path) -> Path | None:
    """Box plots of the landmark errors (mm) per pair, before and after each method; ``None`` without landmarks."""
    with_points = [s for s in scores if s.tre is not None]
    if not with_points:
        return None
    plt = _pyplot()
    pairs = list(dict.fromkeys(s.pair for s in with_points))
    methods = methods_in_order(with_points)
    colours = _colours(methods)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(pairs) + 2), 4))
    for m, method in enumerate(methods):
        for p, pair in enumerate(pairs):
            found = [s for s in with_points if s.method == method and s.pair == pair]
            if not found:
                continue
            box = ax.boxplot([found[0].tre], positions=[p + (m - (len(methods) - 1) / 2) * width], widths=width * 0.9,
                             patch_artist=True, flierprops={"markersize": 2})
            box["boxes"][0].set_facecolor(colours[method])
            box["boxes"][0].set_alpha(0.6)
    ax.set_xticks(range(len(pairs)), pairs, rotation=15, fontsize=8)
    ax.set_ylabel("target registration error (mm)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[m], alpha=0.6) for m in methods],
              labels=[display_name(m) for m in methods], fontsize=8)
    ax.set_title("Landmark error before and after registration")
    return _save(fig, path, plt)


def jacobian_histograms(scores: Sequence[Score], path: Path) -> Path | None:
    """Histograms of det J inside each pair's evaluation mask, one panel per pair; ``None`` without fields."""
    with_det = [s for s in scores if s.jacobian_sample is not None and s.method != IDENTITY]
    if not with_det:
        return None
    plt = _pyplot()
    pairs = list(dict.fromkeys(s.pair for s in with_det))
    methods = methods_in_order(scores)
    colours = _colours(methods)
    cols = min(len(pairs), 3)
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    for ax, pair in zip(axes.ravel()[: len(pairs)], pairs, strict=True):
        found = [s for s in with_det if s.pair == pair]
        values = np.concatenate([s.jacobian_sample for s in found])  # type: ignore[misc]
        lo, hi = min(float(np.percentile(values, 0.1)), 0.0) - 0.05, max(float(np.percentile(values, 99.9)), 1.5)
        bins = np.linspace(lo, hi, 80)
        for s in found:
            ax.hist(s.jacobian_sample, bins=bins, histtype="step", color=colours[s.method], label=display_name(s.method))
        ax.axvline(0.0, color="red", lw=1)
        ax.set_yscale("log")
        ax.set_title(pair, fontsize=9)
        ax.set_xlabel("det J")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(pairs):]:
        ax.axis("off")
    fig.suptitle("Jacobian determinant inside the evaluation mask (red line: folding at det J <= 0)", fontsize=10)
    return _save(fig, path, plt)


def pair_panels(data: PairData, outputs: dict[str, MethodOutput], folder: Path) -> list[Path]:
    """One :func:`pair_panel` per registration method of a pair (not the identity): ``folder/PAIR_METHOD.png``."""
    return [pair_panel(data, method, output, folder / f"{data.pair.id}_{method}.png")
            for method, output in outputs.items() if method != IDENTITY]


def pair_panel(data: PairData, method: str, output: MethodOutput, path: Path) -> Path:
    """Central slices of the three axes: fixed, moving, warped, checkerboard, Jacobian (folding in red)."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    fixed = sitk.GetArrayFromImage(data.fixed).astype(np.float32)
    moving_on_fixed = sitk.Resample(sitk.Cast(data.moving, sitk.sitkFloat32), data.fixed, sitk.Transform(), sitk.sitkLinear, 0.0)
    moving = sitk.GetArrayFromImage(moving_on_fixed)
    warped = sitk.GetArrayFromImage(output.warped).astype(np.float32)
    det = (np.ones_like(fixed) if output.displacement is None
           else sitk.GetArrayFromImage(jacobian_determinant_image(output.displacement)).astype(np.float32))
    lo, hi = np.percentile(fixed, [0.5, 99.5])
    scale = max(float(hi - lo), 1e-6)
    fixed_n, moving_n, warped_n = ((a - lo) / scale for a in (fixed, moving, warped))
    sx, sy, sz = data.fixed.GetSpacing()
    d, h, w = fixed.shape
    # (name, slicer, aspect = row spacing / column spacing, flip rows so superior is up)
    views = [("axial (k)", lambda a: a[d // 2], sy / sx, False),
             ("coronal (j)", lambda a: a[:, h // 2], sz / sx, True),
             ("sagittal (i)", lambda a: a[:, :, w // 2], sz / sy, True)]
    columns = ["fixed", "moving (before)", f"warped: {display_name(method)}", "checkerboard fixed / warped",
               "det J (folding red)"]
    fig, axes = plt.subplots(3, 5, figsize=(16, 9.5))
    for r, (view, cut, aspect, flip) in enumerate(views):
        images = [cut(fixed_n), cut(moving_n), cut(warped_n), _checkerboard(cut(fixed_n), cut(warped_n))]
        for c, image in enumerate(images):
            axes[r, c].imshow(image[::-1] if flip else image, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        jac = cut(det)
        jac = jac[::-1] if flip else jac
        shown = axes[r, 4].imshow(jac, cmap="viridis", vmin=0, vmax=2, aspect=aspect, interpolation="nearest")
        fold = np.ma.masked_where(jac > 0, np.ones_like(jac))
        axes[r, 4].imshow(fold, cmap=ListedColormap(["red"]), aspect=aspect, interpolation="nearest")
        axes[r, 0].set_ylabel(view)
    for c, title in enumerate(columns):
        axes[0, c].set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes[:, 4].tolist(), shrink=0.6, label="det J")
    fig.suptitle(f"{data.pair.id}: {display_name(method)}", fontsize=11)
    return _save(fig, path, plt)


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    rows = (np.arange(a.shape[0]) * tiles // max(a.shape[0], 1)) % 2
    cols = (np.arange(a.shape[1]) * tiles // max(a.shape[1], 1)) % 2
    return np.where((rows[:, None] + cols[None, :]) % 2 == 0, a, b)


def _save(fig, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path
