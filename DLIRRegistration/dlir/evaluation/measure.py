"""One registration in a fresh process, measured: end-to-end time and peak memory.

``dlir bench`` runs every method this way (``python -m dlir.evaluation.measure SPEC.json``), so each run
starts from the same state and its peak resident memory (RSS of the whole process: PyTorch and
ITK allocations included, which ``tracemalloc`` would miss) is its own.

A run reads the pair from disk, registers it and writes ``warped.nii.gz``, ``labels.nii.gz``
(with moving labels), ``jacobian.nii.gz`` and ``transform.h5`` (the fixed -> moving transform,
LPS mm: DLIR's compact composite, elastix's displacement field, ANTs' affine and SyN field) into
its folder: the same outputs for DLIR (through ``dlir register``'s own code), elastix and ANTs
SyN.  Library imports and loading the stack, elastix or ANTs happen before the clock starts and
are reported apart (``load_s``).  With ``repeats`` > 1 the registration is repeated in the
same process: the first run is ``cold``; ``warm`` is the fastest run, for DLIR the fastest after
the first (which initialises PyTorch's kernels; later runs are what Slicer or a cohort run see
with the stack loaded).  The minimum, because other processes on a shared CPU only ever add time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import DLIRError

if TYPE_CHECKING:
    import SimpleITK as sitk

    from .ants import AntsResult
    from .elastix import ElastixResult

    #: a conventional baseline's registration of (fixed, moving, moving labels): its result and its
    #: transform file's transform (fixed points -> moving points, LPS mm)
    Baseline = Callable[[sitk.Image, sitk.Image, sitk.Image | None], tuple[ElastixResult | AntsResult, sitk.Transform]]


@dataclass
class RunSpec:
    """What one measured run does.  ``kind`` is ``dlir``, ``elastix`` or ``ants``; paths are files on disk."""

    kind: str
    fixed: str
    moving: str
    out: str
    moving_labels: str | None = None
    stack: str | None = None  # dlir: the stack file
    device: str = "cpu"  # dlir
    refine: int | str = 0  # dlir: "auto" (accurate mode) or a number of steps
    similarity: str = "auto"  # dlir: same, different or auto (dlir.choices.SIMILARITY_CHOICES)
    threads: int = 2
    repeats: int = 1
    elastix: dict[str, object] = field(default_factory=dict)  # ElastixSettings fields
    ants: dict[str, object] = field(default_factory=dict)  # AntsSettings fields


@dataclass
class Measurement:
    """Times in seconds, memory in MiB (peak RSS of the run's process)."""

    kind: str
    load_s: float  # imports excluded: loading the stack / elastix / ANTs
    cold_s: float  # first read + register + write
    warm_s: float  # fastest repetition (DLIR: after the first; equal to cold_s with one repeat)
    timings: dict[str, float]  # steps of the repetition timed as warm_s
    baseline_rss_mb: float  # peak RSS after imports and loading, before the first registration
    peak_rss_mb: float
    gpu_peak_mb: float | None = None


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB); NaN where the platform cannot say.

    Linux: ``VmHWM`` of ``/proc/self/status``, the peak of this process's own address space.
    (``getrusage``'s ``ru_maxrss`` would not do: Linux carries the parent's peak RSS over into
    a child at ``exec``, so every run would report at least the bench process's own peak.)
    """
    try:
        status = Path("/proc/self/status").read_text(encoding="utf-8")
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 2**10  # kB
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS


# the run functions import what they need themselves: a DLIR run never loads ITK, a baseline run never a stack
def _run_dlir(spec: RunSpec) -> Measurement:
    import torch

    from ..outputs import register_pair
    from ..stack import load_stack

    torch.set_num_threads(spec.threads)
    t = time.perf_counter()
    stack = load_stack(spec.stack)  # type: ignore[arg-type]
    load_s = time.perf_counter() - t
    baseline = _peak_rss_mb()
    runs: list[tuple[float, dict[str, float]]] = []
    for _ in range(spec.repeats):
        t = time.perf_counter()
        result = register_pair(stack, spec.fixed, spec.moving, Path(spec.out), moving_labels=spec.moving_labels,
                               device=spec.device, refine=spec.refine, similarity=spec.similarity,  # type: ignore[arg-type]
                               show_progress=False)
        runs.append((time.perf_counter() - t, {k: float(v) for k, v in dict(result["timings_s"]).items()}))  # type: ignore[arg-type]
    gpu = torch.cuda.max_memory_allocated() / 2**20 if spec.device.startswith("cuda") else None
    warm_s, timings = min(runs[1:] or runs, key=lambda run: run[0])  # the first run initialises PyTorch's kernels
    return Measurement("dlir", load_s, runs[0][0], warm_s, timings, baseline, _peak_rss_mb(), gpu)


def _run_elastix(spec: RunSpec) -> Measurement:
    import SimpleITK as sitk

    from .elastix import ElastixSettings, register_elastix, require_elastix

    settings = ElastixSettings(**{**spec.elastix, "threads": spec.threads})  # type: ignore[arg-type]

    def register(fixed: sitk.Image, moving: sitk.Image, labels: sitk.Image | None) -> tuple[ElastixResult, sitk.Transform]:
        result = register_elastix(fixed, moving, moving_labels=labels, settings=settings)
        return result, sitk.DisplacementFieldTransform(sitk.Cast(result.displacement, sitk.sitkVectorFloat64))

    return _run_baseline(spec, require_elastix, register)


def _run_ants(spec: RunSpec) -> Measurement:
    from .ants import AntsSettings, register_ants, require_ants

    fields = {**spec.ants, "threads": spec.threads}
    if "iterations" in fields:  # a list in JSON
        fields["iterations"] = tuple(fields["iterations"])  # type: ignore[arg-type]
    settings = AntsSettings(**fields)  # type: ignore[arg-type]

    def register(fixed: sitk.Image, moving: sitk.Image, labels: sitk.Image | None) -> tuple[AntsResult, sitk.Transform]:
        result = register_ants(fixed, moving, moving_labels=labels, settings=settings)
        return result, result.transform  # ANTs' composite: the affine and the SyN field

    return _run_baseline(spec, require_ants, register)


def _run_baseline(spec: RunSpec, load: Callable[[], object], register: Baseline) -> Measurement:
    """Measure a conventional baseline: ``load`` it, then ``spec.repeats`` registrations (no warm-up: loaded before the clock)."""
    t = time.perf_counter()
    load()
    load_s = time.perf_counter() - t
    baseline = _peak_rss_mb()
    runs = [_baseline_once(spec, register) for _ in range(spec.repeats)]
    warm_s, timings = min(runs, key=lambda run: run[0])
    return Measurement(spec.kind, load_s, runs[0][0], warm_s, timings, baseline, _peak_rss_mb())


def _baseline_once(spec: RunSpec, register: Baseline) -> tuple[float, dict[str, float]]:
    """Read, register with a baseline and write the same outputs as ``dlir register``; (seconds, steps).

    A function of its own so that every image of a repetition is freed before the next one starts.
    """
    from ..io import read_image, write_image, write_transform
    from ..metrics import jacobian_determinant_image

    out = Path(spec.out)
    t0 = time.perf_counter()
    fixed = read_image(spec.fixed, "fixed image")
    moving = read_image(spec.moving, "moving image")
    labels = None if spec.moving_labels is None else read_image(spec.moving_labels, "moving label map")
    t1 = time.perf_counter()
    result, transform = register(fixed, moving, labels)
    t2 = time.perf_counter()
    det = jacobian_determinant_image(result.displacement)
    t3 = time.perf_counter()
    write_image(result.warped, out / "warped.nii.gz")
    write_image(det, out / "jacobian.nii.gz")
    write_transform(transform, out / "transform.h5")
    if result.warped_labels is not None:
        write_image(result.warped_labels, out / "labels.nii.gz")
    t4 = time.perf_counter()
    return t4 - t0, {"read": t1 - t0, **result.timings, "jacobian": t3 - t2, "write": t4 - t3}


def run_spec(spec: RunSpec) -> Measurement:
    """Run ``spec`` in this process (the child side of :func:`measure`)."""
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    if spec.kind == "dlir":
        return _run_dlir(spec)
    if spec.kind == "elastix":
        return _run_elastix(spec)
    if spec.kind == "ants":
        return _run_ants(spec)
    raise ValueError(f"unknown run kind {spec.kind!r}")


def measure(spec: RunSpec, timeout_s: float | None = None) -> Measurement:
    """Run ``spec`` in a fresh Python process and return its measurement (also ``OUT/measurement.json``)."""
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(asdict(spec), indent=2), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads)}
    proc = subprocess.run([sys.executable, "-m", "dlir.evaluation.measure", str(spec_path)], capture_output=True, text=True,
                          timeout=timeout_s, env=env)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        raise DLIRError(f"the {spec.kind} run on {Path(spec.fixed).name} failed (exit {proc.returncode}): {lines[-1]}")
    return Measurement(**json.loads((out / "measurement.json").read_text(encoding="utf-8")))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m dlir.evaluation.measure SPEC.json", file=sys.stderr)
        return 2
    spec = RunSpec(**json.loads(Path(args[0]).read_text(encoding="utf-8")))
    try:
        measurement = run_spec(spec)
    except DLIRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (Path(spec.out) / "measurement.json").write_text(json.dumps(asdict(measurement), indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
