"""The ``dlir`` command: ``dlir register | info | train | evaluate | bench``.

The top layer of the engine: it parses arguments and calls the engine (:mod:`dlir.outputs`,
:mod:`dlir.cohort`, :mod:`dlir.stack`, :mod:`dlir.training`, :mod:`dlir.evaluation`), importing each only when its
command runs, so ``dlir --help`` and ``dlir register --help`` start without PyTorch, SimpleITK
or NumPy (``Testing/engine/test_startup.py``); only the named command's options are built (the
training flags need :mod:`dlir.training.config`).  Every user-caused failure ends with
``error: <one sentence>`` on stderr and exit code 2; input files are only ever read.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .choices import ALIGNMENT_MODES, FILE_OUTPUTS, LABEL_INTERPOLATIONS, SIMILARITY_CHOICES
from .errors import DLIRError, InputError, StackError

EXIT_USER_ERROR = 2

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


# ----------------------------------------------------------------------------------- register
def refinement(text: str) -> int | str:
    """``--refine``'s value: ``auto`` or a number of steps >= 0 (one sentence, an :class:`InputError`, when neither)."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        steps = int(text)
    except ValueError:
        steps = -1
    if steps < 0:
        raise InputError(f"--refine {text}: give 'auto' (accurate mode) or a number of refinement steps, not a negative "
                         "number or other text")
    return steps


def _add_register(p: argparse.ArgumentParser) -> None:
    p.add_argument("fixed", nargs="?", help="fixed image (NIfTI, NRRD, MHA or a DICOM folder)")
    p.add_argument("moving", nargs="?", help="moving image, registered onto the fixed one")
    p.add_argument("--pairs", help="instead of FIXED MOVING: a CSV of pairs (columns fixed, moving and optionally moving_labels, "
                   "fixed_mask, fixed_labels, id) or a folder of pair folders (fixed.nii.gz, moving.nii.gz, ...)")
    p.add_argument("--stack", required=True, help="stage stack: a .safetensors file or a registry name (see dlir info --list)")
    p.add_argument("--out", required=True, help="output folder (new or empty; written whole at the end of the run)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier dlir result in --out (the whole folder)")
    p.add_argument("--moving-labels", help="label map on the moving grid, propagated to the fixed image")
    p.add_argument("--fixed-mask", help="mask on the fixed grid: refinement measures similarity inside it; folding and "
                   "Jacobian statistics are computed inside it")
    p.add_argument("--fixed-labels", help="label map on the fixed grid: Dice before/after is reported")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--refine", default="0", metavar="auto|N",
                   help="auto = accurate mode: the networks' transform optimised on the pair, coarse to fine, to convergence, "
                        "never folding; N = N optimiser steps at the finest level only (for experiments); default 0 = one shot")
    p.add_argument("--initial-alignment", choices=ALIGNMENT_MODES,
                   help="how the moving image is placed before the networks: search (default: an affine search from "
                        "several starts, for two subjects and any starting position), image centres, centres of mass, "
                        "centres of mass and principal axes (moments), or none (as placed)")
    p.add_argument("--similarity", choices=SIMILARITY_CHOICES, default="auto",
                   help="how the images are compared: same (one contrast: normalised cross-correlation), different "
                        "(MR and CT, T1 and T2: MIND-SSC descriptors) or auto (default: decided from the headers or the "
                        "images; result.json says which and why)")
    p.add_argument("--label-interpolation", choices=LABEL_INTERPOLATIONS, default="nearest")
    p.add_argument("--outputs", default=",".join(FILE_OUTPUTS), metavar="LIST",
                   help=f"comma-separated outputs to compute and write, from {', '.join(FILE_OUTPUTS)} "
                        "(default all; result.json is always written, with folding and std of the Jacobian)")


#: libgomp's wait policy for PyTorch's OpenMP threads in ``dlir register`` (read once, when torch is imported; a value
#: in the environment wins): a thread that waits at the end of a parallel region sleeps instead of spinning.  On a
#: machine with more work than cores, spinning threads wait on descheduled ones: the capture search took 4-25x longer
#: with the default policy than with this one (Testing/benchmarks/RESULTS.md, issue 28); results are the same.
OMP_WAIT_POLICY = "PASSIVE"


