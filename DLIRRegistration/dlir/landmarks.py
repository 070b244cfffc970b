"""Landmark files in and out; points are always ``[n, 3]`` arrays of LPS coordinates in mm.

Formats:

* a pair's ``landmarks.csv``: header ``id,fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z``,
  LPS mm (corresponding fixed and moving points);
* a plain point ``.csv``: a header with columns ``x, y, z`` (other columns such as ``id`` or
  ``label`` are ignored), LPS mm;
* Slicer's legacy ``.fcsv``: ``#`` header lines, one of them ``# CoordinateSystem = RAS|LPS|0|1``
  (0 = RAS, 1 = LPS), then rows ``id,x,y,z,...`` (Slicer reads x, y, z from fields 1-3 whatever
  the ``# columns`` line says, and so does this module);
* Slicer markups ``.mrk.json``: ``markups[0].controlPoints[].position`` in
  ``markups[0].coordinateSystem`` (``RAS`` or ``LPS``; LPS when absent, as in Slicer's schema) and
  ``coordinateUnits`` (``mm`` or ``um``; mm when absent).

RAS points are converted to LPS by negating x and y.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .geometry import flip_ras_lps

_FCSV_SYSTEMS = {"0": "RAS", "RAS": "RAS", "1": "LPS", "LPS": "LPS"}
_JSON_UNITS_MM = {"mm": 1.0, "um": 1e-3}
_MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#"
)
_PAIR_COLUMNS = [f"{side}_{axis}" for side in ("fixed", "moving") for axis in "xyz"]


# ------------------------------------------------------------------------------------- helpers
def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"the landmark file {path} does not exist")
    return path


def _text(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark, as spreadsheet programs write, is dropped)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path.name} is not a text file (UTF-8)") from exc


def _coordinates(values: list[str], path: Path, where: str) -> list[float]:
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        numbers = []
    if len(numbers) != len(values) or not np.all(np.isfinite(numbers)):
        raise InputError(f"{path.name}, {where}: expected finite numbers for the coordinates, got {', '.join(values)}")
    return numbers


def _as_points(rows: list[list[float]], path: Path) -> np.ndarray:
    if not rows:
        raise InputError(f"{path.name} holds no landmarks")
    return np.asarray(rows, dtype=np.float64)


def _read_columns(path: Path, columns: list[str]) -> np.ndarray:
    """The named columns (header names, case-insensitive) of a CSV file as floats ``[n, len(columns)]``."""
    reader = csv.reader(io.StringIO(_text(path), newline=""))
    header = [name.strip().lower() for name in next(reader, [])]
    missing = [c for c in columns if c not in header]
    if missing:
        raise InputError(f"{path.name} needs a header with the columns {', '.join(columns)} (LPS mm); "
                         f"missing {', '.join(missing)}")
    where = [header.index(c) for c in columns]
    rows = []
    for row in reader:
        if not any(field.strip() for field in row):
            continue
        if len(row) != len(header):
            raise InputError(f"{path.name}, line {reader.line_num}: {len(row)} values "
                             f"where the header names {len(header)} columns")
        rows.append(_coordinates([row[i] for i in where], path, f"line {reader.line_num}"))
    return _as_points(rows, path)


# ------------------------------------------------------------------------------------- reading
def read_landmark_pairs(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Corresponding (fixed, moving) LPS points ``[n, 3]`` (mm) from a pair's ``landmarks.csv``."""
    points = _read_columns(_existing(path), _PAIR_COLUMNS)
    return points[:, :3], points[:, 3:]


def read_points(path: str | Path) -> np.ndarray:
    """LPS points ``[n, 3]`` (mm) from a ``.csv`` (x,y,z in LPS), ``.fcsv`` or ``.mrk.json`` file (RAS converted)."""
    path = _existing(path)
    name = path.name.lower()
    if name.endswith(".mrk.json"):
        return _read_markups_json(path)
    if name.endswith(".fcsv"):
        return _read_fcsv(path)
    if name.endswith(".csv"):
        return _read_columns(path, ["x", "y", "z"])
    raise InputError(f"unknown landmark format {path.name}: use .csv (x,y,z in LPS mm), .fcsv or .mrk.json")


