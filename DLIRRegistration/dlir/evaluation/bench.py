"""``dlir bench``: DLIR against elastix and ANTs SyN on the same pairs, one after the other in one run.

Each method runs in its own fresh process (:mod:`dlir.evaluation.measure`): read, register, write, with its
peak memory.  All are scored by the same code (:mod:`dlir.evaluation.evaluate`).  Printed: one comparison
table (Dice, HD95, TRE, folding, time and the speed ratio elastix / method) and a scaling table
(time and peak memory of each method for one pair resampled to several cubic sizes).

Methods: DLIR on the CPU (and on the GPU when PyTorch sees one), DLIR refined when ``refine`` is
``"auto"`` (accurate mode) or a number of steps, elastix with the paper's settings (:mod:`dlir.evaluation.elastix`),
then ANTs SyN with ANTsPy's defaults (:mod:`dlir.evaluation.ants`) when ``antspyx`` is installed (else
skipped, with a line saying how to install it).  Elastix is the reference of the speed ratios.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import InputError
from ..pairs import Pair, load_pair, read_pairs, sample_pair
from ..refine import Refinement
from .ants import INSTALL_HINT as ANTS_INSTALL_HINT
from .ants import AntsSettings, ants_available
from .elastix import INSTALL_HINT, MI_METRIC, ElastixMissingError, ElastixSettings, elastix_available
from .evaluate import identity_output, method_name, score, stack_chooser, write_report
from .measure import Measurement, RunSpec, measure
from .scores import IDENTITY, MethodOutput, Score, display_name

ELASTIX = "elastix"
ELASTIX_MI = "elastix-mi"
ANTS = "ants"
#: cubic grid sizes (voxels per side) of the scaling table
SIZES = (64, 128, 192, 256)
QUICK_SIZES = (24, 32, 40, 48)


@dataclass
class BenchConfig:
    """What ``dlir bench`` runs.  ``stack_for(pair id)`` is the stack file of a pair; ``ants`` is ``None`` to skip ANTs.

    ``elastix_repeats``: timed runs of each conventional baseline's registration (elastix and ANTs).
    ``elastix_mi``: elastix again with Mattes mutual information (the baseline for different contrasts), ``None``
    to skip it; ``similarity``: DLIR's ``--similarity``.
    """

    pairs: Sequence[Pair]
    stack_for: Callable[[str], Path]
    out: Path
    refine: Refinement = 0
    devices: tuple[str, ...] = ("cpu",)
    elastix: ElastixSettings = field(default_factory=ElastixSettings)
    elastix_mi: ElastixSettings | None = None
    ants: AntsSettings | None = None
    threads: int = 2
    dlir_repeats: int = 3
    elastix_repeats: int = 1
    sizes: tuple[int, ...] = SIZES
    scaling_pair: str | None = None
    similarity: str = "auto"


@dataclass
class ScalingRow:
    """Time (s) and peak memory (MiB) of one method on the scaling pair at ``size``^3 voxels."""

    size: int
    method: str
    time_s: float
    peak_rss_mb: float
    baseline_rss_mb: float


def gpu_devices() -> tuple[str, ...]:
    """``("cuda",)`` when PyTorch sees a GPU, else ``()``."""
    import torch

    return ("cuda",) if torch.cuda.is_available() else ()


def check_elastix() -> None:
    """Raise :class:`ElastixMissingError` (with how to install it) when itk-elastix is missing."""
    if not elastix_available():
        raise ElastixMissingError(INSTALL_HINT)


def ants_settings(quick: bool, threads: int, log: Callable[[str], None]) -> AntsSettings | None:
    """ANTs SyN's settings for a bench (quick: :meth:`AntsSettings.quick`), or ``None`` when ``antspyx`` is
    missing: then ``log`` gets one line saying ANTs is skipped and how to install it."""
    if not ants_available():
        log(f"ANTs SyN skipped: {ANTS_INSTALL_HINT}")
        return None
    return AntsSettings.quick(threads) if quick else AntsSettings(threads=threads)


def _specs(config: BenchConfig, pair: Pair, folder: Path, stack: Path) -> dict[str, RunSpec]:
    """The measured runs of one pair (registered with ``stack``), by method key."""
    common = dict(fixed=str(pair.fixed), moving=str(pair.moving), threads=config.threads,
                  moving_labels=None if pair.moving_labels is None else str(pair.moving_labels))
    specs: dict[str, RunSpec] = {}
    for device in config.devices:
        for refine in dict.fromkeys([0, config.refine]):  # one shot, then the refined run when asked for
            key = method_name(refine, device)
            specs[key] = RunSpec("dlir", out=str(folder / key), stack=str(stack), device=device, refine=refine,
                                 similarity=config.similarity, repeats=config.dlir_repeats, **common)  # type: ignore[arg-type]
    specs[ELASTIX] = RunSpec("elastix", out=str(folder / ELASTIX), elastix=asdict(config.elastix),
                             repeats=config.elastix_repeats, **common)  # type: ignore[arg-type]
    if config.elastix_mi is not None:
        specs[ELASTIX_MI] = RunSpec("elastix", out=str(folder / ELASTIX_MI), elastix=asdict(config.elastix_mi),
                                    repeats=config.elastix_repeats, **common)  # type: ignore[arg-type]
    if config.ants is not None:
        specs[ANTS] = RunSpec("ants", out=str(folder / ANTS), ants=asdict(config.ants),
                              repeats=config.elastix_repeats, **common)  # type: ignore[arg-type]
    return specs


def read_run_output(folder: Path, measurement: Measurement) -> MethodOutput:
    """The outputs a measured run wrote (see :mod:`dlir.evaluation.measure`) as a :class:`MethodOutput`."""
    warped = sitk.ReadImage(str(folder / "warped.nii.gz"), sitk.sitkFloat32)
    # DLIR writes a compact composite (stages on their network grids), elastix a dense field, ANTs its affine and SyN
    # field: all sampled on the fixed grid
    transform = sitk.ReadTransform(str(folder / "transform.h5"))
    displacement = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat32, warped.GetSize(), warped.GetOrigin(),
                                                     warped.GetSpacing(), warped.GetDirection())
    labels = folder / "labels.nii.gz"
    return MethodOutput(
        displacement=displacement,
        warped=warped,
        warped_labels=sitk.ReadImage(str(labels)) if labels.is_file() else None,
        timings=measurement.timings,
        total_s=measurement.warm_s,
        peak_rss_mb=measurement.peak_rss_mb,
    )


def run_pairs(config: BenchConfig, log: Callable[[str], None] = lambda _: None,
              on_pair: Callable[..., None] | None = None) -> tuple[list[Score], dict[tuple[str, str], Measurement]]:
    """Run every method on every pair (one after the other) and score them beside the identity."""
    scores: list[Score] = []
    measurements: dict[tuple[str, str], Measurement] = {}
    for pair in config.pairs:
        data = load_pair(pair)
        outputs = {IDENTITY: identity_output(data)}
        for key, spec in _specs(config, pair, config.out / "runs" / pair.id, config.stack_for(pair.id)).items():
            log(f"{pair.id}: {display_name(key)} ...")
            m = measure(spec)
            measurements[(pair.id, key)] = m
            outputs[key] = read_run_output(Path(spec.out), m)
            log(f"{pair.id}: {display_name(key)} {m.warm_s:.2f} s (cold {m.cold_s:.2f} s), peak {m.peak_rss_mb:.0f} MiB")
        pair_scores = [score(data, key, output) for key, output in outputs.items()]
        scores += pair_scores
        if on_pair is not None:
            on_pair(data, outputs, pair_scores)
    return scores, measurements


# ------------------------------------------------------------------------------------- scaling
def resample_cubic(image: sitk.Image, size: int, interpolator: int) -> sitk.Image:
    """``image`` resampled to ``size``^3 voxels covering the same physical box (voxel edges), same direction."""
    old_size = np.asarray(image.GetSize(), dtype=np.float64)
    old_spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    spacing = old_size * old_spacing / size
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.asarray(image.GetOrigin()) + direction @ ((spacing - old_spacing) / 2)
    pixel = sitk.sitkFloat32 if interpolator != sitk.sitkNearestNeighbor else image.GetPixelID()
    source = sitk.Cast(image, sitk.sitkFloat32) if pixel == sitk.sitkFloat32 else image
    return sitk.Resample(source, [size] * 3, sitk.Transform(), interpolator, origin.tolist(), spacing.tolist(),
                         image.GetDirection(), 0.0, pixel)


def scaled_pair(pair: Pair, size: int, folder: Path) -> Pair:
    """``pair``'s fixed and moving images (and moving labels) at ``size``^3 voxels, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for name, path, interp in (("fixed", pair.fixed, sitk.sitkLinear), ("moving", pair.moving, sitk.sitkLinear),
                               ("moving_labels", pair.moving_labels, sitk.sitkNearestNeighbor)):
        if path is None:
            continue
        files[name] = folder / f"{name}.nii.gz"
        sitk.WriteImage(resample_cubic(sitk.ReadImage(str(path)), size, interp), str(files[name]), useCompression=True)
    return Pair(id=f"{pair.id}@{size}", **files)  # type: ignore[arg-type]


