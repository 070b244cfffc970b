"""GUI settings -> trainer configuration, and scene volumes -> training files (slicer-core)."""

from __future__ import annotations

import csv
import tomllib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dlir.toml_writer import dumps
from dlir.train_config import TrainConfig

from DLIRTrainingLib.scenedata import data_section, export_scene_volumes, match_label_maps
from DLIRTrainingLib.settings import DataSource, Intensity, SettingsError, TrainingSettings, build_config


def settings(tmp_path: Path, **changes) -> TrainingSettings:
    values = dict(dataSource=DataSource.FOLDER, dataFolder=tmp_path, stackName="my-stack", bsplineSpacings="32, 16",
                  gridSpacing=4.0, patchSize=64)
    values.update(changes)
    return TrainingSettings(**values)


def test_stages_from_the_recipe_fields(tmp_path: Path) -> None:
    s = settings(tmp_path, affineIterations=10, bsplineIterations=20, alpha=0.1, learningRate=1e-3, batchSize=2)
    stages = s.stages()
    assert [st["kind"] for st in stages] == ["affine", "bspline", "bspline"]
    assert stages[0]["spacing_mm"] == [8.0] * 3 and stages[0]["iterations"] == 10 and stages[0]["alpha"] == 0.0
    assert [st["control_point_spacing"] for st in stages[1:]] == [8, 4]  # 32 mm and 16 mm on a 4 mm grid
    assert all(st["alpha"] == 0.1 and st["patch_size"] == 64 and st["batch_size"] == 2 for st in stages[1:])
    assert settings(tmp_path, affineStage=False, bsplineSpacings="16").stages()[0]["kind"] == "bspline"


@pytest.mark.parametrize("changes, message", [
    ({"stackName": ""}, "give the new stack a name"),
    ({"stackName": "bad name!"}, "give the new stack a name"),
    ({"dataFolder": "/no/such/folder"}, "does not exist"),
    ({"dataSource": DataSource.CSV, "dataCsv": ""}, "image CSV"),
    ({"bsplineSpacings": "20"}, "does not fit the 4 mm grid"),
    ({"bsplineSpacings": "4"}, "does not fit"),
    ({"bsplineSpacings": "16, 32"}, "coarse to fine"),
    ({"bsplineSpacings": "16, x"}, "'x' is not a number"),
    ({"affineStage": False, "bsplineSpacings": ""}, "no stage"),
    ({"patchSize": 36}, "multiple of the coarsest control-point spacing"),
    ({"device": "tpu"}, "unknown device"),
    ({"learningRate": 0.0}, "learning rate"),
    ({"learningRate": float("nan")}, "finite"),
    ({"alpha": float("inf")}, "finite"),
    ({"channels": 0}, "network channels"),
])
def test_bad_settings_are_named(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        settings(tmp_path, **changes).check()


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    s = settings(tmp_path, intensity=Intensity.CT, description='quotes " and \\ backslash', seed=7, device="cpu")
    config = build_config(s, {"images": str(tmp_path)})
    text = dumps(config)
    back = tomllib.loads(text)
    assert back == config
    assert back["recipe"]["intensity"] == {"kind": "window", "low": -1000.0, "high": 1000.0}
    assert [st["kind"] for st in back["recipe"]["stages"]] == ["affine", "bspline", "bspline"]


@pytest.mark.parametrize("source", [DataSource.FOLDER, DataSource.CSV])
def test_the_trainer_accepts_the_config(tmp_path: Path, source: DataSource) -> None:
    csv_path = tmp_path / "images.csv"
    csv_path.write_text("image\na.nii.gz\n", encoding="utf-8")
    s = settings(tmp_path, dataSource=source, dataCsv=csv_path, channels=8, validationCount=1, device="cpu")
    config = TrainConfig.from_dict(tomllib.loads(dumps(build_config(s, data_section(s, tmp_path / "job")))))
    config.check()
    assert config.data.images == str(tmp_path if source == DataSource.FOLDER else csv_path)
    assert config.data.validation_count == 1 and config.checkpoint_every == s.checkpointEvery
    stages = config.recipe.stages
    assert [(st.kind, st.spacing_mm, st.control_point_spacing, st.channels) for st in stages[1:]] == [
        ("bspline", (4.0,) * 3, 8, 8), ("bspline", (4.0,) * 3, 4, 8)]
    assert stages[0].kind == "affine" and stages[0].spacing_mm == (8.0,) * 3 and stages[0].channels == 8
    assert config.recipe.intensity.kind == "percentile"


def test_settings_from_a_parameter_node_like_object(tmp_path: Path) -> None:
    class Node:
        stackName = "from-node"
        gridSpacing = 2.0
        unrelated = 1

    s = TrainingSettings.from_object(Node())
    assert s.stackName == "from-node" and s.gridSpacing == 2.0 and s.patchSize == 64


def _volume(scene, name: str, array: np.ndarray, ijk_to_ras: np.ndarray, label: bool = False):
    import slicer.util

    return slicer.util.addVolumeFromArray(array, ijkToRAS=ijk_to_ras, name=name,
                                          nodeClassName="vtkMRMLLabelMapVolumeNode" if label else "vtkMRMLScalarVolumeNode")


def test_scene_volumes_are_exported_with_their_geometry(scene, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ijk_to_ras = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -20], [0, 3.0, 0, 5], [0, 0, 0, 1]])  # oblique axes, anisotropic
    a = _volume(scene, "caseA", rng.normal(size=(6, 7, 8)).astype(np.float32), ijk_to_ras)
    b = _volume(scene, "caseB", rng.normal(size=(5, 5, 5)).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    a_labels = _volume(scene, "caseA-label", (rng.random((6, 7, 8)) > 0.5).astype(np.uint8), ijk_to_ras, label=True)
    original = a.GetImageData().GetScalarRange()
    csv_path = export_scene_volumes([a, b], [a_labels], tmp_path / "data")
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    assert [Path(r["image"]).name for r in rows] == ["caseA.nii.gz", "caseB.nii.gz"]
    assert Path(rows[0]["labels"]).name == "caseA_labels.nii.gz" and rows[1]["labels"] == ""
    image = sitk.ReadImage(rows[0]["image"])
    assert image.GetSize() == (8, 7, 6)
    # ITK's LPS: x_LPS = (-R, -A, S); voxel (i, j, k) -> RAS by ijk_to_ras
    for ijk in ((0, 0, 0), (3, 2, 1)):
        ras = ijk_to_ras @ np.array([*ijk, 1.0])
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        assert np.allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), __import__("slicer").util.arrayFromVolume(a), rtol=1e-6)
    labels = sitk.ReadImage(rows[0]["labels"])
    assert np.array_equal(sitk.GetArrayFromImage(labels), __import__("slicer").util.arrayFromVolume(a_labels))
    assert a.GetImageData().GetScalarRange() == original and a.GetStorageNode() is None  # the node is untouched


