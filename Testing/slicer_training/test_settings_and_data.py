"""GUI settings -> the engine's trainer configuration, and scene volumes -> training files (slicer-core).

``test_same_config_as_cli.py`` holds the comparison with ``dlir train`` itself.
"""

from __future__ import annotations

import csv
import tomllib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dlir.errors import DLIRError, InputError
from dlir.recipe import INTENSITY_PRESETS
from dlir.training.config import TrainConfig
from DLIRTrainingLib.scenedata import exportSceneVolumes, matchLabelMaps, trainingImages
from DLIRTrainingLib.settings import DataSource, Intensity, TrainingSettings, buildConfig, checkImages


def settings(tmp_path: Path, **changes) -> TrainingSettings:
    values = dict(dataSource=DataSource.FOLDER, dataFolder=tmp_path, stackName="my-stack", bsplineSpacings="32, 16",
                  gridSpacing=4.0, patchSize=64)
    values.update(changes)
    return TrainingSettings(**values)


def check(s: TrainingSettings) -> None:
    """What the module checks before it starts a job from a folder or CSV: the configuration, then the images."""
    checkImages(buildConfig(s).data.images)


def test_stages_from_the_recipe_fields(tmp_path: Path) -> None:
    s = settings(tmp_path, affineIterations=10, bsplineIterations=20, alpha=0.1, learningRate=1e-3, batchSize=2)
    stages = buildConfig(s).recipe.stages
    assert [st.kind for st in stages] == ["affine", "bspline", "bspline"]
    assert stages[0].spacing_mm == (8.0,) * 3 and stages[0].iterations == 10 and stages[0].alpha == 0.0
    assert [st.control_point_spacing for st in stages[1:]] == [8, 4]  # 32 mm and 16 mm on a 4 mm grid
    assert all(st.alpha == 0.1 and st.patch_size == 64 and st.batch_size == 2 and st.iterations == 20 for st in stages[1:])
    assert buildConfig(settings(tmp_path, affineStage=False, bsplineSpacings="16")).recipe.stages[0].kind == "bspline"


@pytest.mark.parametrize("changes, message", [
    ({"stackName": ""}, "give the stack a name"),
    ({"stackName": "bad/name"}, "give the stack a name"),
    ({"dataFolder": "/no/such/folder"}, "the training data /no/such/folder does not exist"),
    ({"dataSource": DataSource.CSV, "dataCsv": ""}, "no training images"),
    ({"bsplineSpacings": "20"}, "does not fit the 4 mm grid"),
    ({"bsplineSpacings": "4"}, "does not fit"),
    ({"bsplineSpacings": "16, 32"}, "coarse to fine"),
    ({"bsplineSpacings": "16, x"}, "'x' is not a number"),
    ({"affineStage": False, "bsplineSpacings": ""}, "no stage"),
    ({"patchSize": 36}, "patch_size 36 must be a multiple of the control-point spacing"),
    ({"learningRate": 0.0}, "learning_rate must be a finite number above 0"),
    ({"alpha": -1.0}, r"alpha \(bending weight\) must be a finite number from 0"),
    ({"syntheticFraction": 1.5}, "synthetic_fraction must lie between 0 and 1"),
    ({"channels": 0}, "channels must be a whole number from 1"),
])
def test_bad_settings_are_named(tmp_path: Path, changes: dict, message: str) -> None:
    (tmp_path / "a.nii.gz").write_bytes(b"")  # the folder holds an image (by name): only the setting is wrong
    with pytest.raises(DLIRError, match=message):
        check(settings(tmp_path, **changes))


def test_defaults_are_the_engines() -> None:
    from dlir.training.config import DataSpec, Outline

    s, outline, config, data = TrainingSettings(), Outline(), TrainConfig(), DataSpec()
    assert (s.affineStage, s.gridSpacing, s.channels, s.affineIterations, s.bsplineIterations, s.learningRate, s.batchSize,
            s.patchSize, s.alpha, Intensity(s.intensity).value) == (
        outline.affine, outline.grid_spacing_mm, outline.channels, outline.affine_iterations, outline.bspline_iterations,
        outline.learning_rate, outline.batch_size, outline.patch_size, outline.alpha, outline.intensity)
    assert s.controlPointSpacings() == outline.control_points_mm
    assert (s.stackName, s.description, s.device, s.seed, s.checkpointEvery, s.validateEvery) == (
        config.name, config.description, config.device, config.seed, config.checkpoint_every, config.validate_every)
    assert (s.validationCount, s.syntheticFraction) == (data.validation_count, data.synthetic_fraction)