def run_scaling(config: BenchConfig, log: Callable[[str], None] = lambda _: None) -> list[ScalingRow]:
    """Time and peak memory of every method on one pair resampled to each of ``config.sizes``."""
    base = next((p for p in config.pairs if p.id == config.scaling_pair), None) if config.scaling_pair else config.pairs[0]
    if base is None:
        raise InputError(f"the scaling pair {config.scaling_pair} is not among the pairs")
    rows: list[ScalingRow] = []
    for size in config.sizes:
        folder = config.out / "scaling" / str(size)
        pair = scaled_pair(base, size, folder / "inputs")
        for key, spec in _specs(config, pair, folder, config.stack_for(base.id)).items():
            log(f"scaling {size}^3: {display_name(key)} ...")
            m = measure(spec)
            rows.append(ScalingRow(size, key, m.warm_s, m.peak_rss_mb, m.baseline_rss_mb))
    return rows


# ------------------------------------------------------------------------------------- tables
def _cell(value: float, digits: int = 2) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def comparison_table(scores: Sequence[Score], measurements: dict[tuple[str, str], Measurement]) -> list[str]:
    """The one comparison table (markdown): per pair and method, then the means over pairs.

    Folding and std det J are taken inside the evaluation mask (the fixed labels).
    Time = end to end (read, register, write) in a fresh process after loading: the fastest
    repetition after the first (warm); ``register`` = that minus reading and writing; ``cold`` =
    the first repetition.
    Speed = elastix time / method time (for the means: total elastix time / total method time).
    """
    lines = ["| pair | method | Dice | HD95 (mm) | TRE mean (mm) | folding (%) | std det J | time (s) | register (s) | "
             "cold (s) | peak RSS (MiB) | speed vs elastix |", "|" + " --- |" * 12]
    methods = list(dict.fromkeys(s.method for s in scores))
    pairs = list(dict.fromkeys(s.pair for s in scores))
    groups = [(p, [p]) for p in pairs] + ([(f"mean of {len(pairs)}", pairs)] if len(pairs) > 1 else [])
    for title, members in groups:
        for method in methods:
            chosen = [x for x in scores if x.pair in members and x.method == method]
            ms = [measurements[(p, method)] for p in members if (p, method) in measurements]
            elx = [measurements[(p, ELASTIX)] for p in members if (p, ELASTIX) in measurements]
            if chosen:
                cells = _comparison_cells(method, chosen, ms, elx)
                lines.append(f"| {title} | {display_name(method)} | " + " | ".join(cells) + " |")
    return lines


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _comparison_cells(method: str, chosen: Sequence[Score], ms: Sequence[Measurement], elx: Sequence[Measurement]) -> list[str]:
    cells = [_cell(_mean([x.label_mean("dice") for x in chosen]), 3), _cell(_mean([x.label_mean("hd95") for x in chosen])),
             _cell(_mean([x.tre_stat("mean") for x in chosen]))]
    if method == IDENTITY or not ms:
        return cells + ["–"] * 7
    warm = sum(m.warm_s for m in ms)
    gpu = [m.gpu_peak_mb for m in ms if m.gpu_peak_mb is not None]
    if method == ELASTIX:
        speed = "1"
    else:
        speed = f"{sum(m.warm_s for m in elx) / warm:.1f}x" if len(elx) == len(ms) and warm > 0 else "–"
    return cells + [
        _cell(100 * _mean([x.folding_fraction for x in chosen]), 3),
        _cell(_mean([x.jacobian_std for x in chosen]), 3),
        _cell(warm / len(ms)),
        _cell(_mean([m.warm_s - m.timings.get("read", 0.0) - m.timings.get("write", 0.0) for m in ms])),
        _cell(_mean([m.cold_s for m in ms])),
        f"{max(m.peak_rss_mb for m in ms):.0f}" + (f" (GPU {max(gpu):.0f})" if gpu else ""),
        speed,
    ]