def _read_fcsv(path: Path) -> np.ndarray:
    system, rows = None, []
    for line_number, line in enumerate(_text(path).splitlines(), start=1):
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip().lower() == "coordinatesystem":
                system = _FCSV_SYSTEMS.get(value.strip().upper())
                if system is None:
                    raise InputError(f"{path.name}: unsupported coordinate system '{value.strip()}' (use RAS or LPS)")
            continue
        if not line.strip():
            continue
        fields = next(csv.reader([line]))
        if len(fields) < 4:
            raise InputError(f"{path.name}, line {line_number}: expected id,x,y,z,... but found {len(fields)} values")
        rows.append(_coordinates(fields[1:4], path, f"line {line_number}"))
    if system is None:
        raise InputError(f"{path.name} does not say its coordinate system: add a line '# CoordinateSystem = LPS' (or RAS)")
    points = _as_points(rows, path)
    return flip_ras_lps(points) if system == "RAS" else points


def _markup(path: Path) -> dict[str, Any]:
    try:
        markup = json.loads(_text(path))["markups"][0]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        raise InputError(f"{path.name} is not a Slicer markups file (no markups[0] in it)") from exc
    if not isinstance(markup, dict):
        raise InputError(f"{path.name} is not a Slicer markups file (markups[0] is not an object)")
    return markup


def _read_markups_json(path: Path) -> np.ndarray:
    markup = _markup(path)
    system = str(markup.get("coordinateSystem", "LPS")).upper()
    if system not in ("RAS", "LPS"):
        raise InputError(f"{path.name}: unsupported coordinate system '{system}' (use RAS or LPS)")
    units = markup.get("coordinateUnits", "mm")
    units = units[0] if isinstance(units, list) and units else units
    if units not in _JSON_UNITS_MM:
        raise InputError(f"{path.name}: unsupported coordinate units '{units}' (use mm or um)")
    rows = []
    for n, point in enumerate(markup.get("controlPoints") or [], start=1):
        if not isinstance(point, dict) or point.get("positionStatus") == "undefined":
            raise InputError(f"{path.name}: control point {n} has no defined position")
        position = point.get("position")
        if not isinstance(position, list) or len(position) != 3:
            raise InputError(f"{path.name}: control point {n} needs a position with 3 coordinates")
        rows.append(_coordinates([str(v) for v in position], path, f"control point {n}"))
    points = _as_points(rows, path) * _JSON_UNITS_MM[units]
    return flip_ras_lps(points) if system == "RAS" else points


# ------------------------------------------------------------------------------------- writing
def write_points(path: str | Path, points_lps: np.ndarray) -> Path:
    """Write LPS points ``[n, 3]`` (mm) as ``.csv`` (header x,y,z; LPS) or Slicer ``.mrk.json`` (coordinateSystem LPS).

    Creates the parent folder; returns the path written.
    """
    path = Path(path)
    points = np.asarray(points_lps, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise InputError(f"landmarks to write must be an [n, 3] array of points, got shape {points.shape}")
    name = path.name.lower()
    if name.endswith(".mrk.json"):
        text = json.dumps({"@schema": _MARKUPS_SCHEMA, "markups": [_markup_json(points)]}, indent=2) + "\n"
    elif name.endswith(".csv"):
        text = "x,y,z\n" + "".join(f"{x!r},{y!r},{z!r}\n" for x, y, z in points.tolist())
    else:
        raise InputError(f"cannot write landmarks as {path.name}: use .csv or .mrk.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _markup_json(points: np.ndarray) -> dict[str, Any]:
    """A Slicer point-list markup (type Fiducial) holding LPS points in mm."""
    control_points = [
        {"id": str(n), "label": f"P-{n}", "position": p, "positionStatus": "defined"}
        for n, p in enumerate(points.tolist(), start=1)
    ]
    return {"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm", "controlPoints": control_points}
