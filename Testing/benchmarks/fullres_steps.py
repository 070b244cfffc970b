#!/usr/bin/env python3
"""Full-resolution steps before / after the separable evaluation (issue 28), as ratios within one process.

Registers a pair once (one shot, or ``--refine auto``) to get its transform, then times the
full-resolution pass (:func:`dlir.fullres.full_resolution`: warped image, labels, Jacobian map and
statistics) with the transform evaluated separably, det J analytic and labels sampled by
``grid_sample`` (:mod:`dlir.separable`, what the engine does) and with the pointwise evaluation, central
differences and labels gathered by index that it replaced (still the engine's path for transforms it
cannot evaluate separably, and for labels with one-hot-linear interpolation), interleaved, best of ``--repeats``;
then writes the outputs both ways.  Prints the step times, their ratios and how far the outputs
differ.  Absolute times depend on the machine's load; compare the ratios of one run.

    PYTHONPATH=DLIRRegistration python Testing/benchmarks/fullres_steps.py FIXED MOVING --labels MOVING_LABELS \\
        --stack chest-ct [--refine auto] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from dlir import fullres
from dlir.register import register
from dlir.stack import load_stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixed", type=Path)
    parser.add_argument("moving", type=Path)
    parser.add_argument("--labels", type=Path, help="moving label map")
    parser.add_argument("--stack", default="chest-ct")
    parser.add_argument("--refine", default="0", help="0 (one shot) or auto (accurate mode)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--slices", type=int, default=24, help="slices of the fixed grid timed (0: all)")
    args = parser.parse_args()
    fixed, moving = sitk.ReadImage(str(args.fixed)), sitk.ReadImage(str(args.moving))
    labels = None if args.labels is None else sitk.ReadImage(str(args.labels))
    refine = args.refine if args.refine == "auto" else int(args.refine)
    t0 = time.perf_counter()
    reg = register(fixed, moving, load_stack(args.stack), device="cpu", refine=refine, outputs=())
    print(f"registration (no outputs): {time.perf_counter() - t0:.2f} s; steps {reg.timings}")
    assert reg.transform is not None and reg.grid is not None and reg.output_grid is not None
    moving_voxels = sitk.GetArrayViewFromImage(moving)
    moving_grid = fullres.Grid.from_image(moving).translated(np.asarray(reg.grid.origin) - np.asarray(reg.output_grid.origin))
    grid, output_grid = reg.grid, reg.output_grid
    if 0 < args.slices < grid.size[2]:
        grid, output_grid = (_band(g, args.slices) for g in (grid, output_grid))
    separable_of = fullres.SeparableTransform.of
    print("separable evaluation applies:", separable_of(reg.transform, reg.grid, moving_grid, torch.device("cpu")) is not None)

    exact_codes = fullres._EXACT_FLOAT_CODES

    def run(variant: str) -> tuple[fullres.FullResolution, float]:
        """``separable``: the engine; ``pointwise``: the pass it replaced (pointwise evaluation, central differences,
        labels gathered by index)."""
        fullres.SeparableTransform.of = separable_of if variant == "separable" else (lambda *a, **k: None)  # type: ignore[method-assign]
        fullres._EXACT_FLOAT_CODES = exact_codes if variant == "separable" else 0
        try:
            t = time.perf_counter()
            with torch.no_grad():
                out = fullres.full_resolution(reg.transform, grid, output_grid, torch.device("cpu"), moving=moving_voxels,
                                              moving_grid=moving_grid, moving_labels=labels, jacobian=True, statistics=True)
            return out, time.perf_counter() - t
        finally:
            fullres.SeparableTransform.of = separable_of  # type: ignore[method-assign]
            fullres._EXACT_FLOAT_CODES = exact_codes

    best: dict[str, dict[str, float]] = {}
    results: dict[str, fullres.FullResolution] = {}
    for _ in range(args.repeats):
        for variant in ("pointwise", "separable"):
            out, total = run(variant)
            times = {"warp": total - out.jacobian_s, "jacobian": out.jacobian_s}
            best[variant] = {k: min(v, best.get(variant, {}).get(k, np.inf)) for k, v in times.items()}
            results[variant] = out
    print(f"{grid.size[2]} slices of {grid.size[0]} x {grid.size[1]}; best of {args.repeats}")
    print(f"{'step':10s} {'pointwise (s)':>14s} {'separable (s)':>14s} {'ratio':>7s}")
    for step in ("warp", "jacobian"):
        a, b = best["pointwise"][step], best["separable"][step]
        print(f"{step:10s} {a:14.2f} {b:14.2f} {a / b:6.1f}x")
    a, b = (sum(best[v][s] for s in ("warp", "jacobian")) for v in ("pointwise", "separable"))
    print(f"{'warp+jac':10s} {a:14.2f} {b:14.2f} {a / b:6.1f}x")
    p, s = results["pointwise"], results["separable"]
    det_p, det_s = (sitk.GetArrayViewFromImage(r.jacobian) for r in (p, s))
    diff = np.abs(det_p.astype(np.float64) - det_s)
    print(f"det J: |analytic - central differences| mean {diff.mean():.2e}, 99.9 % {np.quantile(diff, 0.999):.2e}, "
          f"max {diff.max():.2e}; folding {p.folding_fraction:.2e} / {s.folding_fraction:.2e}, "
          f"std {p.jacobian_std:.4f} / {s.jacobian_std:.4f}")
    w_p, w_s = (sitk.GetArrayViewFromImage(r.warped).astype(np.float64) for r in (p, s))
    print(f"warped: max |difference| {np.abs(w_p - w_s).max():.3g} (of a range {np.ptp(w_p):.3g}), "
          f"voxels differing {np.mean(w_p != w_s):.2e}")
    if labels is not None:
        l_p, l_s = (sitk.GetArrayViewFromImage(r.labels) for r in (p, s))
        print(f"labels: voxels differing {np.mean(l_p != l_s):.2e}")


def _band(grid: fullres.Grid, slices: int) -> fullres.Grid:
    """The ``slices`` middle slices (along k) of ``grid`` as a grid of their own."""
    k0 = (grid.size[2] - slices) // 2
    origin = np.asarray(grid.origin) + grid.direction_matrix[:, 2] * grid.spacing[2] * k0
    return fullres.Grid((grid.size[0], grid.size[1], slices), grid.spacing, tuple(origin.tolist()), grid.direction)


if __name__ == "__main__":
    main()
