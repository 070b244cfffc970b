"""Sub-commands contributed by other engine modules (training, evaluation, benchmark).

Each entry is ``(name, help, add_arguments(parser), run(args) -> exit code)``; see :mod:`dlir.cli`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

EXTRA_COMMANDS: list = []


# ----------------------------------------------------------------------------------- train
def _add_train(p) -> None:
    from .train_config import add_flags

    p.add_argument("--config", help="training configuration (TOML; see dlir.train_config); flags override its keys")
    p.add_argument("--out", help="job folder: config.toml, events.jsonl, train.log, checkpoints/, NAME.safetensors")
    p.add_argument("--resume", metavar="JOB_DIR", help="continue a stopped job from its last checkpoint")
    p.add_argument("--progress", choices=("auto", "bar", "jsonl", "none"), default="auto",
                   help="auto: a bar on a terminal; jsonl: the events also on stdout (for the DLIR Training module)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to JOB_DIR/tensorboard")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads of PyTorch (default: all cores; 1 per job on a shared machine)")
    add_flags(p)


def _run_train(args) -> int:

    from .errors import CancelledError, DLIRError
    from .train import EXIT_STOPPED, train

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


def _train_job(args):
    """(configuration, job folder) of ``dlir train`` from its arguments."""
    from .errors import InputError
    from .train import CONFIG_FILE
    from .train_config import TrainConfig, apply_flags

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


def _record_error(job, exc, progress: str) -> None:
    """An ``error`` event in an existing job folder (and on stdout with ``--progress jsonl``)."""
    from .train import EVENTS_FILE
    from .train_events import EventLog, stdout_echo

    events = EventLog(job / EVENTS_FILE if job is not None and job.is_dir() else None, stdout_echo(progress))
    events.emit("error", message=str(exc), kind=type(exc).__name__)
    events.close()


# ----------------------------------------------------------------------------------- evaluate, bench
def _require_matplotlib() -> None:
    from importlib.util import find_spec

    from .errors import InputError

    if find_spec("matplotlib") is None:
        raise InputError('the plots need matplotlib: install it with `pip install matplotlib==3.11.2` '
                         '(or `pip install -e ".[bench]"`), or pass --no-plots')


def _add_evaluate(p) -> None:
    p.add_argument("--pairs", required=True, help="a folder of pair folders (fixed.nii.gz, moving.nii.gz, fixed_labels, "
                   "moving_labels, landmarks.csv, gt_displacement) or a CSV with those columns (and id)")
    p.add_argument("--stack", required=True, action="append", metavar="[PATTERN=]STACK",
                   help="stage stack (file or registry name); repeat with PATTERN= (e.g. 'lung*=chest-ct') to choose by pair id")
    p.add_argument("--out", required=True, help="output folder: metrics.csv, timings.csv, summary.md, plots, panels/")
    p.add_argument("--refine", type=int, default=0, metavar="N", help="test-time refinement steps (default 0)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")


def _run_evaluate(args) -> int:
    from pathlib import Path

    from .evaluate import evaluate_command, summary_table

    if not args.no_plots:
        _require_matplotlib()
    out = Path(args.out)
    scores = evaluate_command(args.pairs, args.stack, out, args.refine, args.device, plots=not args.no_plots)
    print("\n".join(summary_table(scores)))
    print(f"report in {out} (summary.md, metrics.csv, timings.csv{'' if args.no_plots else ', plots'})")
    return 0


def _add_bench(p) -> None:
    p.add_argument("--pairs", help="pairs as for dlir evaluate (default: the bundled sample pair)")
    p.add_argument("--stack", required=True, action="append", metavar="[PATTERN=]STACK",
                   help="stage stack (file or registry name); repeat with PATTERN= to choose by pair id")
    p.add_argument("--refine", type=int, default=0, metavar="N", help="also run DLIR with N test-time refinement steps")
    p.add_argument("--quick", action="store_true",
                   help="few elastix iterations and small scaling sizes (a smoke test, not numbers)")
    p.add_argument("--sizes", type=int, nargs="*", metavar="N",
                   help="cubic sizes of the scaling table (default 64 128 192 256; none to skip)")
    p.add_argument("--scaling-pair", metavar="ID", help="the pair resampled for the scaling table (default: the first)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for DLIR and elastix (default 2)")
    p.add_argument("--repeats", type=int, nargs=2, default=(3, 1), metavar=("DLIR", "ELASTIX"),
                   help="timed runs per registration (default 3 1); the fastest counts (DLIR: after the first)")
    p.add_argument("--out", help="output folder (default: a new temporary folder)")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")


def _run_bench(args) -> int:
    import sys
    from pathlib import Path

    from .bench import bench_command

    if not args.no_plots:
        _require_matplotlib()
    comparison, scaling, out = bench_command(
        args.pairs, args.stack, Path(args.out) if args.out else None, args.refine, args.quick, args.sizes, args.threads,
        args.scaling_pair, tuple(args.repeats), plots=not args.no_plots,
        log=lambda message: print(message, file=sys.stderr, flush=True),
    )
    print("\n".join(comparison))
    if scaling:
        print("\nScaling (one pair resampled to cubic grids; time end to end, peak RSS of the process):")
        print("\n".join(scaling))
    print(f"\nreport in {out} (bench.md, summary.md, metrics.csv, plots, runs/)")
    return 0


EXTRA_COMMANDS += [
    ("train", "train a stage stack, stage by stage, with checkpoints, resume and progress events", _add_train, _run_train),
    ("evaluate", "paper-style evaluation of a stack on pairs: Dice, HD, ASD, TRE, folding, time; tables and plots",
     _add_evaluate, _run_evaluate),
    ("bench", "DLIR against elastix on the same pairs: one comparison table and a scaling table", _add_bench, _run_bench),
]
