#!/usr/bin/env python3
"""Clinical-size benchmark: DLIR against elastix on a scanner-size chest CT, a scaling table and a cohort.

Run it when nothing else runs on the machine (it times things; compare ratios from one run only):

    .venv/bin/python Testing/benchmarks/clinical.py --out out/clinical | tee out/clinical.txt

(roughly 15-25 minutes on 2 idle cores the first time, of which 3-5 make the cached pairs, and
up to about 13 GB of memory for DLIR at 80 M voxels before the full-resolution rewrite; ``--repeats
1 1`` or ``--no-elastix-above 52`` shorten it; see ``Testing/benchmarks/RESULTS.md``).  A smoke run
with tiny images and a few elastix iterations (under a minute):

    .venv/bin/python Testing/benchmarks/clinical.py --quick --out /tmp/clinical-smoke

What it does (needs ``../shared/data`` and ``pip install -e ".[bench]"`` for itk-elastix):

1. **Pairs** (written once into ``OUT/cache/NXxNYxNZ/``, reused while their ``pair.json`` matches):
   the chest CT of ``chest_ct_lung1`` (512 x 512 x 48, 0.57 x 0.57 x 5 mm) resampled (linear,
   stored int16 like a scanner's) over the same physical box to a CT-shaped grid of the asked
   size; 52 million voxels is 512 x 512 x 200 at 0.57 x 0.57 x 1.2 mm.  That is the fixed
   image; the moving image is it deformed by one known smooth transform (a cubic B-spline with
   control points about 50 mm apart, displacements of a few mm, then an affine of <= 3 degrees,
   +-3 % scale and <= 4 mm shift; seed 16, defined in mm, so the same for every size).  Labels:
   the set's right (1) and left (2) lungs, carried along by nearest neighbour.
2. **The CT pair and the scaling table**: for each size, DLIR (``--stack``, one shot, ``kind
   "dlir"`` of :mod:`dlir.evaluation.measure`) and elastix (the paper's settings, ``kind
   "elastix"``), each in a fresh process: read + register + write ``warped``, ``labels``,
   ``jacobian`` and ``transform.h5``; time, peak RSS (``VmHWM``), file sizes and lung Dice.
   ``--no-elastix-above N`` skips elastix above N million voxels (the table says so).
3. **The cohort**: the pairs of ``--pairs`` (default the 4 development pairs) registered by ONE
   ``dlir register --pairs`` process (stack loaded once, the next pair read while the current
   one is registered, the previous one written meanwhile) against elastix on each pair in its
   own process; per-pair ratio, DLIR's time per pair being its share of the cohort's wall time
   (``cohort_s`` of ``summary.csv``: waiting for its read and for the previous pair's write,
   registering; the last pair's own write added to it).  The cohort process is run as many times
   as ``--repeats`` gives DLIR (default 2, each a fresh process) and each pair keeps its fastest
   share, as the CT runs keep their fastest repetition: on a shared 2-core machine one run's shares
   vary by up to 2x.  Peak RSS: the largest of the runs.

Printed: three markdown tables (also in ``OUT/clinical.md``).  Times: ``time`` is read +
register + write after imports and loading (DLIR: fastest repetition after the first when
``--repeats`` gives it 2 or more, the first one being ``cold``; elastix: fastest).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from dlir.errors import DLIRError
from dlir.evaluation.bench import environment
from dlir.evaluation.elastix import INSTALL_HINT, ElastixSettings, elastix_available
from dlir.evaluation.measure import Measurement, RunSpec, measure
from dlir.metrics import dice
from dlir.pairs import read_pairs
from dlir.stack import resolve_stack

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
#: the scanner-size grid (voxels) and the source CT's physical box is kept at every size
CLINICAL_SHAPE = (512, 512, 200)
SIZES = (1.0, 5.0, 20.0, 52.0, 80.0)  # million voxels
QUICK_SIZES = (0.02, 0.05)
SEED = 16
PAIR_VERSION = 1  # bump when the way pairs are made changes (the cache is then rebuilt)
LUNGS = (1, 2)
OUTPUT_FILES = ("transform.h5", "warped.nii.gz", "jacobian.nii.gz", "labels.nii.gz")
MB = 1e6  # file sizes in MB (10^6 bytes), memory in MiB


# ----------------------------------------------------------------------------------- pairs
def ct_shape(megavoxels: float) -> tuple[int, int, int]:
    """A CT-shaped grid (x = y, z / x as 200 / 512) of about ``megavoxels`` million voxels; 512 x 512 x 200 near 52 M."""
    clinical = float(np.prod(CLINICAL_SHAPE))
    if abs(megavoxels * 1e6 - clinical) <= 0.05 * clinical:
        return CLINICAL_SHAPE
    n = max(8, round((megavoxels * 1e6 * CLINICAL_SHAPE[0] / CLINICAL_SHAPE[2]) ** (1 / 3)))
    return (n, n, max(4, round(n * CLINICAL_SHAPE[2] / CLINICAL_SHAPE[0])))


def shape_name(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def resample_box(image: sitk.Image, shape: Sequence[int], interpolator: int, pixel: int, default: float) -> sitk.Image:
    """``image`` on a grid of ``shape`` voxels covering the same physical box (voxel edges), same direction."""
    old_size = np.asarray(image.GetSize(), dtype=np.float64)
    old_spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    spacing = old_size * old_spacing / np.asarray(shape, dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.asarray(image.GetOrigin()) + direction @ ((spacing - old_spacing) / 2)
    return sitk.Resample(image, [int(s) for s in shape], sitk.Transform(), interpolator, origin.tolist(), spacing.tolist(),
                         image.GetDirection(), default, pixel)


def known_deformation(reference: sitk.Image, seed: int = SEED) -> sitk.Transform:
    """The moving image's deformation S (a point of the moving image -> the point of the fixed image it shows, LPS mm).

    Cubic B-spline over ``reference``'s physical box (about 50 mm between control points,
    coefficients N(0, 4 mm)), then a small affine about the box centre.  Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    extent = np.asarray(reference.GetSize()) * np.asarray(reference.GetSpacing())
    mesh = [max(1, round(e / 50.0)) for e in extent]
    bspline = sitk.BSplineTransformInitializer(reference, mesh, 3)
    bspline.SetParameters(rng.normal(0.0, 4.0, len(bspline.GetParameters())).tolist())
    centre = reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in reference.GetSize()])
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre)
    angles = np.deg2rad(rng.uniform(-3, 3, 3))
    rotation = sitk.Euler3DTransform(centre, *angles.tolist())
    matrix = np.asarray(rotation.GetMatrix()).reshape(3, 3) @ np.diag(1 + rng.uniform(-0.03, 0.03, 3))
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation(rng.uniform(-4, 4, 3).tolist())
    return sitk.CompositeTransform([affine, bspline])  # the B-spline acts on a point first, then the affine


