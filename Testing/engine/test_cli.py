"""`dlir register` as a user runs it: bad inputs give one clear sentence, a non-zero exit code and
untouched files; the written transform reproduces the warped image and labels through ITK."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dlir.recipe import Recipe, StageSpec
from dlir.stack import Manifest, build_stack, save_stack

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def run_dlir(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlir", *args], capture_output=True, text=True, timeout=300)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image(shape=(16, 18, 20), value=None, spacing=(2.0, 2.0, 2.0), seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    arr = rng.random(shape).astype(np.float32) if value is None else np.full(shape, value, np.float32)
    result = sitk.GetImageFromArray(arr)
    result.SetSpacing(spacing)
    return result


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    recipe = Recipe(stages=(
        StageSpec("affine", spacing_mm=(8.0, 8.0, 8.0), depth=2, channels=8),
        StageSpec("bspline", spacing_mm=(4.0, 4.0, 4.0), control_point_spacing=4, channels=8, alpha=1.0),
    ))
    paths = {"stack": save_stack(build_stack(Manifest("cli-test", recipe), seed=0), root / "cli-test.safetensors")}

    def write(name: str, img: sitk.Image) -> None:
        paths[name] = root / f"{name}.nii.gz"
        sitk.WriteImage(img, str(paths[name]))

    write("good", image())
    write("good2", image(seed=1))
    write("flat2d", sitk.GetImageFromArray(np.random.default_rng(0).random((16, 18)).astype(np.float32)))
    write("vector", sitk.GetImageFromArray(np.random.default_rng(0).random((8, 9, 10, 3)).astype(np.float32), isVector=True))
    nan = sitk.GetArrayFromImage(image())
    nan[3, 4, 5] = np.nan
    paths["nan"] = root / "nan.mha"  # NIfTI cannot hold the NaN through SimpleITK's writer; MHA can
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(paths["nan"]))
    write("constant", image(value=7.0))
    write("labels_other_grid", sitk.Cast(image(shape=(10, 10, 10)) > 0.5, sitk.sitkUInt8))
    paths["empty"] = root / "empty.nii.gz"
    paths["empty"].write_bytes(b"")
    paths["corrupt_stack"] = root / "corrupt.safetensors"
    paths["corrupt_stack"].write_bytes(b"\x01" * 100)
    return paths


@pytest.mark.parametrize(
    "fixed, moving, extra, message",
    [
        ("good", "flat2d", [], "2D"),
        ("good", "vector", [], "components per voxel"),
        ("nan", "good", [], "NaN or infinite"),
        ("good", "constant", [], "constant"),
        ("empty", "good", [], "is empty"),
        ("good", "missing", [], "does not exist"),
        ("flat2d", "good", [], "2D"),
        ("good", "good2", ["--moving-labels", "labels_other_grid"], "not on the grid of the moving image"),
        ("good", "good2", ["--stack", "corrupt_stack"], "not a valid safetensors"),
    ],
)
def test_bad_inputs(files: dict[str, Path], tmp_path: Path, fixed: str, moving: str, extra: list[str], message: str) -> None:
    args = [str(files.get(fixed, tmp_path / f"{fixed}.nii.gz")), str(files.get(moving, tmp_path / f"{moving}.nii.gz"))]
    options = {"--stack": str(files["stack"]), "--out": str(tmp_path / "out")}
    for flag, value in zip(extra[::2], extra[1::2]):
        options[flag] = str(files[value])
    before = {name: digest(p) for name, p in files.items()}
    result = run_dlir("register", *args, *[x for kv in options.items() for x in kv])
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert before == {name: digest(p) for name, p in files.items()}


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")
def test_written_transform_reproduces_the_warped_image_and_labels(tmp_path: Path) -> None:
    """ITK, reading transform.h5, warps the moving image and labels as the engine did (oblique, anisotropic pair)."""
    recipe = Recipe(stages=(
        StageSpec("affine", spacing_mm=(8.0, 8.0, 8.0), depth=3, channels=8),
        StageSpec("bspline", spacing_mm=(4.0, 4.0, 4.0), control_point_spacing=8, channels=8),
    ))
    stack = build_stack(Manifest("visible-warp", recipe), seed=0)
    with torch.no_grad():  # a clearly non-identity transform: rotation, scale, translation and a field
        stack.stages[0].net.head[-1].bias.copy_(torch.tensor([0.03, -0.02, 0.05, 0.01, 0, 0, 0.1, -0.08, 0.05, 0.02, -0.03, 0.01]))
        stack.stages[1].net.output.bias.copy_(torch.tensor([0.6, -0.4, 0.3]))
        stack.stages[1].net.output.weight.normal_(0, 0.05)
    stack_path = save_stack(stack, tmp_path / "visible.safetensors")
    pair = DATA / "pairs" / "brain1_aniso_oblique"
    out = tmp_path / "out"
    result = run_dlir("register", str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "--stack", str(stack_path),
                      "--out", str(out), "--moving-labels", str(pair / "moving_labels.nii.gz"),
                      "--fixed-labels", str(pair / "fixed_labels.nii.gz"))
    assert result.returncode == 0, result.stderr
    for name in ("warped.nii.gz", "transform.h5", "jacobian.nii.gz", "labels.nii.gz", "result.json"):
        assert (out / name).is_file()
    report = json.loads((out / "result.json").read_text())
    assert report["stack"] == "visible-warp" and report["device"] == "cpu" and "dice" in report
    assert {"read", "preprocess", "warp", "jacobian", "write"} <= set(report["timings_s"])

    fixed = sitk.ReadImage(str(pair / "fixed.nii.gz"))
    moving = sitk.ReadImage(str(pair / "moving.nii.gz"), sitk.sitkFloat32)
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    itk_warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    span = float(ours.max() - ours.min())
    assert np.abs(itk_warped - ours).max() / span < 1e-3
    labels = sitk.ReadImage(str(pair / "moving_labels.nii.gz"))
    itk_labels = sitk.GetArrayFromImage(sitk.Resample(labels, fixed, transform, sitk.sitkNearestNeighbor, 0))
    our_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz")))
    assert (itk_labels == our_labels).mean() >= 0.999
    assert our_labels.any()
    moved = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    assert np.abs(moved - ours).max() / span > 0.1  # the transform is far from the identity
