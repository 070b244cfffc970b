"""``dlir.cohort.register_cohort`` called as a script or the Slicer module would: pairs in, one row per pair
out (a failing pair recorded, the others registered), progress after each pair, the folder as the CLI writes it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dlir.cohort import SUMMARY_COLUMNS, register_cohort
from dlir.pairs import Pair


def test_pairs_in_rows_out_with_progress(fresh_stack_file: Path, tmp_path: Path) -> None:
    for k in range(2):
        image = sitk.GetImageFromArray(np.random.default_rng(k).random((12, 14, 16)).astype(np.float32))
        image.SetSpacing((2.0, 2.0, 2.5))
        sitk.WriteImage(image, str(tmp_path / f"image{k}.nii.gz"))
    pairs = [Pair("good", tmp_path / "image0.nii.gz", tmp_path / "image1.nii.gz"),
             Pair("missing", tmp_path / "image0.nii.gz", tmp_path / "absent.nii.gz")]
    calls: list[tuple[int, int]] = []
    out = tmp_path / "cohort"
    rows = register_cohort(pairs, fresh_stack_file, out, device="cpu", outputs=("warped",),
                           progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]
    assert [row["id"] for row in rows] == ["good", "missing"] and all(set(row) == set(SUMMARY_COLUMNS) for row in rows)
    assert rows[0]["status"] == "ok" and float(rows[0]["total_s"]) > 0
    assert str(rows[1]["status"]).startswith("error: ") and "absent.nii.gz" in str(rows[1]["status"])
    assert sorted(p.name for p in (out / "good").iterdir()) == ["result.json", "warped.nii.gz"]
    assert not (out / "missing").exists()
    with (out / "summary.csv").open(newline="", encoding="utf-8") as f:
        assert [row["status"] for row in csv.DictReader(f)] == [row["status"] for row in rows]