@dataclass
class CTPair:
    """A cached pair's files and grid."""

    folder: Path
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape))

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.nii.gz"


def make_ct_pair(data: Path, shape: tuple[int, int, int], cache: Path, log=print) -> CTPair:
    """The CT pair at ``shape`` in ``cache/NXxNYxNZ`` (made once; remade when its pair.json is from another recipe)."""
    folder = cache / shape_name(shape)
    source = data / "chest_ct_lung1"
    recipe = {"version": PAIR_VERSION, "seed": SEED, "shape": list(shape), "source": str(source / "ct.nii.gz")}
    meta = folder / "pair.json"
    if meta.is_file():
        made = json.loads(meta.read_text(encoding="utf-8"))
        if made.get("recipe") == recipe and all((folder / f"{n}.nii.gz").is_file() for n in
                                                ("fixed", "moving", "fixed_labels", "moving_labels")):
            return CTPair(folder, shape, tuple(made["spacing"]))
    log(f"making the CT pair {shape_name(shape)} in {folder} ...")
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    ct = sitk.ReadImage(str(source / "ct.nii.gz"))
    labels = sitk.ReadImage(str(source / "labels.nii.gz"))
    lungs = sitk.Cast(sitk.Mask(labels, sitk.Cast((labels == LUNGS[0]) | (labels == LUNGS[1]), labels.GetPixelID())),
                      sitk.sitkUInt8)
    fixed = resample_box(sitk.Cast(ct, sitk.sitkFloat32), shape, sitk.sitkLinear, sitk.sitkInt16, -1024.0)
    fixed_labels = resample_box(lungs, shape, sitk.sitkNearestNeighbor, sitk.sitkUInt8, 0.0)
    deformation = known_deformation(ct)
    moving = sitk.Resample(fixed, fixed, deformation, sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    moving_labels = sitk.Resample(fixed_labels, fixed, deformation, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    for name, image in (("fixed", fixed), ("moving", moving), ("fixed_labels", fixed_labels), ("moving_labels", moving_labels)):
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"), useCompression=True)
    spacing = tuple(float(s) for s in fixed.GetSpacing())
    meta.write_text(json.dumps({"recipe": recipe, "spacing": spacing, "origin": list(fixed.GetOrigin()),
                                "made_in_s": round(time.perf_counter() - t0, 1)}, indent=2), encoding="utf-8")
    log(f"  made in {time.perf_counter() - t0:.0f} s")
    return CTPair(folder, shape, spacing)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One measured run (or why there is none: ``skipped`` / ``failed``)."""

    method: str  # "DLIR" or "elastix"
    measurement: Measurement | None = None
    files_mb: dict[str, float] = field(default_factory=dict)
    dice: dict[int, float] = field(default_factory=dict)
    skipped: str = ""
    failed: str = ""

    @property
    def ok(self) -> bool:
        return self.measurement is not None


def lung_dice(reference: Path, labels: Path) -> dict[int, float]:
    if not labels.is_file():
        return {}
    scores = dice(sitk.ReadImage(str(reference)), sitk.ReadImage(str(labels)), labels=list(LUNGS))
    return {k: float(v) for k, v in scores.items()}


def run_measured(method: str, spec: RunSpec, reference_labels: Path | None, timeout_s: float | None, log=print) -> Run:
    """``spec`` in a fresh process (:func:`dlir.evaluation.measure.measure`), with its file sizes and lung Dice."""
    log(f"  {method} on {Path(spec.fixed).parent.name} ...")
    try:
        m = measure(spec, timeout_s)
    except (DLIRError, subprocess.TimeoutExpired) as exc:
        reason = f"timed out after {timeout_s:.0f} s" if isinstance(exc, subprocess.TimeoutExpired) else str(exc)
        log(f"  {method} failed: {reason}")
        return Run(method, failed=reason)
    out = Path(spec.out)
    files = {name: (out / name).stat().st_size / MB for name in OUTPUT_FILES if (out / name).is_file()}
    run = Run(method, m, files, {} if reference_labels is None else lung_dice(reference_labels, out / "labels.nii.gz"))
    log(f"  {method}: {m.warm_s:.2f} s (cold {m.cold_s:.2f} s), peak {m.peak_rss_mb:.0f} MiB, "
        f"transform {files.get('transform.h5', math.nan):.1f} MB")
    return run


@dataclass
class Config:
    data: Path
    out: Path
    stack: Path
    cohort_stack: Path
    pairs: Path | None
    sizes: tuple[float, ...]
    no_elastix_above: float | None
    elastix: ElastixSettings
    threads: int
    repeats: tuple[int, int]
    device: str
    timeout_s: float | None
    cohort: bool


def specs(config: Config, fixed: Path, moving: Path, moving_labels: Path | None, folder: Path) -> dict[str, RunSpec]:
    common = dict(fixed=str(fixed), moving=str(moving), threads=config.threads,
                  moving_labels=None if moving_labels is None else str(moving_labels))
    return {
        "DLIR": RunSpec("dlir", out=str(folder / "dlir"), stack=str(config.stack), device=config.device,
                        repeats=config.repeats[0], **common),  # type: ignore[arg-type]
        "elastix": RunSpec("elastix", out=str(folder / "elastix"), elastix=asdict(config.elastix),
                           repeats=config.repeats[1], **common),  # type: ignore[arg-type]
    }


def run_sizes(config: Config, pairs: Sequence[CTPair], log=print) -> dict[tuple[int, int, int], dict[str, Run]]:
    results: dict[tuple[int, int, int], dict[str, Run]] = {}
    for pair in pairs:
        log(f"{shape_name(pair.shape)} ({pair.voxels / 1e6:.1f} M voxels):")
        folder = config.out / "runs" / shape_name(pair.shape)
        runs: dict[str, Run] = {}
        for method, spec in specs(config, pair.path("fixed"), pair.path("moving"), pair.path("moving_labels"), folder).items():
            if method == "elastix" and config.no_elastix_above is not None and pair.voxels > config.no_elastix_above * 1e6:
                runs[method] = Run(method, skipped=f"not run (> {config.no_elastix_above:g} M voxels, --no-elastix-above)")
                continue
            runs[method] = run_measured(method, spec, pair.path("fixed_labels"), config.timeout_s, log)
        results[pair.shape] = runs
    return results


@dataclass
class CohortResult:
    pair_ids: list[str]
    voxels: dict[str, int]
    dlir_s: dict[str, float]  # per pair, its share of the cohort process's wall time (summary.csv's cohort_s)
    dlir_read_s: dict[str, float]
    wall_s: float  # the whole dlir process (the fastest run): start-up, imports, stack load and every pair
    peak_rss_mb: float
    status: dict[str, str]
    elastix: dict[str, Run]


COHORT_CHILD = """import sys
from dlir.cli import main
code = main(sys.argv[2:])
from dlir.evaluation.measure import _peak_rss_mb
open(sys.argv[1], "w").write(f"{_peak_rss_mb()}")
sys.exit(code)
"""


def run_cohort(config: Config, source: Path, log=print) -> CohortResult:
    """One ``dlir register --pairs`` process over every pair of ``source``, then elastix on each pair in its own process."""
    pairs = read_pairs(source)
    out = config.out / "runs" / "cohort"
    peak_file = config.out / "runs" / "cohort-peak.txt"
    peak_file.parent.mkdir(parents=True, exist_ok=True)
    args = ["register", "--pairs", str(source), "--stack", str(config.cohort_stack), "--out", str(out), "--device",
            config.device] + (["--overwrite"] if out.exists() else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads)}
    dlir_s: dict[str, float] = {}
    read_s: dict[str, float] = {}
    wall, peaks = math.inf, []
    for run in range(max(1, config.repeats[0])):
        log(f"cohort: one dlir register --pairs process over {len(pairs)} pairs (run {run + 1}) ...")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", COHORT_CHILD, str(peak_file), *args], capture_output=True, text=True,
                              env=env, timeout=config.timeout_s)
        wall = min(wall, time.perf_counter() - t0)
        if proc.returncode not in (0, 1):
            raise DLIRError(f"the cohort run failed (exit {proc.returncode}): {(proc.stderr.strip() or proc.stdout.strip())[-500:]}")
        args = args if "--overwrite" in args else [*args, "--overwrite"]
        if peak_file.is_file():
            peaks.append(float(peak_file.read_text()))
        with (out / "summary.csv").open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        status = {row["id"]: row["status"] for row in rows}
        shares = {row["id"]: float(row["cohort_s"]) for row in rows if row["status"] == "ok"}
        for pair in pairs:
            report = out / pair.id / "result.json"
            if report.is_file() and shares.get(pair.id, math.inf) < dlir_s.get(pair.id, math.inf):
                result = json.loads(report.read_text(encoding="utf-8"))
                dlir_s[pair.id] = shares[pair.id]
                read_s[pair.id] = float(result["timings_s"].get("read", math.nan))
    voxels = {pair.id: int(np.prod(_header_size(pair.fixed))) for pair in pairs}
    log(f"cohort: {wall:.1f} s in all; elastix on each pair ...")
    elastix = {}
    for pair in pairs:
        spec = specs(config, pair.fixed, pair.moving, pair.moving_labels, config.out / "runs" / "cohort-elastix" / pair.id)["elastix"]
        elastix[pair.id] = run_measured("elastix", spec, None, config.timeout_s, log)
    return CohortResult([p.id for p in pairs], voxels, dlir_s, read_s, wall, max(peaks, default=math.nan), status, elastix)


def _header_size(path: Path) -> tuple[int, ...]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetSize()


# ----------------------------------------------------------------------------------- tables
def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _megavoxels(voxels: int) -> str:
    return f"{voxels / 1e6:.1f}" if voxels >= 1e6 else f"{voxels / 1e6:.3f}"


def _files(run: Run) -> str:
    return " / ".join(_f(run.files_mb.get(name), 1) for name in OUTPUT_FILES)


def _dice(scores: dict[int, float]) -> str:
    return " / ".join(_f(scores.get(k), 3) for k in LUNGS) if scores else "–"


def _why(run: Run) -> str:
    return run.skipped or (f"failed: {run.failed}" if run.failed else "–")


def clinical_table(pair: CTPair, runs: dict[str, Run]) -> list[str]:
    """(b): the CT pair, DLIR against elastix."""
    lines = [f"CT pair {shape_name(pair.shape)} voxels ({_megavoxels(pair.voxels)} M), spacing "
             f"{' x '.join(f'{s:.2f}' for s in pair.spacing)} mm, int16:", "",
             "| method | time (s) | register (s) | cold (s) | peak RSS (MiB) | transform.h5 (MB) | warped (MB) | jacobian (MB) "
             "| labels (MB) | lung Dice R / L | speed (elastix time / DLIR time) |", "|" + " --- |" * 11]
    before = lung_dice(pair.path("fixed_labels"), pair.path("moving_labels"))
    lines.append(f"| before registration | – | – | – | – | – | – | – | – | {_dice(before)} | – |")
    elastix = runs.get("elastix")
    for method, run in runs.items():
        if not run.ok:
            lines.append(f"| {method} | {_why(run)} |" + " – |" * 9)
            continue
        m = run.measurement
        assert m is not None
        register_s = m.warm_s - m.timings.get("read", 0.0) - m.timings.get("write", 0.0)
        if method == "elastix":
            speed = "1"
        elif elastix is not None and elastix.ok:
            speed = f"{elastix.measurement.warm_s / m.warm_s:.1f}x"  # type: ignore[union-attr]
        else:
            speed = "–"
        sizes = " | ".join(_f(run.files_mb.get(name), 1) for name in OUTPUT_FILES)
        lines.append(f"| {method} | {_f(m.warm_s)} | {_f(register_s)} | {_f(m.cold_s)} | {m.peak_rss_mb:.0f} | {sizes} | "
                     f"{_dice(run.dice)} | {speed} |")
    return lines


def scaling_table(pairs: Sequence[CTPair], results: dict[tuple[int, int, int], dict[str, Run]]) -> list[str]:
    """(c): time, peak memory (and its growth per million voxels over the loaded process) and file sizes per size."""
    lines = ["| size (voxels) | M voxels | DLIR time (s) | DLIR peak RSS (MiB) | DLIR MiB per M voxels | DLIR files (MB) "
             "| elastix time (s) | elastix peak RSS (MiB) | elastix MiB per M voxels | elastix files (MB) | speed (elastix / DLIR) |",
             "|" + " --- |" * 11]
    for pair in pairs:
        runs = results[pair.shape]
        cells = [shape_name(pair.shape), _megavoxels(pair.voxels)]
        for method in ("DLIR", "elastix"):
            run = runs[method]
            if run.ok:
                m = run.measurement
                assert m is not None
                per = (m.peak_rss_mb - m.baseline_rss_mb) / (pair.voxels / 1e6) if pair.voxels >= 1e6 else math.nan
                cells += [_f(m.warm_s), f"{m.peak_rss_mb:.0f}", _f(per, 0), _files(run)]
            else:
                cells += [_why(run), "–", "–", "–"]
        d, e = runs["DLIR"], runs["elastix"]
        cells.append(f"{e.measurement.warm_s / d.measurement.warm_s:.1f}x" if d.ok and e.ok else "–")  # type: ignore[union-attr]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def cohort_table(result: CohortResult) -> list[str]:
    """(d): per pair, DLIR inside one cohort process against elastix in its own process."""
    lines = ["| pair | M voxels | DLIR in the cohort (s, its share of the wall time) | of which waiting for the read (s) | elastix (s) | speed (elastix / DLIR) |",
             "|" + " --- |" * 6]
    ratios = []
    for pid in result.pair_ids:
        e = result.elastix[pid]
        d = result.dlir_s.get(pid)
        speed = "–"
        if d is not None and e.ok and d > 0:
            ratios.append(e.measurement.warm_s / d)  # type: ignore[union-attr]
            speed = f"{ratios[-1]:.1f}x"
        status = "" if result.status.get(pid) == "ok" else f" ({result.status.get(pid, 'missing')})"
        lines.append(f"| {pid}{status} | {_megavoxels(result.voxels[pid])} | {_f(d)} | {_f(result.dlir_read_s.get(pid))} | "
                     f"{_f(e.measurement.warm_s) if e.ok else _why(e)} | {speed} |")
    n = len(result.pair_ids)
    e_total = sum(r.measurement.warm_s for r in result.elastix.values() if r.ok)  # type: ignore[union-attr]
    d_total = sum(result.dlir_s.values())
    lines.append(f"| all {n}, sum | – | {_f(d_total)} | {_f(sum(result.dlir_read_s.values()))} | {_f(e_total)} | "
                 f"{_f(e_total / d_total if d_total else math.nan, 1)}x |")
    lines.append(f"| all {n}, whole process (start-up, imports, stack load: wall / {n}) | – | {_f(result.wall_s / n)} | – | "
                 f"{_f(e_total / n)} | {_f(e_total / result.wall_s, 1)}x |")
    if ratios:
        lines += ["", f"Per-pair speed: min {min(ratios):.1f}x, max {max(ratios):.1f}x (target >= 50x per pair: "
                  f"{'met' if min(ratios) >= 50 else 'not met'}); the cohort process's peak RSS {result.peak_rss_mb:.0f} MiB, "
                  f"wall {result.wall_s:.1f} s."]
    return lines


# ----------------------------------------------------------------------------------- command
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder (default ../shared/data)")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "clinical", help="cache and runs (default out/clinical)")
    p.add_argument("--stack", default="chest-ct", help="stack for the CT pairs (default chest-ct)")
    p.add_argument("--sizes", type=float, nargs="*", metavar="M",
                   help="million voxels per CT-shaped pair (default 1 5 20 52 80; 52 is 512 x 512 x 200; --quick: 0.02 0.05)")
    p.add_argument("--no-elastix-above", type=float, metavar="M", help="skip elastix above M million voxels")
    p.add_argument("--pairs", type=Path, help="cohort pairs (a folder of pair folders or a CSV; default DATA/pairs, "
                   "with --quick the cached CT pairs)")
    p.add_argument("--cohort-stack", default="brain-mri",
                   help="the ONE stack of the cohort run (default brain-mri: same networks as chest-ct; a timing row)")
    p.add_argument("--no-cohort", action="store_true", help="skip the cohort table")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for DLIR and elastix (default 2)")
    p.add_argument("--repeats", type=int, nargs=2, metavar=("DLIR", "ELASTIX"),
                   help="timed runs per registration in its process (default 2 1; --quick 1 1)")
    p.add_argument("--device", default="cpu", help="DLIR's device (default cpu)")
    p.add_argument("--timeout", type=float, metavar="S", help="give up a run after S seconds (default: never)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few elastix iterations: a smoke run, not numbers")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if not elastix_available():
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if not (args.data / "chest_ct_lung1" / "ct.nii.gz").is_file():
        print(f"error: the chest CT is not at {args.data / 'chest_ct_lung1'} (give --data)", file=sys.stderr)
        return 2
    sizes = tuple(args.sizes) if args.sizes is not None else (QUICK_SIZES if args.quick else SIZES)
    config = Config(
        data=args.data, out=args.out, stack=resolve_stack(args.stack), cohort_stack=resolve_stack(args.cohort_stack),
        pairs=args.pairs, sizes=sizes, no_elastix_above=args.no_elastix_above,
        elastix=ElastixSettings.quick(args.threads) if args.quick else ElastixSettings(threads=args.threads),
        threads=args.threads, repeats=tuple(args.repeats) if args.repeats else ((1, 1) if args.quick else (2, 1)),
        device=args.device, timeout_s=args.timeout, cohort=not args.no_cohort,
    )
    t0 = time.perf_counter()
    cache = config.out / "cache"
    shapes = list(dict.fromkeys(ct_shape(s) for s in sorted(config.sizes)))
    pairs = [make_ct_pair(config.data, shape, cache, log) for shape in shapes]
    results = run_sizes(config, pairs, log)
    report: list[str] = ["# DLIR vs elastix at clinical size", "",
                         f"DLIR: `{config.stack.name}` one shot on {config.device}; elastix: {config.elastix.describe()}; "
                         f"{config.threads} threads; repeats DLIR {config.repeats[0]}, elastix {config.repeats[1]}"
                         f"{' (QUICK: a smoke run, not numbers)' if args.quick else ''}.", *environment(), ""]
    if pairs:
        clinical = min(pairs, key=lambda p: abs(math.log(p.voxels / np.prod(CLINICAL_SHAPE))))
        report += ["## The CT pair", "", *clinical_table(clinical, results[clinical.shape]), ""]
        report += ["## Scaling (CT-shaped grids over the same physical box)", "",
                   "Files: transform.h5 / warped / jacobian / labels in MB; MiB per M voxels = (peak RSS - RSS after "
                   "imports and loading) / million voxels.", "", *scaling_table(pairs, results), ""]
    if config.cohort:
        source = config.pairs or (cache if args.quick else config.data / "pairs")
        cohort = run_cohort(config, source, log)
        report += [f"## Cohort: `dlir register --pairs` ({source}, stack `{config.cohort_stack.name}`) in one process "
                   "against elastix per pair", "", *cohort_table(cohort), ""]
    report.append(f"Benchmark wall time {time.perf_counter() - t0:.0f} s.")
    text = "\n".join(report)
    (config.out / "clinical.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