def _run_register(args: argparse.Namespace) -> int:
    """``dlir register``: every refusal that needs no image (output folder, device, stack file, options) comes before
    anything is read; from the moment the result is in place, Ctrl-C is ignored (the run has succeeded)."""
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)  # before torch is imported (dlir.device imports it)
    if not args.out.strip():
        raise InputError("--out is empty; give a folder for the results")
    from .device import resolve_device
    from .outputs import register_into
    from .resultfolder import OutputFolder, check_output_folder, interrupts_ignored
    from .stack import load_stack

    out = Path(args.out)
    check_output_folder(out)  # before anything is read: an unusable --out is said first
    resolve_device(args.device)  # once, up front: a cohort is refused as a single pair is, not row by row
    stack_path = _stack_file(args.stack)
    from .outputs import check_outputs

    options = dict(device=args.device, refine=refinement(args.refine), initial_alignment=args.initial_alignment,
                   similarity=args.similarity, label_interpolation=args.label_interpolation, outputs=check_outputs(args.outputs.split(",")))
    if args.pairs:
        if args.fixed or args.moving:
            raise InputError("give either FIXED MOVING or --pairs, not both")
        return _register_cohort(stack_path, Path(args.pairs), out, options, args.overwrite)
    if not (args.fixed and args.moving):
        raise InputError("dlir register needs FIXED and MOVING images (or --pairs PAIRS.csv)")
    inputs = {"fixed image": args.fixed, "moving image": args.moving, "moving label map": args.moving_labels,
              "fixed mask": args.fixed_mask, "fixed label map": args.fixed_labels, "stack": stack_path}
    with OutputFolder(out, inputs, overwrite=args.overwrite) as folder:
        stack = load_stack(stack_path)
        result = register_into(folder.temp, stack, args.fixed, args.moving, moving_labels=args.moving_labels,
                               fixed_mask=args.fixed_mask, fixed_labels=args.fixed_labels,
                               show_progress=sys.stderr.isatty(), shown=out, **options)
        folder.commit()
    with interrupts_ignored():
        _print_result(result, out)
    return 0


def _stack_file(stack: str) -> Path:
    """The file of ``--stack`` (a path or a registry name); a folder is refused here, before the output folder's checks
    would call it an input that holds ``--out`` (``--stack ..``)."""
    from .choices import STACK_SUFFIX
    from .stack import resolve_stack

    path = resolve_stack(stack)
    if path.is_dir():
        raise StackError(f"--stack {stack} is a folder, not a stack file; give a {STACK_SUFFIX} file or a stack name "
                         "(see dlir info --list)")
    return path


def _print_result(result: dict, out: Path) -> None:
    print(f"registered with {result['stack']} on {result['device']} in {result['total_s']:.2f} s "
          f"(folding {100 * float(result['folding_fraction']):.3f} %, std Jacobian {float(result['jacobian_std']):.3f})")
    contrast = dict(result.get("contrast", {}))
    if contrast:
        print(f"  {'same contrast' if contrast['contrast'] == 'same' else 'different contrasts'} "
              f"({'as asked' if contrast['asked'] != 'auto' else contrast['reason']}): similarity {contrast['measure']}")
    for label, d in dict(result.get("dice", {})).items():
        print(f"  label {label}: Dice {d['before']:.3f} -> {d['after']:.3f}")
    print(f"outputs in {out}")


def _register_cohort(stack_path: Path, source: Path, out: Path, options: dict, overwrite: bool) -> int:
    """Register the pairs of a CSV or a folder of pair folders (:mod:`dlir.pairs`) into ``out/ID`` (:mod:`dlir.cohort`)
    and say how many were registered; exit code 1 when any failed, each named with its sentence on stderr."""
    from tqdm import tqdm

    from .cohort import register_cohort
    from .resultfolder import SUMMARY_FILE, interrupts_ignored
    from .pairs import read_pairs

    pairs = read_pairs(source)
    with tqdm(total=len(pairs), desc="pairs", unit="pair", disable=not sys.stderr.isatty()) as bar:
        rows = register_cohort(pairs, stack_path, out, source=source, overwrite=overwrite,
                               progress=lambda done, total: bar.update(done - bar.n), **options)
    failures = [row for row in rows if row["status"] != "ok"]
    with interrupts_ignored():  # the cohort is in place
        print(f"{len(pairs) - len(failures)} of {len(pairs)} pairs registered; summary in {out / SUMMARY_FILE}")
        for row in failures:
            print(f"  {row['id']}: {row['status']}", file=sys.stderr)
    return 0 if not failures else 1