def scaling_table(rows: Sequence[ScalingRow]) -> list[str]:
    """Markdown: one row per size, time (s) and peak RSS (MiB) of each method, and the speed ratio against elastix."""
    methods = list(dict.fromkeys(r.method for r in rows))
    header = "| size (voxels) | " + " | ".join(f"{display_name(m)} time (s) | {display_name(m)} peak (MiB)" for m in methods)
    others = [m for m in methods if m != ELASTIX]
    header += "".join(f" | speed {display_name(m)} vs elastix" for m in others) + " |"
    lines = [header, "|" + " --- |" * (1 + 2 * len(methods) + len(others))]
    for size in dict.fromkeys(r.size for r in rows):
        by = {r.method: r for r in rows if r.size == size}
        cells = [f"{size}³ = {size ** 3 / 1e6:.2f} M"]
        cells += [f"{_cell(by[m].time_s)} | {by[m].peak_rss_mb:.0f}" if m in by else "– | –" for m in methods]
        for m in others:
            ok = m in by and ELASTIX in by and by[m].time_s > 0
            cells.append(f"{by[ELASTIX].time_s / by[m].time_s:.1f}x" if ok else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def default_out() -> Path:
    """A new temporary folder for the runs when ``--out`` is not given."""
    return Path(tempfile.mkdtemp(prefix="dlir-bench-"))


def environment() -> list[str]:
    """Versions and hardware the numbers were measured with (one markdown line)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    return [f"Versions: dlir {__version__}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"SimpleITK {v('SimpleITK')}, itk-elastix {v('itk-elastix')} (itk {v('itk')}), antspyx {v('antspyx')}, "
            f"numpy {v('numpy')}; "
            f"CPU {cpu}, {os.cpu_count()} logical cores; GPU {gpu}; {platform.system()} {platform.release()}; "
            f"load average (1 / 5 / 15 min) when the report was written: {load}."]


def write_bench_report(config: BenchConfig, scores: Sequence[Score], comparison: Sequence[str], scaling: Sequence[str],
                       plots: bool) -> list[Path]:
    """The evaluation report (metrics.csv, summary.md, plots) plus ``bench.md`` with the two tables."""
    ants = f"ANTs SyN: {config.ants.describe()}." if config.ants is not None else f"ANTs SyN: skipped ({ANTS_INSTALL_HINT})."
    mi = [f"elastix MI: {config.elastix_mi.describe()}."] if config.elastix_mi is not None else []
    notes = [f"elastix: {config.elastix.describe()}.", *mi, ants,
             f"DLIR stacks: {', '.join(sorted({str(config.stack_for(p.id)) for p in config.pairs}))}; similarity "
             f"{config.similarity}; threads {config.threads}.",
             *environment()]
    title = "DLIR vs elastix" + (" and ANTs SyN" if config.ants is not None else "")
    written = write_report(scores, config.out, title, notes, plots)
    bench_md = config.out / "bench.md"
    bench_md.write_text("\n".join([f"# {title}", "", *notes, "", *comparison, "", "## Scaling", "", *scaling, ""]), encoding="utf-8")
    return [*written, bench_md]


# ------------------------------------------------------------------------------------- command
def bench_command(
    pairs_source: str | None,
    stacks: Sequence[str],
    out: Path | None = None,
    refine: Refinement = 0,
    quick: bool = False,
    sizes: Sequence[int] | None = None,
    threads: int = 2,
    scaling_pair: str | None = None,
    repeats: tuple[int, int] = (3, 1),
    plots: bool = True,
    log: Callable[[str], None] = lambda _: None,
    mutual_information: bool = False,
    similarity: str = "auto",
    with_ants: bool = True,
) -> tuple[list[str], list[str], Path]:
    """``dlir bench``: run, score and report; returns the comparison and scaling tables and the output folder.

    ``quick``: elastix and ANTs with a few iterations (:meth:`ElastixSettings.quick`,
    :meth:`AntsSettings.quick`) and small scaling sizes, for smoke tests.  ``sizes=()`` skips the
    scaling table.  Without ``pairs_source`` the bundled sample pair is used.  ``repeats``: timed
    runs of each DLIR and each elastix (and ANTs) registration.  Without ``antspyx`` ANTs is
    skipped and ``log`` gets one line that says how to install it.  ``mutual_information``: elastix also runs with
    Mattes mutual information (``elastix MI``, the conventional baseline for different contrasts).  ``similarity``:
    DLIR's ``--similarity`` (same, different or auto).  ``with_ants=False`` leaves ANTs SyN out (about a minute per
    small pair).
    """
    if min(repeats) < 1:
        raise InputError("every method must run at least once (--repeats)")
    check_elastix()
    ants = ants_settings(quick, threads, log) if with_ants else None
    pairs = read_pairs(pairs_source) if pairs_source else [sample_pair()]
    choose = stack_chooser(stacks)
    for pair in pairs:
        choose(pair.id)  # fail before any work when a pair has no stack
    elastix = ElastixSettings.quick(threads) if quick else ElastixSettings(threads=threads)
    config = BenchConfig(
        pairs=pairs, stack_for=choose, out=out or default_out(), refine=refine, devices=("cpu", *gpu_devices()),
        elastix=elastix, elastix_mi=replace(elastix, metric=MI_METRIC) if mutual_information else None, ants=ants,
        threads=threads, similarity=similarity,
        sizes=tuple(sizes) if sizes is not None else (QUICK_SIZES if quick else SIZES), scaling_pair=scaling_pair,
        dlir_repeats=repeats[0], elastix_repeats=repeats[1],
    )

    def panels(data, outputs: dict[str, MethodOutput], _scores) -> None:
        if plots:
            from .plots import pair_panels

            pair_panels(data, outputs, config.out / "panels")

    scores, measurements = run_pairs(config, log, panels)
    comparison = comparison_table(scores, measurements)
    scaling = scaling_table(run_scaling(config, log)) if config.sizes else []
    write_bench_report(config, scores, comparison, scaling, plots)
    return comparison, scaling, config.out
