"""The ``dlir`` command: ``dlir register | info`` (and the commands other modules add).

Every user-caused failure ends with ``error: <one sentence>`` on stderr and exit code 2;
input files are only ever read.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import SimpleITK as sitk
from tqdm import tqdm

from . import __version__
from .errors import DLIRError, InputError
from .io import read_image, write_image, write_transform
from .stack import Stack, describe, list_stacks, load_stack, read_manifest, resolve_stack

EXIT_USER_ERROR = 2

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


# ----------------------------------------------------------------------------------- register
def _add_register(p: argparse.ArgumentParser) -> None:
    p.add_argument("fixed", nargs="?", help="fixed image (NIfTI, NRRD, MHA or a DICOM folder)")
    p.add_argument("moving", nargs="?", help="moving image, registered onto the fixed one")
    p.add_argument("--pairs", help="instead of FIXED MOVING: a CSV of pairs (columns fixed, moving and optionally moving_labels, "
                   "fixed_mask, fixed_labels, id) or a folder of pair folders (fixed.nii.gz, moving.nii.gz, ...)")
    p.add_argument("--stack", required=True, help="stage stack: a .safetensors file or a registry name (see dlir info --list)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--moving-labels", help="label map on the moving grid, propagated to the fixed image")
    p.add_argument("--fixed-mask", help="mask on the fixed grid: folding and Jacobian statistics are computed inside it")
    p.add_argument("--fixed-labels", help="label map on the fixed grid: Dice before/after is reported")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--refine", type=int, default=0, metavar="N", help="test-time refinement: N optimiser steps (default 0)")
    p.add_argument("--initial-alignment", choices=("centre", "com", "none"), help="override the stack's initial alignment")
    p.add_argument("--label-interpolation", choices=("nearest", "one-hot-linear"), default="nearest")


def register_pair(
    stack: Stack,
    fixed_path: str | Path,
    moving_path: str | Path,
    out: Path,
    *,
    moving_labels: str | Path | None = None,
    fixed_mask: str | Path | None = None,
    fixed_labels: str | Path | None = None,
    device: str = "auto",
    refine_steps: int = 0,
    initial_alignment: str | None = None,
    label_interpolation: str = "nearest",
    show_progress: bool = True,
) -> dict[str, object]:
    """Read, register and write one pair into ``out``; returns the contents of ``result.json``."""
    from .register import register

    t0 = time.perf_counter()
    fixed = read_image(fixed_path, "fixed image")
    moving = read_image(moving_path, "moving image")
    labels = None if moving_labels is None else read_image(moving_labels, "moving label map")
    mask = None if fixed_mask is None else read_image(fixed_mask, "fixed mask")
    reference = None if fixed_labels is None else read_image(fixed_labels, "fixed label map")
    read_s = time.perf_counter() - t0

    with tqdm(total=100, desc="register", unit="%", disable=not show_progress, leave=False,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}") as bar:
        def progress(step: str, fraction: float) -> None:
            bar.set_postfix_str(step)
            bar.update(round(100 * fraction) - bar.n)

        reg = register(fixed, moving, stack, moving_labels=labels, fixed_mask=mask, device=device,
                       refine_steps=refine_steps, initial_alignment=initial_alignment,
                       label_interpolation=label_interpolation, progress=progress)

    t1 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    write_image(reg.warped, out / "warped.nii.gz")
    write_image(reg.jacobian, out / "jacobian.nii.gz")
    write_transform(reg.itk_transform(), out / "transform.h5")
    if reg.warped_labels is not None:
        write_image(reg.warped_labels, out / "labels.nii.gz")
    timings = {"read": read_s, **reg.timings, "write": time.perf_counter() - t1}
    result: dict[str, object] = {
        **reg.summary(),
        "fixed": str(fixed_path),
        "moving": str(moving_path),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "total_s": round(sum(timings.values()), 4),
    }
    if reference is not None and labels is not None and reg.warped_labels is not None:
        result["dice"] = _dice_before_after(reference, labels, reg.warped_labels)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _dice_before_after(reference: sitk.Image, moving_labels: sitk.Image, warped_labels: sitk.Image) -> dict[str, dict[str, float]]:
    """Dice per label of the fixed labels against the moving labels (resampled as is) and the warped ones."""
    from .metrics import dice

    identity = sitk.Resample(moving_labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    before, after = dice(reference, identity), dice(reference, warped_labels)
    return {str(k): {"before": before[k], "after": after[k]} for k in sorted(after)}


def _run_register(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is an existing file; give a folder for the results")
    stack = load_stack(args.stack)
    options = dict(device=args.device, refine_steps=args.refine, initial_alignment=args.initial_alignment,
                   label_interpolation=args.label_interpolation)
    if args.pairs:
        if args.fixed or args.moving:
            raise InputError("give either FIXED MOVING or --pairs, not both")
        return _register_cohort(stack, Path(args.pairs), out, options)
    if not (args.fixed and args.moving):
        raise InputError("dlir register needs FIXED and MOVING images (or --pairs PAIRS.csv)")
    result = register_pair(stack, args.fixed, args.moving, out, moving_labels=args.moving_labels,
                           fixed_mask=args.fixed_mask, fixed_labels=args.fixed_labels,
                           show_progress=sys.stderr.isatty(), **options)
    _print_result(result, out)
    return 0


def _print_result(result: dict, out: Path) -> None:
    print(f"registered with {result['stack']} on {result['device']} in {result['total_s']:.2f} s "
          f"(folding {100 * float(result['folding_fraction']):.3f} %, std Jacobian {float(result['jacobian_std']):.3f})")
    for label, d in dict(result.get("dice", {})).items():
        print(f"  label {label}: Dice {d['before']:.3f} -> {d['after']:.3f}")
    print(f"outputs in {out}")


def _register_cohort(stack: Stack, source: Path, out: Path, options: dict) -> int:
    """Register every pair of a CSV or a folder of pair folders (see :mod:`dlir.pairs`) into ``out/ID``."""
    from .pairs import read_pairs

    pairs = read_pairs(source)
    rows, failures = [], 0
    for pair in tqdm(pairs, desc="pairs", unit="pair", disable=not sys.stderr.isatty()):
        try:
            result = register_pair(stack, pair.fixed, pair.moving, out / pair.id, moving_labels=pair.moving_labels,
                                   fixed_mask=pair.fixed_mask, fixed_labels=pair.fixed_labels, show_progress=False, **options)
            rows.append({"id": pair.id, "status": "ok", "total_s": result["total_s"],
                         "folding_fraction": result["folding_fraction"], "jacobian_std": result["jacobian_std"]})
        except DLIRError as exc:
            failures += 1
            rows.append({"id": pair.id, "status": f"error: {exc}", "total_s": "", "folding_fraction": "", "jacobian_std": ""})
    out.mkdir(parents=True, exist_ok=True)
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(pairs) - failures} of {len(pairs)} pairs registered; summary in {out / 'summary.csv'}")
    for row in rows:
        if row["status"] != "ok":
            print(f"  {row['id']}: {row['status']}", file=sys.stderr)
    return 0 if failures == 0 else 1


# ----------------------------------------------------------------------------------- info
def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("stack", nargs="?", help="a .safetensors stack file or a registry name")
    p.add_argument("--list", action="store_true", help="list the stacks in the registry")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def _run_info(args: argparse.Namespace) -> int:
    if args.list or not args.stack:
        stacks = list_stacks()
        if not stacks:
            print("no stacks in the registry")
        for info in stacks:
            m = info.manifest
            print(f"{info.name:<20} {m.modality or '-':<6} {m.anatomy or '-':<10} {info.path}")
        return 0
    path = resolve_stack(args.stack)
    load_stack(path)  # full validation, not just the manifest
    manifest = read_manifest(path)
    print(json.dumps(manifest.to_dict(), indent=2) if args.json else describe(manifest, path))
    return 0


COMMANDS: list[Command] = [
    ("register", "register a pair (or a cohort) with a stage stack", _add_register, _run_register),
    ("info", "show a stack's manifest, or list the registry", _add_info, _run_info),
]


def build_parser(commands: Sequence[Command] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlir", description="DLIR: deep-learning image registration (de Vos et al. 2019)")
    parser.add_argument("--version", action="version", version=f"dlir {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add, run in commands or COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(run=run)
    return parser


def all_commands() -> list[Command]:
    """The built-in commands plus those of the training and evaluation modules."""
    from .commands import EXTRA_COMMANDS

    return COMMANDS + EXTRA_COMMANDS


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(all_commands()).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return int(args.run(args))
    except DLIRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