def test_label_maps_must_belong_to_one_volume(scene) -> None:
    grid = np.diag([1.0, 1.0, 1.0, 1.0])
    a = _volume(scene, "a", np.zeros((4, 4, 4), np.float32), grid)
    b = _volume(scene, "b", np.zeros((4, 4, 4), np.float32), grid)
    same_grid_label = _volume(scene, "segmentation", np.zeros((4, 4, 4), np.uint8), grid, label=True)
    with pytest.raises(SettingsError, match="matches several"):
        match_label_maps([a, b], [same_grid_label])
    assert match_label_maps([a], [same_grid_label]) == {a.GetID(): same_grid_label}
    off_grid = _volume(scene, "a-label", np.zeros((3, 4, 4), np.uint8), grid, label=True)
    with pytest.raises(SettingsError, match="not on the grid"):
        match_label_maps([a, b], [off_grid])
    with pytest.raises(SettingsError, match="no scene volume"):
        export_scene_volumes([], [], Path("/nonexistent"))
    flat = _volume(scene, "flat", np.zeros((1, 4, 4), np.float32), grid)
    with pytest.raises(SettingsError, match="2D"):
        export_scene_volumes([flat], [], Path("/nonexistent"))


def test_data_section_per_source(scene, tmp_path: Path) -> None:
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("image\n", encoding="utf-8")
    assert data_section(settings(tmp_path), tmp_path / "job") == {"images": str(tmp_path.resolve())}
    assert data_section(settings(tmp_path, dataSource=DataSource.CSV, dataCsv=csv_file), tmp_path / "job") == {
        "images": str(csv_file.resolve())}
    v = _volume(scene, "v", np.zeros((4, 4, 4), np.float32), np.eye(4))
    section = data_section(settings(tmp_path, dataSource=DataSource.SCENE), tmp_path / "job", [v])
    assert Path(section["images"]) == tmp_path / "job" / "data" / "images.csv"
