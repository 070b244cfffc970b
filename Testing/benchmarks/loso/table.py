"""The table of ``run.sh``: per pair, Dice over all labels (and mean TRE, folding when above 0) of each evaluation.

    python table.py EVAL_FOLDER NAME [NAME ...]     (NAME: a ``dlir evaluate`` output folder in EVAL_FOLDER)
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

PAIRS = ("brain1_aniso_oblique", "brain_2to1", "mni_iso2mm", "mni_oblique_aniso", "lung1_aniso",
         "mni_iso2mm_h", "mni_oblique_aniso_h", "brain2_aniso")


def rows(folder: Path) -> dict[tuple[str, str], dict[str, str]]:
    """(pair, method) -> the row of all labels of ``metrics.csv``; methods ``identity`` and the registration."""
    with (folder / "metrics.csv").open(newline="", encoding="utf-8") as f:
        return {(r["pair"], "identity" if r["method"] == "identity" else "dlir"): r for r in csv.DictReader(f) if r["label"] == "all"}


def cell(row: dict[str, str] | None) -> str:
    if row is None:
        return "–"
    text = f"{float(row['dice']):.3f}"
    if row["tre_mean"]:
        text += f" / {float(row['tre_mean']):.2f} mm"
    if row["folding_fraction"] and float(row["folding_fraction"]) > 0:
        text += f" / folds {100 * float(row['folding_fraction']):.4f} %"
    return text


def main(folder: Path, names: list[str]) -> None:
    data = {name: rows(folder / name) for name in names}
    print("| pair | before | " + " | ".join(names) + " |")
    print("|" + " --- |" * (len(names) + 2))
    for pair in PAIRS:
        before = data[names[0]].get((pair, "identity"))
        print(f"| {pair} | {cell(before)} | " + " | ".join(cell(data[n].get((pair, "dlir"))) for n in names) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
