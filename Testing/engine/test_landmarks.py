"""Landmark files: exact round trips, RAS -> LPS conversion, refused files, files Slicer itself writes
and reads, and the development pairs' landmarks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dlir.errors import InputError
from dlir.landmarks import read_landmark_pairs, read_points, write_points
from dlir.metrics import target_registration_error

POINTS_LPS = np.array([[1.5, -2.0, 3.25], [-10.0, 20.0, 0.125], [0.1, 1e-7, -123.456789012345]])
FCSV_COLUMNS = "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"


def fcsv(path: Path, system: str, points: np.ndarray) -> Path:
    """A legacy Slicer .fcsv written by hand, in Slicer's layout."""
    header = f"# Markups fiducial file version = 4.11\n# CoordinateSystem = {system}\n{FCSV_COLUMNS}"
    rows = [f"vtkMRMLMarkupsFiducialNode_{n},{x},{y},{z},0,0,0,1,1,1,0,F-{n + 1},,\n" for n, (x, y, z) in enumerate(points)]
    path.write_text(header + "".join(rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["points.csv", "points.mrk.json", "sub/POINTS.CSV"])
def test_round_trip_is_exact(tmp_path: Path, name: str) -> None:
    written = write_points(tmp_path / name, POINTS_LPS)
    assert np.array_equal(read_points(written), POINTS_LPS)


def test_written_markups_say_lps(tmp_path: Path) -> None:
    markup = json.loads(write_points(tmp_path / "p.mrk.json", POINTS_LPS).read_text(encoding="utf-8"))["markups"][0]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS" and markup["coordinateUnits"] == "mm"
    assert [p["position"] for p in markup["controlPoints"]] == POINTS_LPS.tolist()


def test_plain_csv_with_id_and_label_columns(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    # a byte-order mark, spaces and capitals in the header, a blank line
    path.write_text("\ufeffid, X ,y,z,label\n1,1.5,-2,3.25,apex\n\n2,-10,20,0.125,base\n", encoding="utf-8")
    assert np.array_equal(read_points(path), POINTS_LPS[:2])


@pytest.mark.parametrize(("system", "flip"), [("RAS", [-1, -1, 1]), ("0", [-1, -1, 1]), ("LPS", [1, 1, 1]), ("1", [1, 1, 1])])
def test_fcsv_is_converted_to_lps(tmp_path: Path, system: str, flip: list[int]) -> None:
    points = fcsv(tmp_path / "f.fcsv", system, POINTS_LPS)
    assert np.allclose(read_points(points), POINTS_LPS * flip)


@pytest.mark.parametrize(("header", "scale", "flip"), [
    ('"coordinateSystem": "RAS",', 1.0, [-1, -1, 1]),
    ('"coordinateSystem": "LPS", "coordinateUnits": "um",', 1e-3, [1, 1, 1]),
    ("", 1.0, [1, 1, 1]),  # Slicer's schema: LPS when not said
])
def test_markups_json_is_converted_to_lps_mm(tmp_path: Path, header: str, scale: float, flip: list[int]) -> None:
    path = tmp_path / "m.mrk.json"
    points = '"controlPoints": [{"position": [1, 2, 3]}, {"position": [4, 5, 6]}]'
    path.write_text('{"markups": [{"type": "Fiducial", %s %s}]}' % (header, points), encoding="utf-8")
    assert np.allclose(read_points(path), np.array([[1, 2, 3], [4, 5, 6]]) * scale * flip)


@pytest.mark.parametrize(("name", "text", "message"), [
    ("p.txt", "x,y,z\n1,2,3\n", "unknown landmark format"),
    ("p.csv", "", "header"),
    ("p.csv", "a,b,c\n1,2,3\n", "missing x, y, z"),
    ("p.csv", "x,y,z\n", "no landmarks"),
    ("p.csv", "x,y,z\n1,2,3\n4,5\n", "line 3: 2 values"),
    ("p.csv", "x,y,z\n1,2,3,4\n", "line 2: 4 values"),
    ("p.csv", "x,y,z\n1,two,3\n", "line 2: expected finite numbers"),
    ("p.csv", "x,y,z\n1,nan,3\n", "line 2: expected finite numbers"),
    ("p.fcsv", f"# CoordinateSystem = RAS\n{FCSV_COLUMNS}0,1,2\n", "line 3: expected id,x,y,z"),
    ("p.fcsv", "# CoordinateSystem = IJK\n0,1,2,3\n", "coordinate system 'IJK'"),
    ("p.fcsv", "0,1,2,3\n", "CoordinateSystem = LPS"),
    ("p.mrk.json", "{not json", "not a Slicer markups file"),
    ("p.mrk.json", '{"markups": []}', "not a Slicer markups file"),
    ("p.mrk.json", '{"markups": [{"controlPoints": [{"position": [1, 2]}]}]}', "control point 1 needs a position"),
    ("p.mrk.json", '{"markups": [{"controlPoints": [{"position": [1, 2, 3], "positionStatus": "undefined"}]}]}', "no defined"),
    ("p.mrk.json", '{"markups": [{"coordinateUnits": "cm", "controlPoints": [{"position": [1, 2, 3]}]}]}', "units 'cm'"),
    ("p.mrk.json", '{"markups": [{"controlPoints": []}]}', "no landmarks"),
])
def test_unusable_files_are_named(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        read_points(path)


def test_missing_files_and_bad_output_requests(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_points(tmp_path / "absent.csv")
    with pytest.raises(InputError, match="does not exist"):
        read_landmark_pairs(tmp_path / "absent.csv")
    with pytest.raises(InputError, match="fixed_x"):
        read_landmark_pairs(write_points(tmp_path / "points.csv", POINTS_LPS))
    with pytest.raises(InputError, match=r"\.csv or \.mrk\.json"):
        write_points(tmp_path / "p.fcsv", POINTS_LPS)
    with pytest.raises(InputError, match=r"\[n, 3\]"):
        write_points(tmp_path / "p.csv", POINTS_LPS[:, :2])
    assert not (tmp_path / "p.fcsv").exists() and not (tmp_path / "p.csv").exists()


def test_files_written_and_read_by_slicer(tmp_path: Path) -> None:
    slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML library) is not installed")
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(node)
    ras = POINTS_LPS * [-1, -1, 1]  # Slicer keeps RAS in memory
    for r, a, s in ras:
        node.AddControlPoint(r, a, s)
    for storage, name, system in [(slicer.vtkMRMLMarkupsFiducialStorageNode, "ras.fcsv", 0),
                                  (slicer.vtkMRMLMarkupsFiducialStorageNode, "lps.fcsv", 1),
                                  (slicer.vtkMRMLMarkupsJsonStorageNode, "ras.mrk.json", 0),
                                  (slicer.vtkMRMLMarkupsJsonStorageNode, "lps.mrk.json", 1)]:
        writer = scene.AddNode(storage())
        writer.SetFileName(str(tmp_path / name))
        writer.SetCoordinateSystem(system)
        assert writer.WriteData(node)
        assert np.allclose(read_points(tmp_path / name), POINTS_LPS, atol=1e-9), name

    loaded = scene.AddNode(slicer.vtkMRMLMarkupsFiducialNode())
    reader = scene.AddNode(slicer.vtkMRMLMarkupsJsonStorageNode())
    reader.SetFileName(str(write_points(tmp_path / "ours.mrk.json", POINTS_LPS)))
    assert reader.ReadData(loaded)
    positions = [loaded.GetNthControlPointPosition(n) for n in range(loaded.GetNumberOfControlPoints())]
    assert np.allclose(positions, ras, atol=1e-9)


def test_development_pair_landmarks_match_the_data_readme(shared_data: Path) -> None:
    fixed, moving = read_landmark_pairs(shared_data / "pairs" / "lung1_aniso" / "landmarks.csv")
    assert fixed.shape == moving.shape == (100, 3)
    assert target_registration_error(fixed, moving).mean() == pytest.approx(8.60, abs=0.005)
