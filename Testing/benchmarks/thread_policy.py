#!/usr/bin/env python3
"""PyTorch's CPU thread policy on a busy machine (issue 28): the capture search and ``grid_sample`` with 2 threads
(libgomp's default wait policy), 2 threads with ``OMP_WAIT_POLICY=PASSIVE``, and 1 thread.

``OMP_WAIT_POLICY`` is read once, when the OpenMP runtime starts (torch's import), so every policy runs in its own
process; the processes alternate (A, B, C, A, B, C, ...) for ``--rounds`` rounds, and each keeps the best of
``--repeats`` timings of each task.  ``--busy N`` adds N processes of this script spinning on one core each for the
whole comparison (as the busy-machine runs of ``accurate.sh``), after the same comparison without them.  The load
average is printed with every row: only the ratios between policies within one condition mean anything.

    PYTHONPATH=DLIRRegistration python Testing/benchmarks/thread_policy.py ../shared/data/pairs/mni_iso2mm \\
        [--rounds 3] [--repeats 3] [--busy 1]

Tasks: the capture search (:func:`dlir.alignment.search`, NCC, on the pair's images normalised as ``register`` does
them; a fresh :class:`~dlir.pipeline.PreparedImage` each time, so its anti-aliased copies are made each time too),
and trilinear ``grid_sample`` of the moving image at a 32 x 224 x 224 block of points (1.6 M) slightly rotated and
scaled (coherent, as full resolution samples the moving block).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

POLICIES = {  # name: (threads, extra environment)
    "2 threads": (2, {}),
    "2 threads, PASSIVE": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "1 thread": (1, {}),
}


def child(pair: Path, threads: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds of each task in this process (torch imported here, after the environment is set)."""
    import SimpleITK as sitk
    import torch
    import torch.nn.functional as F

    from dlir.alignment import search
    from dlir.geometry import Grid
    from dlir.pipeline import PreparedImage
    from dlir.stack import load_stack

    torch.set_num_threads(threads)
    intensity = load_stack("brain-mri").manifest.recipe.intensity
    images = [sitk.ReadImage(str(pair / f"{n}.nii.gz")) for n in ("fixed", "moving")]
    arrays = [(sitk.GetArrayFromImage(i), Grid.from_image(i)) for i in images]
    best = {"capture search": float("inf"), "grid_sample": float("inf")}
    moving = torch.from_numpy(arrays[1][0].astype("float32"))[None, None]
    angle = 0.1
    theta = torch.tensor([[[0.9 * math.cos(angle), -math.sin(angle), 0.0, 0.02], [math.sin(angle), 0.9 * math.cos(angle), 0.0, -0.03],
                           [0.0, 0.0, 0.95, 0.01]]])
    coords = F.affine_grid(theta, [1, 1, 32, 224, 224], align_corners=True)
    for _ in range(repeats):
        fixed_p, moving_p = (PreparedImage.from_array(a, grid, intensity, "cpu") for a, grid in arrays)
        t = time.perf_counter()
        search(fixed_p, moving_p)
        best["capture search"] = min(best["capture search"], time.perf_counter() - t)
        t = time.perf_counter()
        F.grid_sample(moving, coords, mode="bilinear", padding_mode="zeros", align_corners=True)
        best["grid_sample"] = min(best["grid_sample"], time.perf_counter() - t)
    return best


def _spin() -> None:
    while True:
        pass


def compare(args: argparse.Namespace, label: str) -> None:
    results: dict[str, dict[str, float]] = {}
    loads = []
    for _ in range(args.rounds):
        for name, (threads, extra) in POLICIES.items():
            env = {**os.environ, **extra, "OMP_NUM_THREADS": str(threads)}
            run = subprocess.run([sys.executable, __file__, str(args.pair), "--child", str(threads), "--repeats",
                                  str(args.repeats)], env=env, capture_output=True,
                                 text=True, check=True)
            times = json.loads(run.stdout.strip().splitlines()[-1])
            kept = results.setdefault(name, {})
            for task, seconds in times.items():
                kept[task] = min(kept.get(task, float("inf")), seconds)
            loads.append(os.getloadavg()[0])
    print(f"\n{label}: load (1 min) {min(loads):.2f}-{max(loads):.2f} over the runs; best of {args.rounds} processes x "
          f"{args.repeats} repeats (s)")
    tasks = list(next(iter(results.values())))
    print("| policy | " + " | ".join(tasks) + " |")
    print("| --- " * (1 + len(tasks)) + "|")
    for name, times in results.items():
        print(f"| {name} | " + " | ".join(f"{times[t]:.3f}" for t in tasks) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pair", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="then the same with this many spinning processes")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.spin:
        _spin()
    if args.child is not None:
        print(json.dumps(child(args.pair, args.child, args.repeats)))
        return
    print(f"cores {os.cpu_count()}, load {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    compare(args, "as the machine is")
    if args.busy:
        spinners = [subprocess.Popen([sys.executable, __file__, str(args.pair), "--spin"]) for _ in range(args.busy)]
        try:
            compare(args, f"{args.busy} more process(es) spinning")
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()


if __name__ == "__main__":
    main()
