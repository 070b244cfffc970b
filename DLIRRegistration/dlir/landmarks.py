"""Landmarks in and out, always returned as ``[n, 3]`` arrays of LPS points in mm.

Formats: the pairs' ``landmarks.csv`` (``id,fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z``,
LPS), plain point CSVs (``x,y,z`` columns, LPS), Slicer's legacy ``.fcsv`` and Slicer markups
``.mrk.json`` (RAS or LPS as their header says; RAS is converted to LPS by negating x and y).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from .errors import InputError

_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])
_MARKUPS_SCHEMA = "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#"


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"the landmark file {path} does not exist")
    return path


def _floats(row: dict[str, str], keys: list[str], path: Path, line: int) -> list[float]:
    try:
        return [float(row[k]) for k in keys]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path.name}, line {line}: expected numbers in columns {', '.join(keys)}") from exc


def read_landmark_pairs(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Corresponding (fixed, moving) LPS points ``[n, 3]`` from a pairs ``landmarks.csv``."""
    path = _existing(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        needed = [f"{side}_{a}" for side in ("fixed", "moving") for a in "xyz"]
        if reader.fieldnames is None or not set(needed) <= set(reader.fieldnames):
            raise InputError(f"{path.name} needs the columns {', '.join(needed)} (LPS mm)")
        rows = [_floats(row, needed, path, n + 2) for n, row in enumerate(reader)]
    if not rows:
        raise InputError(f"{path.name} holds no landmarks")
    points = np.asarray(rows, dtype=np.float64)
    return points[:, :3], points[:, 3:]


def read_points(path: str | Path) -> np.ndarray:
    """LPS points ``[n, 3]`` (mm) from a ``.csv`` (x,y,z, LPS), ``.fcsv`` or ``.mrk.json`` file."""
    path = _existing(path)
    name = path.name.lower()
    if name.endswith(".mrk.json") or name.endswith(".json"):
        return _read_markups_json(path)
    if name.endswith(".fcsv"):
        return _read_fcsv(path)
    if name.endswith(".csv"):
        return _read_plain_csv(path)
    raise InputError(f"unknown landmark format {path.name}: use .csv (LPS), .fcsv or .mrk.json")


def _read_plain_csv(path: Path) -> np.ndarray:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"x", "y", "z"} <= set(reader.fieldnames):
            raise InputError(f"{path.name} needs columns x, y, z (LPS mm)")
        points = [_floats(row, ["x", "y", "z"], path, n + 2) for n, row in enumerate(reader)]
    if not points:
        raise InputError(f"{path.name} holds no points")
    return np.asarray(points, dtype=np.float64)


def _read_fcsv(path: Path) -> np.ndarray:
    system, columns, points = "RAS", ["id", "x", "y", "z"], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                system = {"0": "RAS", "1": "LPS"}.get(value, value.upper())
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
            continue
        if not line.strip():
            continue
        values = next(csv.reader([line]))
        if len(values) < len(columns[:4]):
            raise InputError(f"{path.name}, line {n}: expected at least {len(columns[:4])} columns")
        points.append(_floats(dict(zip(columns, values)), ["x", "y", "z"], path, n))
    if system not in ("RAS", "LPS"):
        raise InputError(f"{path.name}: unsupported coordinate system {system} (RAS or LPS)")
    if not points:
        raise InputError(f"{path.name} holds no points")
    result = np.asarray(points, dtype=np.float64)
    return result * _RAS_TO_LPS if system == "RAS" else result


def _read_markups_json(path: Path) -> np.ndarray:
    try:
        data = json.loads(path.read_text())
        markup = data["markups"][0]
        system = str(markup.get("coordinateSystem", "LPS")).upper()
        points = np.asarray([cp["position"] for cp in markup.get("controlPoints", [])], dtype=np.float64)
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise InputError(f"{path.name} is not a Slicer markups file with control points ({exc})") from exc
    if points.size == 0:
        raise InputError(f"{path.name} holds no control points")
    if points.ndim != 2 or points.shape[1] != 3:
        raise InputError(f"{path.name}: control point positions must have 3 coordinates")
    if system not in ("RAS", "LPS"):
        raise InputError(f"{path.name}: unsupported coordinate system {system} (RAS or LPS)")
    return points * _RAS_TO_LPS if system == "RAS" else points


def write_points(path: str | Path, points_lps: np.ndarray) -> Path:
    """Write LPS points ``[n, 3]`` (mm) as ``.csv`` (x,y,z) or Slicer ``.mrk.json`` (coordinateSystem LPS)."""
    path = Path(path)
    points = np.asarray(points_lps, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise InputError(f"points must be [n, 3], got {points.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.lower().endswith(".mrk.json"):
        markup = {
            "type": "Fiducial",
            "coordinateSystem": "LPS",
            "coordinateUnits": "mm",
            "controlPoints": [{"id": str(n + 1), "label": f"P-{n + 1}", "position": p.tolist()} for n, p in enumerate(points)],
        }
        path.write_text(json.dumps({"@schema": _MARKUPS_SCHEMA, "markups": [markup]}, indent=2) + "\n")
    elif path.suffix.lower() == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["x", "y", "z"])
            writer.writerows(points.tolist())
    else:
        raise InputError(f"cannot write landmarks as {path.name}: use .csv or .mrk.json")
    return path
