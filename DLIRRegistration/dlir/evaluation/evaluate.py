"""Paper-style evaluation (de Vos et al. 2019, section 4): score registrations of evaluation pairs.

Every method (before registration, DLIR with or without refinement, elastix, ANTs SyN) is scored by the
same code from what it produced on the FULL-resolution fixed grid: the fixed -> moving
displacement ``u`` (LPS mm, ``T(x) = x + u(x)``) and the moving labels warped onto the fixed
grid.  Per pair and label: Dice, Hausdorff distance (max and 95th percentile) and average
surface distance (mm).  Per pair: target registration error of the landmarks (mm), error against
a ground-truth displacement (mean and max ``|u - u_gt|`` in mm, over the fixed image and inside
the evaluation mask), folding fraction and std of the Jacobian determinant inside the evaluation
mask (the fixed mask, else the fixed labels, else the whole fixed image), and time per step (s).

Outputs (:func:`write_report`): ``metrics.csv`` (one row per pair x label x method, plus one
``all`` row per pair x method with the pair's means and pair-level numbers), ``timings.csv``,
``summary.md`` (mean ± std over pairs, like the paper's tables) and the plots of
:mod:`dlir.evaluation.plots`.
"""

from __future__ import annotations

import csv
import math
import time
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from ..device import resolve_device
from ..errors import InputError
from ..metrics import (
    folding_fraction,
    jacobian_determinant_image,
    jacobian_std,
    label_metrics,
    target_registration_error,
    transform_points_with_field,
)
from ..pairs import Pair, PairData, load_pair, read_pairs
from ..refine import Refinement
from ..register import register
from ..stack import Stack, load_stack, resolve_stack
from .scores import IDENTITY, LABEL_METRICS, MethodOutput, Score, display_name, methods_in_order

#: at most this many Jacobian values per pair and method are kept for the histograms
_HISTOGRAM_SAMPLES = 200_000


# ------------------------------------------------------------------------------------- scoring
def evaluation_mask(data: PairData) -> sitk.Image | None:
    """Where folding and the Jacobian are evaluated: the fixed mask, else the fixed labels > 0, else ``None`` (all)."""
    source = data.fixed_mask if data.fixed_mask is not None else data.fixed_labels
    if source is None:
        return None
    mask = sitk.Cast(source > 0, sitk.sitkUInt8)
    return mask if sitk.GetArrayViewFromImage(mask).any() else None