# ----------------------------------------------------------------------------------- info
def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("stack", nargs="?", help="a .safetensors stack file or a registry name")
    p.add_argument("--list", action="store_true", help="list the stacks in the registry")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def _run_info(args: argparse.Namespace) -> int:
    import json

    from .stack import describe, load_stack, resolve_stack, scan_registry

    if args.list or not args.stack:
        registry = scan_registry()
        if not registry.stacks:
            print("no stacks in the registry")
        for info in registry.stacks:
            m = info.manifest
            print(f"{info.name:<20} {m.modality or '-':<6} {m.anatomy or '-':<10} {info.path}")
        for bad in registry.unusable:  # listed, never fatal: one bad file must not hide the others
            print(f"unusable: {bad.path}: {bad.reason}")
        return 0
    path = resolve_stack(args.stack)
    manifest = load_stack(path).manifest  # full validation, not just the manifest
    print(json.dumps(manifest.to_dict(), indent=2) if args.json else describe(manifest, path))
    return 0


# ----------------------------------------------------------------------------------- train
def _add_train(p: argparse.ArgumentParser) -> None:
    from .training.config import add_flags

    p.add_argument("--config", help="training configuration (TOML; see dlir.training.config); flags override its keys")
    p.add_argument("--out", help="job folder: config.toml, events.jsonl, train.log, checkpoints/, NAME.safetensors")
    p.add_argument("--resume", metavar="JOB_DIR", help="continue a stopped job from its last checkpoint")
    p.add_argument("--progress", choices=("auto", "bar", "jsonl", "none"), default="auto",
                   help="auto: a bar on a terminal; jsonl: the events also on stdout (for the DLIR Training module)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to JOB_DIR/tensorboard")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads of PyTorch (default: all cores; 1 per job on a shared machine)")
    add_flags(p)


