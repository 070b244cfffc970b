"""Evaluation pairs: where their files are (a folder of pair folders, or a CSV) and loading them.

A pair folder holds ``fixed.nii.gz`` and ``moving.nii.gz`` and optionally ``fixed_labels``,
``moving_labels``, ``fixed_mask`` (``.nii.gz``), ``landmarks.csv`` (``id,fixed_x,fixed_y,fixed_z,
moving_x,moving_y,moving_z``, LPS mm) and ``gt_displacement.nii.gz`` (the true fixed -> moving
displacement on the fixed grid, LPS mm), as in ``../shared/data/pairs``.  A CSV lists the same
with the columns ``id, fixed, moving, fixed_labels, moving_labels, fixed_mask, landmarks,
gt_displacement`` (paths relative to the CSV; only ``fixed`` and ``moving`` are required).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io import read_image
from .landmarks import read_landmark_pairs


@dataclass(frozen=True)
class Pair:
    """The files of one evaluation pair (``None`` where the pair has no such file)."""

    id: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    fixed_mask: Path | None = None
    landmarks: Path | None = None
    gt_displacement: Path | None = None


@dataclass
class PairData:
    """A pair's images in memory (SimpleITK, LPS mm) and landmarks ``[n, 3]`` (LPS mm)."""

    pair: Pair
    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image | None
    moving_labels: sitk.Image | None
    fixed_mask: sitk.Image | None
    fixed_points: np.ndarray | None
    moving_points: np.ndarray | None
    gt_displacement: sitk.Image | None


def read_pairs(source: str | Path) -> list[Pair]:
    """The pairs listed by a CSV file, found in a folder of pair folders, or the one pair folder ``source``."""
    source = Path(source)
    if source.is_file():
        return _pairs_from_csv(source)
    if not source.is_dir():
        raise InputError(f"the pairs {source} do not exist (give a folder of pair folders or a CSV file)")
    if _pair_file(source, "fixed") is not None:
        return [_pair_from_folder(source)]
    pairs = [_pair_from_folder(d) for d in sorted(source.iterdir()) if d.is_dir() and _pair_file(d, "fixed") is not None]
    if not pairs:
        raise InputError(f"the folder {source} holds no pair folders (each needs fixed.nii.gz and moving.nii.gz)")
    return pairs


def _pair_file(folder: Path, stem: str) -> Path | None:
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _pair_from_folder(folder: Path) -> Pair:
    moving = _pair_file(folder, "moving")
    if moving is None:
        raise InputError(f"the pair folder {folder} has a fixed image but no moving image (moving.nii.gz)")
    landmarks = folder / "landmarks.csv"
    return Pair(
        id=folder.name,
        fixed=_pair_file(folder, "fixed"),  # type: ignore[arg-type]  # checked by the caller
        moving=moving,
        fixed_labels=_pair_file(folder, "fixed_labels"),
        moving_labels=_pair_file(folder, "moving_labels"),
        fixed_mask=_pair_file(folder, "fixed_mask"),
        landmarks=landmarks if landmarks.is_file() else None,
        gt_displacement=_pair_file(folder, "gt_displacement"),
    )


def _pairs_from_csv(path: Path) -> list[Pair]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise InputError(f"the pairs file {path} lists no pairs")
    missing = {"fixed", "moving"} - set(rows[0])
    if missing:
        raise InputError(f"the pairs file {path} needs the columns fixed and moving (missing: {', '.join(sorted(missing))})")
    known = {f.name for f in fields(Pair)}
    pairs = []
    for n, row in enumerate(rows):
        paths = {k: path.parent / v.strip() for k, v in row.items() if k in known and k != "id" and v and v.strip()}
        if "fixed" not in paths or "moving" not in paths:
            raise InputError(f"row {n + 2} of {path} has no fixed or no moving image")
        pairs.append(Pair(id=(row.get("id") or "").strip() or f"pair{n:03d}", **paths))
    ids = [p.id for p in pairs]
    if len(set(ids)) != len(ids):
        raise InputError(f"the pairs file {path} uses an id twice; ids name the output rows and must be unique")
    return pairs


def load_pair(pair: Pair) -> PairData:
    """Read every file of ``pair`` (images as stored, landmarks as LPS mm)."""
    def optional(p: Path | None, what: str) -> sitk.Image | None:
        return None if p is None else read_image(p, what)

    points = read_landmark_pairs(pair.landmarks) if pair.landmarks is not None else (None, None)
    return PairData(
        pair=pair,
        fixed=read_image(pair.fixed, "fixed image"),
        moving=read_image(pair.moving, "moving image"),
        fixed_labels=optional(pair.fixed_labels, "fixed label map"),
        moving_labels=optional(pair.moving_labels, "moving label map"),
        fixed_mask=optional(pair.fixed_mask, "fixed mask"),
        fixed_points=points[0],
        moving_points=points[1],
        gt_displacement=optional(pair.gt_displacement, "ground-truth displacement"),
    )


def sample_pair() -> Pair:
    """The sample pair shipped in ``Resources/SampleData`` (MNI152 at 2 mm with tissue labels)."""
    folder = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"
    files = {name: folder / f"sample_{name}.nii.gz" for name in ("fixed", "moving", "fixed_labels", "moving_labels")}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise InputError(f"the bundled sample pair is incomplete in {folder} (missing {', '.join(missing)}); give --pairs")
    return Pair(id="sample", **files)