def identity_output(data: PairData) -> MethodOutput:
    """Before registration: the moving image and labels resampled as they are onto the fixed grid."""
    warped = sitk.Resample(sitk.Cast(data.moving, sitk.sitkFloat32), data.fixed, sitk.Transform(), sitk.sitkLinear, 0.0)
    labels = None
    if data.moving_labels is not None:
        labels = sitk.Resample(data.moving_labels, data.fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return MethodOutput(None, warped, labels)


def score(data: PairData, method: str, output: MethodOutput) -> Score:
    """Score ``output`` of ``method`` against the pair's labels, landmarks and ground truth."""
    labels: dict[int, dict[str, float]] = {}
    if data.fixed_labels is not None and output.warped_labels is not None:
        reference = sitk.Cast(data.fixed_labels, output.warped_labels.GetPixelID())
        values = _label_values(data.fixed_labels)
        found = label_metrics(reference, output.warped_labels, values)
        labels = {int(k): {m: float(v[m]) for m in LABEL_METRICS} for k, v in found.items()}

    mask = evaluation_mask(data)
    folding = folding_image = jac_std = math.nan
    sample = None
    if output.displacement is not None:
        det = jacobian_determinant_image(output.displacement)
        folding = float(folding_fraction(det, mask))
        folding_image = float(folding_fraction(det))
        jac_std = float(jacobian_std(det, mask))
        sample = _subsample(_inside(sitk.GetArrayFromImage(det), mask))

    return Score(
        pair=data.pair.id,
        method=method,
        labels=labels,
        tre=_tre(data, output.displacement),
        gt_error=_gt_error(data, output.displacement, mask),
        folding_fraction=folding,
        folding_fraction_image=folding_image,
        jacobian_std=jac_std,
        jacobian_sample=sample,
        timings=dict(output.timings),
        time_s=output.time_s if output.displacement is not None else math.nan,
        peak_rss_mb=output.peak_rss_mb,
    )


def _label_values(labels: sitk.Image) -> list[int]:
    return [int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v != 0]


def _inside(values: np.ndarray, mask: sitk.Image | None) -> np.ndarray:
    return values.ravel() if mask is None else values[sitk.GetArrayViewFromImage(mask) > 0]


def _subsample(values: np.ndarray) -> np.ndarray:
    step = max(1, values.size // _HISTOGRAM_SAMPLES)
    return np.asarray(values[::step], dtype=np.float32)


def _tre(data: PairData, displacement: sitk.Image | None) -> np.ndarray | None:
    """Distance (mm) between each fixed landmark mapped by ``T`` and its moving landmark."""
    if data.fixed_points is None or data.moving_points is None:
        return None
    mapped = data.fixed_points if displacement is None else transform_points_with_field(data.fixed_points, displacement)
    return np.asarray(target_registration_error(mapped, data.moving_points), dtype=np.float64)


def _gt_error(data: PairData, displacement: sitk.Image | None, mask: sitk.Image | None) -> dict[str, float]:
    """``|u - u_gt|`` (mm): mean and max over the fixed image and inside the evaluation mask."""
    if data.gt_displacement is None:
        return {}
    truth = sitk.GetArrayViewFromImage(data.gt_displacement).astype(np.float64)
    if truth.shape[:3] != tuple(reversed(data.fixed.GetSize())) or truth.shape[-1] != 3:
        raise InputError(f"the ground-truth displacement of {data.pair.id} is not a 3-vector field on the fixed grid")
    u = 0.0 if displacement is None else sitk.GetArrayViewFromImage(displacement).astype(np.float64)
    error = np.linalg.norm(u - truth, axis=-1)
    inside = _inside(error, mask)
    return {"mean": float(error.mean()), "max": float(error.max()),
            "mask_mean": float(inside.mean()), "mask_max": float(inside.max())}


# ------------------------------------------------------------------------------------- running DLIR
def dlir_method(
    stack_for: Callable[[str], Stack], device: str = "auto", refine: Refinement = 0
) -> Callable[[PairData], MethodOutput]:
    """A method that registers a loaded pair with DLIR in this process (``stack_for(pair_id)`` gives the stack)."""
    def run(data: PairData) -> MethodOutput:
        reg = register(data.fixed, data.moving, stack_for(data.pair.id), moving_labels=data.moving_labels,
                       fixed_mask=data.fixed_mask, device=device, refine=refine)
        return MethodOutput(reg.displacement, reg.warped, reg.warped_labels, dict(reg.timings))

    return run


def method_name(refine: Refinement, device: str = "cpu") -> str:
    """The method key of a DLIR run: ``dlir``, ``dlir+accurate`` (``refine="auto"``), ``dlir+refine50``, with ``@cuda`` on a GPU."""
    name = "dlir" if refine == 0 else "dlir+accurate" if refine == "auto" else f"dlir+refine{refine}"
    return name if device in ("cpu", "auto") else f"{name}@{device}"


def evaluate_pairs(
    pairs: Sequence[Pair],
    methods: dict[str, Callable[[PairData], MethodOutput]],
    on_pair: Callable[[PairData, dict[str, MethodOutput], list[Score]], None] | None = None,
) -> list[Score]:
    """Load each pair, run every method on it, score it and the identity.

    ``on_pair(data, outputs, scores)`` is called after each pair (plots, progress); the outputs are
    then released so memory does not grow with the number of pairs.  The read time of a pair is
    added to every method's timings as ``read``.
    """
    scores: list[Score] = []
    for pair in pairs:
        t = time.perf_counter()
        data = load_pair(pair)
        read_s = time.perf_counter() - t
        outputs = {IDENTITY: identity_output(data)}
        for name, run in methods.items():
            output = run(data)
            output.timings = {"read": read_s, **output.timings}
            outputs[name] = output
        pair_scores = [score(data, name, out) for name, out in outputs.items()]
        scores += pair_scores
        if on_pair is not None:
            on_pair(data, outputs, pair_scores)
    return scores


# ------------------------------------------------------------------------------------- reports
METRIC_COLUMNS = (
    "dice", "hd", "hd95", "asd", "tre_mean", "tre_median", "tre_max", "gt_error_mean", "gt_error_max",
    "gt_error_mask_mean", "gt_error_mask_max", "folding_fraction", "folding_fraction_image", "jacobian_std",
    "time_s", "peak_rss_mb",
)


def metric_rows(scores: Iterable[Score]) -> list[dict[str, object]]:
    """Rows of ``metrics.csv``: one per pair x label x method, then one ``all`` row per pair x method."""
    rows: list[dict[str, object]] = []
    for s in scores:
        for label, values in sorted(s.labels.items()):
            rows.append({"pair": s.pair, "method": s.method, "label": label, **values})
        rows.append({
            "pair": s.pair, "method": s.method, "label": "all",
            **{m: s.label_mean(m) for m in LABEL_METRICS},
            **{f"tre_{k}": s.tre_stat(k) for k in ("mean", "median", "max")},
            **{f"gt_error_{k}": s.gt_error.get(k, math.nan) for k in ("mean", "max", "mask_mean", "mask_max")},
            "folding_fraction": s.folding_fraction, "folding_fraction_image": s.folding_fraction_image,
            "jacobian_std": s.jacobian_std, "time_s": s.time_s,
            "peak_rss_mb": math.nan if s.peak_rss_mb is None else s.peak_rss_mb,
        })
    return rows


def _csv_value(value: object) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def write_metrics_csv(scores: Sequence[Score], path: Path) -> Path:
    """``metrics.csv``: see :func:`metric_rows`; empty cells where a number does not apply."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["pair", "method", "label", *METRIC_COLUMNS], restval="")
        writer.writeheader()
        for row in metric_rows(scores):
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return path


def write_timings_csv(scores: Sequence[Score], path: Path) -> Path:
    """``timings.csv``: one row per pair x method x step (seconds)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["pair", "method", "step", "seconds"])
        for s in scores:
            for step, seconds in s.timings.items():
                writer.writerow([s.pair, s.method, step, f"{seconds:.4f}"])
    return path


def mean_std(values: Iterable[float], scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` of the finite values (``–`` when there are none)."""
    finite = np.asarray([v * scale for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return "–"
    if finite.size == 1:
        return f"{finite[0]:.{digits}f}"
    return f"{finite.mean():.{digits}f} ± {finite.std(ddof=1):.{digits}f}"


def summary_table(scores: Sequence[Score]) -> list[str]:
    """The paper-style table: one row per method, mean ± std over pairs (label metrics: each pair's mean first)."""
    header = ("| method | Dice | HD (mm) | HD95 (mm) | ASD (mm) | TRE mean (mm) | TRE median (mm) | "
              "\\|u − u_gt\\| mean (mm) | folding (%) | std Jacobian | time (s) |")
    lines = [header, "|" + " --- |" * 11]
    for method in methods_in_order(scores):
        rows = [s for s in scores if s.method == method]
        cells = [
            mean_std([s.label_mean("dice") for s in rows], digits=3),
            mean_std([s.label_mean("hd") for s in rows]),
            mean_std([s.label_mean("hd95") for s in rows]),
            mean_std([s.label_mean("asd") for s in rows]),
            mean_std([s.tre_stat("mean") for s in rows]),
            mean_std([s.tre_stat("median") for s in rows]),
            mean_std([s.gt_error.get("mean", math.nan) for s in rows]),
            mean_std([s.folding_fraction for s in rows], scale=100, digits=3),
            mean_std([s.jacobian_std for s in rows], digits=3),
            mean_std([s.time_s for s in rows]),
        ]
        lines.append(f"| {display_name(method)} | " + " | ".join(cells) + " |")
    return lines


def per_pair_table(scores: Sequence[Score]) -> list[str]:
    """One row per pair x method: Dice per label, HD95, TRE, ground-truth error, folding, time."""
    lines = ["| pair | method | Dice per label | HD95 (mm) | TRE mean / median / max (mm) | \\|u − u_gt\\| mean / max (mm) | "
             "folding (%) | std Jacobian | time (s) |", "|" + " --- |" * 9]
    for s in scores:
        dice = ", ".join(f"{k}: {v['dice']:.3f}" for k, v in sorted(s.labels.items())) or "–"
        tre = "–" if s.tre is None else " / ".join(f"{s.tre_stat(k):.2f}" for k in ("mean", "median", "max"))
        gt = "–" if not s.gt_error else f"{s.gt_error['mean']:.2f} / {s.gt_error['max']:.2f}"
        lines.append(f"| {s.pair} | {display_name(s.method)} | {dice} | {_fmt(s.label_mean('hd95'))} | {tre} | {gt} | "
                     f"{_fmt(100 * s.folding_fraction, 3)} | {_fmt(s.jacobian_std, 3)} | {_fmt(s.time_s)} |")
    return lines


def step_table(scores: Sequence[Score]) -> list[str]:
    """Mean time per step (s) over pairs, one row per method."""
    lines = ["| method | time per step, mean over pairs (s) |", "| --- | --- |"]
    for method in methods_in_order(scores):
        if method == IDENTITY:
            continue
        rows = [s for s in scores if s.method == method]
        steps = list(dict.fromkeys(k for s in rows for k in s.timings))
        parts = [f"{k} {np.mean([s.timings.get(k, 0.0) for s in rows]):.3f}" for k in steps]
        lines.append(f"| {display_name(method)} | {', '.join(parts)} |")
    return lines


def _fmt(value: float, digits: int = 2) -> str:
    return "–" if not math.isfinite(value) else f"{value:.{digits}f}"


def write_summary(scores: Sequence[Score], path: Path, title: str, notes: Sequence[str] = ()) -> Path:
    """``summary.md``: the paper-style table, the per-pair table and the time per step."""
    n_pairs = len({s.pair for s in scores})
    lines = [f"# {title}", "", *notes, "" if notes else "",
             f"Mean ± std over {n_pairs} pair(s); Dice, HD, HD95 and ASD are first averaged over each pair's labels. "
             "Distances in mm; folding = share of det J <= 0 inside the fixed mask (else the fixed labels); "
             "time = read + registration steps (+ write where measured end to end).", "",
             *summary_table(scores), "", "## Per pair", "", *per_pair_table(scores), "",
             "## Time per step", "", *step_table(scores), ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_report(scores: Sequence[Score], out: Path, title: str, notes: Sequence[str] = (), plots: bool = True) -> list[Path]:
    """Write ``metrics.csv``, ``timings.csv``, ``summary.md`` and (with ``plots``) the summary figures into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [write_metrics_csv(scores, out / "metrics.csv"), write_timings_csv(scores, out / "timings.csv"),
               write_summary(scores, out / "summary.md", title, notes)]
    if plots:
        from .plots import dice_boxplot, jacobian_histograms, tre_plot

        written += [dice_boxplot(scores, out / "dice_boxplot.png"), tre_plot(scores, out / "tre.png"),
                    jacobian_histograms(scores, out / "jacobian_histograms.png")]
    return [p for p in written if p is not None]


# ------------------------------------------------------------------------------------- command
def stack_chooser(choices: Sequence[str]) -> Callable[[str], Path]:
    """``pair id -> stack file`` from ``--stack`` values ``[PATTERN=]STACK``.

    A value with a shell-style pattern (``lung*=chest-ct``) applies to the pairs whose id matches
    it; the first matching pattern wins; a value without a pattern is the default.  ``STACK`` is a
    file or a registry name.
    """
    rules: list[tuple[str | None, Path]] = []
    for value in choices:
        pattern, sep, stack = value.rpartition("=")
        rules.append((pattern if sep and pattern else None, resolve_stack(stack)))
    default = next((path for pattern, path in rules if pattern is None), None)

    def choose(pair_id: str) -> Path:
        for pattern, path in rules:
            if pattern is not None and fnmatchcase(pair_id, pattern):
                return path
        if default is None:
            raise InputError(f"no --stack applies to the pair {pair_id}; add a default --stack without a pattern")
        return default

    return choose


def stack_loader(choose: Callable[[str], Path]) -> Callable[[str], Stack]:
    """``pair id -> loaded Stack``, each file loaded once."""
    loaded: dict[Path, Stack] = {}

    def get(pair_id: str) -> Stack:
        path = choose(pair_id)
        if path not in loaded:
            loaded[path] = load_stack(path)
        return loaded[path]

    return get


def evaluate_command(pairs_source: str, stacks: Sequence[str], out: Path, refine: Refinement = 0,
                     device: str = "auto", plots: bool = True, panels: bool = True) -> list[Score]:
    """``dlir evaluate``: run DLIR on every pair, score it beside the identity, write the report into ``out``."""
    pairs = read_pairs(pairs_source)
    choose = stack_chooser(stacks)
    for pair in pairs:
        choose(pair.id)  # fail before any work when a pair has no stack
    target = str(resolve_device(device))
    name = method_name(refine, target)
    methods = {name: dlir_method(stack_loader(choose), target, refine)}

    def on_pair(data: PairData, outputs: dict[str, MethodOutput], pair_scores: list[Score]) -> None:
        if plots and panels:
            from .plots import pair_panels

            pair_panels(data, outputs, out / "panels")

    scores = evaluate_pairs(pairs, methods, on_pair)
    used = sorted({str(choose(p.id)) for p in pairs})
    mode = "one shot" if refine == 0 else "accurate mode (refinement to convergence)" if refine == "auto" else f"refinement {refine} steps"
    notes = [f"Stack(s): {', '.join(used)}; device {target}; {mode}.",
             f"Pairs: {pairs_source}."]
    write_report(scores, out, "DLIR evaluation", notes, plots)
    return scores