def test_the_intensity_choices_are_the_engines_presets() -> None:
    assert {i.value for i in Intensity} == set(INTENSITY_PRESETS)
    for choice in Intensity:
        assert choice.spec() == INTENSITY_PRESETS[choice.value]
        assert choice.label() == f"{choice.value.upper()}: {INTENSITY_PRESETS[choice.value].describe()}"
    assert Intensity("ct") is Intensity.CT and Intensity.CT == "ct"


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    s = settings(tmp_path, intensity=Intensity.CT, description='quotes " and \\ backslash', seed=7, device="cpu")
    config = buildConfig(s)
    assert config.description == 'quotes " and \\ backslash'
    back = TrainConfig.from_dict(tomllib.loads(config.to_toml()))
    assert back == config and back.to_dict() == config.to_dict()
    assert back.recipe.intensity == INTENSITY_PRESETS["ct"]
    assert [st.kind for st in back.recipe.stages] == ["affine", "bspline", "bspline"]


@pytest.mark.parametrize("source", [DataSource.FOLDER, DataSource.CSV])
def test_the_trainer_accepts_the_config(tmp_path: Path, source: DataSource) -> None:
    csv_path = tmp_path / "images.csv"
    csv_path.write_text("image\na.nii.gz\n", encoding="utf-8")
    (tmp_path / "a.nii.gz").write_bytes(b"")
    s = settings(tmp_path, dataSource=source, dataCsv=csv_path, channels=8, validationCount=1, device="cpu")
    config = TrainConfig.from_dict(tomllib.loads(buildConfig(s, trainingImages(s, tmp_path / "job")).to_toml()))
    config.check()
    checkImages(config.data.images)
    assert config.data.images == str((tmp_path if source == DataSource.FOLDER else csv_path).resolve())
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

    s = TrainingSettings.fromObject(Node())
    assert s.stackName == "from-node" and s.gridSpacing == 2.0 and s.patchSize == TrainingSettings().patchSize


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
    csv_path = exportSceneVolumes([a, b], [a_labels], tmp_path / "job")
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
    with pytest.raises(InputError, match="matches several"):
        matchLabelMaps([a, b], [same_grid_label])
    assert matchLabelMaps([a], [same_grid_label]) == {a.GetID(): same_grid_label}
    off_grid = _volume(scene, "a-label", np.zeros((3, 4, 4), np.uint8), grid, label=True)
    with pytest.raises(InputError, match="not on the grid"):
        matchLabelMaps([a, b], [off_grid])
    with pytest.raises(InputError, match="no scene volume"):
        exportSceneVolumes([], [], Path("/nonexistent"))
    flat = _volume(scene, "flat", np.zeros((1, 4, 4), np.float32), grid)
    with pytest.raises(InputError, match="2D"):
        exportSceneVolumes([flat], [], Path("/nonexistent"))


def test_training_images_per_source(scene, tmp_path: Path) -> None:
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("image\n", encoding="utf-8")
    assert trainingImages(settings(tmp_path), tmp_path / "job") == str(tmp_path.resolve())
    from_csv = settings(tmp_path, dataSource=DataSource.CSV, dataCsv=csv_file)
    assert trainingImages(from_csv, tmp_path / "job") == str(csv_file.resolve())
    assert trainingImages(settings(tmp_path, dataFolder=""), tmp_path / "job") == ""
    assert trainingImages(settings(tmp_path, dataFolder=Path()), tmp_path / "job") == ""  # an unset path of the parameter node
    v = _volume(scene, "v", np.zeros((4, 4, 4), np.float32), np.eye(4))
    planned = trainingImages(settings(tmp_path, dataSource=DataSource.SCENE), tmp_path / "job")
    assert Path(planned) == (tmp_path / "job" / "data" / "images.csv").resolve()
    assert exportSceneVolumes([v], [], tmp_path / "job").resolve() == Path(planned)
