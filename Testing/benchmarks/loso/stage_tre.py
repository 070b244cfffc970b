"""Mean landmark error (mm) after each stage of a stack, per pair, next to the best any affine can do.

    PYTHONPATH=DLIRRegistration python Testing/benchmarks/loso/stage_tre.py STACK PAIRS.csv

``PAIRS.csv`` as ``dlir evaluate --pairs`` takes it (columns id, fixed, moving, landmarks; relative paths
relative to the CSV).  Columns: before, after the initial alignment and after each stage (one shot), and
"best affine": the least-squares affine of the landmarks themselves, the floor of an affine stage.  Shows
where a stack's error is left (issue 12: the paper's affine head left the landmarks where they were).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from dlir.geometry import Grid
from dlir.landmarks import read_landmark_pairs
from dlir.alignment import DEFAULT_ALIGNMENT, initial_alignment
from dlir.pipeline import PreparedImage, run_stages
from dlir.stack import load_stack
from dlir.transforms import Composite


def best_affine_error(fixed: np.ndarray, moving: np.ndarray) -> float:
    """Mean distance (mm) left by the least-squares affine fixed -> moving of the landmarks."""
    design = np.c_[fixed, np.ones(len(fixed))]
    solution, *_ = np.linalg.lstsq(design, moving, rcond=None)
    return float(np.linalg.norm(design @ solution - moving, axis=1).mean())


def stage_errors(stack, fixed_path: Path, moving_path: Path, fixed_points: np.ndarray, moving_points: np.ndarray) -> list[float]:
    """Mean landmark distance (mm) after T0, T0 o T1, ... (the fixed points mapped by the composed transform)."""
    fixed, moving = sitk.ReadImage(str(fixed_path)), sitk.ReadImage(str(moving_path))
    output_grid = Grid.from_image(fixed)
    offset = -output_grid.centre()  # the engine's frame: centred on the fixed image (dlir.register)
    fixed_grid, moving_grid = output_grid.translated(offset), Grid.from_image(moving).translated(offset)
    intensity = stack.manifest.recipe.intensity
    fixed_p = PreparedImage.from_array(sitk.GetArrayViewFromImage(fixed), fixed_grid, intensity)
    moving_p = PreparedImage.from_array(sitk.GetArrayViewFromImage(moving), moving_grid, intensity)
    with torch.no_grad():
        transforms = run_stages(stack, fixed_p, moving_p, initial_alignment(DEFAULT_ALIGNMENT, fixed_p, moving_p), skip_worse=True)
        points = torch.as_tensor(fixed_points + offset, dtype=torch.float32)[None]
        mapped = [Composite(transforms[:k])(points)[0].numpy() - offset for k in range(1, len(transforms) + 1)]
    return [float(np.linalg.norm(m - moving_points, axis=1).mean()) for m in mapped]


def main(stack_path: str, pairs_csv: str) -> None:
    torch.set_num_threads(2)
    stack = load_stack(stack_path).eval()
    base = Path(pairs_csv).resolve().parent
    stages = [f"{k + 1} {s.spec.kind}" for k, s in enumerate(stack.stages)]
    print("| pair | before | initial | " + " | ".join(stages) + " | best affine |")
    print("|" + " --- |" * (len(stages) + 4))
    with open(pairs_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if not row.get("landmarks"):
                continue
            fixed_points, moving_points = read_landmark_pairs(base / row["landmarks"])
            errors = stage_errors(stack, base / row["fixed"], base / row["moving"], fixed_points, moving_points)
            before = float(np.linalg.norm(fixed_points - moving_points, axis=1).mean())
            cells = [f"{e:.2f}" for e in [before, *errors, best_affine_error(fixed_points, moving_points)]]
            print(f"| {row['id']} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
