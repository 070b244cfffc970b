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
import io
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io import read_image
from .landmarks import read_landmark_pairs
from .prefetch import read_pair_images


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
        id=check_pair_id(folder.resolve().name, f"the pair folder {folder}"),
        fixed=_pair_file(folder, "fixed"),  # type: ignore[arg-type]  # checked by the caller
        moving=moving,
        fixed_labels=_pair_file(folder, "fixed_labels"),
        moving_labels=_pair_file(folder, "moving_labels"),
        fixed_mask=_pair_file(folder, "fixed_mask"),
        landmarks=landmarks if landmarks.is_file() else None,
        gt_displacement=_pair_file(folder, "gt_displacement"),
    )


def _pairs_from_csv(path: Path) -> list[Pair]:
    rows = _read_csv_rows(path)
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
        given = (row.get("id") or "").strip()
        pairs.append(Pair(id=check_pair_id(given, f"row {n + 2} of {path}") if given else f"pair{n:03d}", **paths))
    seen: dict[str, str] = {}
    for p in pairs:
        key = p.id.casefold()  # "Case1" and "case1" are one folder on macOS and Windows
        if key in seen:
            raise InputError(f"the pairs file {path} uses the id {p.id!r} twice"
                             f"{'' if seen[key] == p.id else f' (as {seen[key]!r})'}; ids name the output folders and must be unique")
        seen[key] = p.id
    return pairs


#: what an id may be at most: it names a folder (255 bytes on most file systems, less dlir's staging prefix)
MAX_ID_BYTES = 200
#: names a pair id may not have: the cohort's table beside the pair folders
RESERVED_IDS = ("summary.csv",)


def check_pair_id(pair_id: str, where: str) -> str:
    """``pair_id`` when it is a plain folder name, else :class:`InputError` naming ``where`` (e.g. "row 3 of pairs.csv").

    A pair's outputs go to ``OUT/ID``: an id must not lead outside ``OUT`` or onto another file,
    so it has no path separator (``/``, ``\\``), no drive colon, no control character, is not
    ``.`` or ``..`` or empty, not ``summary.csv``, and is at most 200 bytes (UTF-8).
    """
    bad = None
    if not pair_id:
        bad = "is empty"
    elif pair_id in (".", ".."):
        bad = "is a relative folder reference"
    elif any(c in pair_id for c in "/\\"):
        bad = "holds a path separator"
    elif ":" in pair_id:
        bad = "holds a colon (a drive or stream name on Windows)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in pair_id):
        bad = "holds a control character"
    elif pair_id.casefold() in RESERVED_IDS:
        bad = "is the name of the cohort's summary table"
    elif len(pair_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        bad = f"is longer than {MAX_ID_BYTES} bytes"
    if bad is not None:
        raise InputError(f"the id {_shown(pair_id)} in {where} {bad}; an id names the pair's output folder and must be a plain name")
    return pair_id


def _shown(text: str, limit: int = 120) -> str:
    """``text`` quoted with its control characters escaped, shortened to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


#: byte-order marks and the encodings they announce (UTF-32 before UTF-16: FF FE 00 00 starts with FF FE)
_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def _read_csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file as dicts (header names stripped), read as UTF-8, or UTF-8/16/32 with a byte-order mark.

    Anything else (Latin-1 or Windows-1252 bytes that are not UTF-8, UTF-16 without a mark, a
    binary file) is refused with a sentence naming the file and the problem.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"the pairs file {path} cannot be read ({exc.strerror or exc})") from exc
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InputError(
            f"the pairs file {path} is not valid {'UTF-8' if encoding == 'utf-8' else encoding.upper()} text "
            f"(byte 0x{data[exc.start]:02x} at position {exc.start}); save it as UTF-8 (in Excel: CSV UTF-8)"
        ) from exc
    text = text.removeprefix("\ufeff")
    if "\x00" in text:
        raise InputError(f"the pairs file {path} holds NUL characters (UTF-16 text without a byte-order mark, or not "
                         "text at all); save it as UTF-8 (in Excel: CSV UTF-8)")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        reader.fieldnames = [name.strip() if isinstance(name, str) else name for name in header]
        doubled = sorted({name for name in reader.fieldnames if name and reader.fieldnames.count(name) > 1})
        if doubled:
            raise InputError(f"the pairs file {path} names the column {doubled[0]!r} twice")
        return list(reader)
    except csv.Error as exc:
        raise InputError(f"the pairs file {path} is not a valid CSV file (line {reader.line_num + 1}: {exc})") from exc


def load_pair(pair: Pair) -> PairData:
    """Read every file of ``pair`` (images as stored, landmarks as LPS mm).

    The images are read as ``dlir register`` reads them (:func:`dlir.prefetch.read_pair_images`: the
    same sentences, fixed labels checked against the fixed grid); then the landmarks and the
    ground-truth displacement.
    """
    images = read_pair_images(pair.fixed, pair.moving, pair.moving_labels, pair.fixed_mask, pair.fixed_labels)
    points = read_landmark_pairs(pair.landmarks) if pair.landmarks is not None else (None, None)
    return PairData(
        pair=pair,
        fixed=images.fixed,
        moving=images.moving,
        fixed_labels=images.fixed_labels,
        moving_labels=images.moving_labels,
        fixed_mask=images.fixed_mask,
        fixed_points=points[0],
        moving_points=points[1],
        gt_displacement=None if pair.gt_displacement is None else read_image(pair.gt_displacement, "ground-truth displacement"),
    )


def sample_pair() -> Pair:
    """The sample pair shipped in ``Resources/SampleData`` (MNI152 at 2 mm with tissue labels)."""
    folder = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"
    files = {name: folder / f"sample_{name}.nii.gz" for name in ("fixed", "moving", "fixed_labels", "moving_labels")}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise InputError(f"the bundled sample pair is incomplete in {folder} (missing {', '.join(missing)}); give --pairs")
    return Pair(id="sample", **files)
