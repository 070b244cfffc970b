"""Dice of the capture search alone (inference's initial alignment, no network) on the pairs of a CSV, for comparing a
stack's one-shot result with what the stages start from.

    OMP_NUM_THREADS=1 PYTHONPATH=DLIRRegistration .venv/bin/python Testing/benchmarks/intersubject/capture_alone.py PAIRS.csv

The stack is ``Testing/testdata.py``'s identity B-spline stack (its untrained stage is exactly the identity), so the
result is the search's affine; ``--similarity auto`` as ``dlir register`` (MIND-SSC for different contrasts).  Prints
per pair the automatic contrast choice, the mean Dice of the fixed labels and Dice per label.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testdata import identity_bspline_stack  # noqa: E402

from dlir.metrics import dice  # noqa: E402
from dlir.register import register  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", type=Path, help="a CSV with id, fixed, moving, fixed_labels, moving_labels")
    args = parser.parse_args()
    stack = identity_bspline_stack()
    with args.pairs.open(newline="") as handle:
        for row in csv.DictReader(handle):
            moving_labels, fixed_labels = sitk.ReadImage(row["moving_labels"]), sitk.ReadImage(row["fixed_labels"])
            result = register(sitk.ReadImage(row["fixed"]), sitk.ReadImage(row["moving"]), stack, moving_labels=moving_labels,
                              outputs=("labels",))
            reference = sitk.GetArrayFromImage(fixed_labels)
            scores = dice(reference, sitk.GetArrayFromImage(result.warped_labels), [int(v) for v in np.unique(reference) if v])
            print(f"{row['id']}: {result.contrast.contrast} contrast, Dice {np.mean(list(scores.values())):.3f} "
                  f"({', '.join(f'{k}: {v:.3f}' for k, v in scores.items())})")


if __name__ == "__main__":
    main()