def _run_train(args: argparse.Namespace) -> int:
    from .errors import CancelledError
    from .training.trainer import EXIT_STOPPED, train

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        config, job = _train_job(args)
    except DLIRError as exc:  # also an error event where a job folder exists, for whoever watches it
        folder = args.resume or args.out
        _record_error(Path(folder) if folder else None, exc, args.progress)
        raise
    try:
        path = train(config, job, resume=bool(args.resume), progress=args.progress, tensorboard=args.tensorboard)
    except CancelledError as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    if args.progress != "jsonl":
        print(f"stack written to {path}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank is done and rank 0 has written the stack. The gloo backend's threads can abort
        # the interpreter's normal teardown ("terminate called without an active exception"), so a
        # distributed rank leaves without running it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _train_job(args: argparse.Namespace):
    """(configuration, job folder) of ``dlir train`` from its arguments."""
    from .training.config import TrainConfig, apply_flags
    from .training.jobfolder import CONFIG_FILE

    if args.resume:
        if args.config or args.out:
            raise InputError("--resume JOB_DIR continues a job with its own configuration: leave out --config and --out")
        job = Path(args.resume)
        if not (job / CONFIG_FILE).is_file():
            raise InputError(f"{job} is not a training job folder (it has no {CONFIG_FILE})")
        config = TrainConfig.read(job / CONFIG_FILE)
    else:
        if not args.out:
            raise InputError("give the job folder with --out JOB_DIR (or --resume JOB_DIR)")
        job = Path(args.out)
        config = apply_flags(TrainConfig.read(args.config) if args.config else TrainConfig(), args)
    return config, job


def _record_error(job: Path | None, exc: DLIRError, progress: str) -> None:
    """An ``error`` event in an existing job folder (and on stdout with ``--progress jsonl``)."""
    from .training.events import EventLog, stdout_echo
    from .training.jobfolder import EVENTS_FILE

    events = EventLog(job / EVENTS_FILE if job is not None and job.is_dir() else None, stdout_echo(progress))
    events.emit("error", message=str(exc), kind=type(exc).__name__)
    events.close()


# ----------------------------------------------------------------------------------- evaluate, bench
def _require_matplotlib() -> None:
    from importlib.util import find_spec


    if find_spec("matplotlib") is None:
        raise InputError('the plots need matplotlib: install it with `pip install matplotlib==3.11.2` '
                         '(or `pip install -e ".[bench]"`), or pass --no-plots')


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", required=True, help="a folder of pair folders (fixed.nii.gz, moving.nii.gz, fixed_labels, "
                   "moving_labels, landmarks.csv, gt_displacement) or a CSV with those columns (and id)")
    p.add_argument("--stack", required=True, action="append", metavar="[PATTERN=]STACK",
                   help="stage stack (file or registry name); repeat with PATTERN= (e.g. 'lung*=chest-ct') to choose by pair id")
    p.add_argument("--out", required=True, help="output folder: metrics.csv, timings.csv, summary.md, plots, panels/")
    p.add_argument("--refine", default="0", metavar="auto|N", help="DLIR's refinement: auto (accurate mode) or N steps (default 0)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.evaluate import evaluate_command, summary_table

    if not args.no_plots:
        _require_matplotlib()
    out = Path(args.out)
    scores = evaluate_command(args.pairs, args.stack, out, refinement(args.refine), args.device, plots=not args.no_plots)
    print("\n".join(summary_table(scores)))
    print(f"report in {out} (summary.md, metrics.csv, timings.csv{'' if args.no_plots else ', plots'})")
    return 0


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", help="pairs as for dlir evaluate (default: the bundled sample pair)")
    p.add_argument("--stack", required=True, action="append", metavar="[PATTERN=]STACK",
                   help="stage stack (file or registry name); repeat with PATTERN= to choose by pair id")
    p.add_argument("--refine", default="0", metavar="auto|N", help="also run DLIR refined: auto (accurate mode) or N steps")
    p.add_argument("--quick", action="store_true",
                   help="few elastix and ANTs iterations and small scaling sizes (a smoke test, not numbers)")
    p.add_argument("--sizes", type=int, nargs="*", metavar="N",
                   help="cubic sizes of the scaling table (default 64 128 192 256; none to skip)")
    p.add_argument("--scaling-pair", metavar="ID", help="the pair resampled for the scaling table (default: the first)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for DLIR, elastix and ANTs (default 2)")
    p.add_argument("--repeats", type=int, nargs=2, default=(3, 1), metavar=("DLIR", "BASELINES"),
                   help="timed runs per registration of DLIR and of each baseline, elastix and ANTs (default 3 1); "
                        "the fastest counts (DLIR: after the first)")
    p.add_argument("--similarity", choices=SIMILARITY_CHOICES, default="auto", help="DLIR's similarity (as dlir register)")
    p.add_argument("--mutual-information", action="store_true",
                   help="also run elastix with Mattes mutual information (elastix MI: the baseline for different contrasts; "
                        "ANTs SyN uses mutual information already)")
    p.add_argument("--no-ants", action="store_true", help="leave ANTs SyN out (about a minute per small pair)")
    p.add_argument("--out", help="output folder (default: a new temporary folder)")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")


def _run_bench(args: argparse.Namespace) -> int:
    from .evaluation.bench import bench_command

    if not args.no_plots:
        _require_matplotlib()
    comparison, scaling, out = bench_command(
        args.pairs, args.stack, Path(args.out) if args.out else None, refinement(args.refine), args.quick, args.sizes, args.threads,
        args.scaling_pair, tuple(args.repeats), plots=not args.no_plots,
        log=lambda message: print(message, file=sys.stderr, flush=True), mutual_information=args.mutual_information,
        similarity=args.similarity, with_ants=not args.no_ants,
    )
    print("\n".join(comparison))
    if scaling:
        print("\nScaling (one pair resampled to cubic grids; time end to end, peak RSS of the process):")
        print("\n".join(scaling))
    print(f"\nreport in {out} (bench.md, summary.md, metrics.csv, plots, runs/)")
    return 0


COMMANDS: list[Command] = [
    ("register", "register a pair (or a cohort) with a stage stack", _add_register, _run_register),
    ("info", "show a stack's manifest, or list the registry", _add_info, _run_info),
    ("train", "train a stage stack, stage by stage, with checkpoints, resume and progress events", _add_train, _run_train),
    ("evaluate", "paper-style evaluation of a stack on pairs: Dice, HD, ASD, TRE, folding, time; tables and plots",
     _add_evaluate, _run_evaluate),
    ("bench", "DLIR against elastix and ANTs SyN on the same pairs: one comparison table and a scaling table", _add_bench, _run_bench),
]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``dlir`` parser; given ``argv``, only the commands named in it get their options (a faster start)."""
    parser = argparse.ArgumentParser(prog="dlir", description="DLIR: deep-learning image registration (de Vos et al. 2019)")
    parser.add_argument("--version", action="version", version=f"dlir {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    named = None if argv is None else set(argv)
    for name, help_text, add, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if named is None or name in named:  # a command not on the command line is never parsed: its options can wait
            add(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``dlir`` command: exit code 0, 1 (some pairs of a cohort failed), 2 (``error: <sentence>``) or 130 (Ctrl-C)."""
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser(argv).parse_args(argv)
        import logging

        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
        return int(args.run(args))
    except DLIRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
