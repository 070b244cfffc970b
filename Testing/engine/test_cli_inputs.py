"""`dlir register` on unusable inputs, run exactly as a user runs it (a subprocess).

Every refusal must be one sentence on stderr starting with ``error:`` (no traceback, no ITK
warning spam), exit code 2 (the CLI's documented user-error code), no ``result.json`` claiming a
result, and every input file byte for byte as it was (SHA-256 before and after).  A control case
checks that the same command on good inputs succeeds, so each refusal is caused by its input.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

RunDlir = Callable[..., subprocess.CompletedProcess]

SHAPE = (16, 16, 16)  # (k, j, i): tiny, so that each subprocess is a couple of seconds


def smooth_volume(seed: int, shape: tuple[int, ...] = SHAPE, spacing: tuple[float, ...] = (2.0, 2.0, 2.0)) -> sitk.Image:
    """A smooth random float32 volume (a blob-like 'anatomy') with the given spacing."""
    arr = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 1.5).astype(np.float32)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetOrigin(tuple(-0.5 * (n - 1) * s for n, s in zip(image.GetSize(), spacing)))
    return image


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (names and contents): catches changed, deleted and new files."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, fresh_stack_file: Path) -> dict[str, Path]:
    """Good and bad input files in one folder (written once per module)."""
    root = tmp_path_factory.mktemp("cli-inputs")
    paths: dict[str, Path] = {}

    def write(name: str, image: sitk.Image, suffix: str = ".nii.gz") -> None:
        paths[name] = root / f"{name}{suffix}"
        sitk.WriteImage(image, str(paths[name]))

    fixed, moving = smooth_volume(0), smooth_volume(1)
    write("fixed", fixed)
    write("moving", moving)
    labels = sitk.Cast(moving > float(np.median(sitk.GetArrayViewFromImage(moving))), sitk.sitkUInt8)
    write("labels", labels)
    write("fixed_mask", sitk.Cast(fixed > -1e9, sitk.sitkUInt8))

    # not 3D scalar volumes
    flat = sitk.GetImageFromArray(np.random.default_rng(2).random((16, 16)).astype(np.float32))
    write("image2d", flat)
    write("image4d", sitk.JoinSeries([smooth_volume(s) for s in (3, 4, 5)]))  # a time series: a true 4D image
    write("vector", sitk.Compose(smooth_volume(6), smooth_volume(7), smooth_volume(8)))  # 3 components per voxel
    write("one_slice", smooth_volume(9, shape=(1, 16, 16)))

    # non-finite voxels: NIfTI readers (nifticlib) silently turn NaN/inf into 0, so MHA and NRRD carry them
    nan = sitk.GetArrayFromImage(moving)
    nan[5, 6, 7] = np.nan
    write("nan", sitk.GetImageFromArray(nan), ".mha")
    inf = sitk.GetArrayFromImage(moving)
    inf[2, 3, 4] = np.inf
    inf[9, 9, 9] = -np.inf
    write("inf", sitk.GetImageFromArray(inf), ".nrrd")
    write("constant", sitk.GetImageFromArray(np.full(SHAPE, 42.0, np.float32)))

    # not images at all
    paths["empty"] = root / "empty.nii.gz"
    paths["empty"].write_bytes(b"")
    paths["text"] = root / "notes.nii.gz"
    paths["text"].write_text("this is a text file, not an image\n", encoding="utf-8")
    # truncated files (an interrupted copy or download): every format must be refused, not read with holes
    for suffix, key in ((".nii.gz", "trunc_nii_gz"), (".nii", "trunc_nii"), (".mha", "trunc_mha"), (".nrrd", "trunc_nrrd")):
        whole = root / f"whole{suffix}"
        sitk.WriteImage(moving, str(whole), useCompression=suffix != ".nii")
        data = whole.read_bytes()
        whole.unlink()
        paths[key] = root / f"truncated{suffix}"
        paths[key].write_bytes(data[: 2 * len(data) // 3])
    # --out naming an existing file (a user error, not a crash)
    paths["out_file"] = root / "results.txt"
    paths["out_file"].write_text("my notes\n", encoding="utf-8")

    # label maps and masks that do not belong to their image
    write("labels_other_size", sitk.Cast(smooth_volume(10, shape=(12, 16, 16)) > 0.5, sitk.sitkUInt8))
    shifted = sitk.Image(labels)
    shifted.SetOrigin(tuple(o + d for o, d in zip(labels.GetOrigin(), (3.0, 0.0, 0.0))))
    write("labels_shifted", shifted)
    resampled = sitk.Image(labels)
    resampled.SetSpacing((2.0, 2.0, 2.5))
    write("labels_other_spacing", resampled)
    write("labels_fractional", sitk.Cast(moving, sitk.sitkFloat32) * 0.5 + 0.25)
    mask_other = sitk.Image(sitk.Cast(fixed > -1e9, sitk.sitkUInt8))
    mask_other.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    write("mask_rotated", mask_other)

    # stacks
    paths["stack"] = root / "good.safetensors"
    paths["stack"].write_bytes(fresh_stack_file.read_bytes())
    paths["corrupt_stack"] = root / "corrupt.safetensors"
    paths["corrupt_stack"].write_bytes(np.random.default_rng(11).bytes(2048))
    return paths


def test_good_inputs_register(inputs: dict[str, Path], tmp_path: Path, run_dlir: RunDlir) -> None:
    """The control: the very command the bad cases vary succeeds and writes all five outputs."""
    root = inputs["fixed"].parent
    before = snapshot(root)
    out = tmp_path / "out"
    result = run_dlir("register", inputs["fixed"], inputs["moving"], "--stack", inputs["stack"], "--out", out,
                      "--moving-labels", inputs["labels"], "--fixed-mask", inputs["fixed_mask"], "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for name in ("warped.nii.gz", "transform.h5", "jacobian.nii.gz", "labels.nii.gz", "result.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert report["stack"] == "fresh-small" and report["device"] == "cpu"
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    assert warped.GetSize() == (16, 16, 16) and warped.GetSpacing() == (2.0, 2.0, 2.0)
    assert snapshot(root) == before


BAD_CASES = [
    # id, fixed, moving, extra options (name -> input key or value), words the sentence must contain
    ("moving 2D (fixed 3D)", "fixed", "image2d", {}, ["moving image", "2D", "3D"]),
    ("fixed 2D (moving 3D)", "image2d", "moving", {}, ["fixed image", "2D", "3D"]),
    ("moving 4D time series", "fixed", "image4d", {}, ["moving image", "4D", "3D"]),
    ("moving vector image", "fixed", "vector", {}, ["moving image", "3 components per voxel"]),
    ("single slice", "one_slice", "moving", {}, ["fixed image", "single slice"]),
    ("NaN voxel", "fixed", "nan", {}, ["moving image", "1 NaN or infinite voxels"]),
    ("inf voxels", "inf", "moving", {}, ["fixed image", "2 NaN or infinite voxels"]),
    ("constant image", "fixed", "constant", {}, ["moving image", "constant", "42"]),
    ("empty file", "empty", "moving", {}, ["fixed image", "empty.nii.gz", "is empty"]),
    ("missing file", "fixed", "missing", {}, ["moving image", "missing.nii.gz", "does not exist"]),
    ("text file", "fixed", "text", {}, ["moving image", "notes.nii.gz", "cannot be read as an image"]),
    ("truncated .nii.gz", "fixed", "trunc_nii_gz", {}, ["moving image", "truncated.nii.gz"]),
    ("truncated .nii", "trunc_nii", "moving", {}, ["fixed image", "truncated.nii"]),
    ("truncated .mha", "fixed", "trunc_mha", {}, ["moving image", "truncated.mha"]),
    ("truncated .nrrd", "fixed", "trunc_nrrd", {}, ["moving image", "truncated.nrrd"]),
    ("out is an existing file", "fixed", "moving", {"--out": "out_file"}, ["results.txt"]),
    ("labels of another size", "fixed", "moving", {"--moving-labels": "labels_other_size"},
     ["moving label map", "not on the grid of the moving image"]),
    ("labels shifted 3 mm", "fixed", "moving", {"--moving-labels": "labels_shifted"},
     ["moving label map", "not on the grid of the moving image"]),
    ("labels with other spacing", "fixed", "moving", {"--moving-labels": "labels_other_spacing"},
     ["moving label map", "not on the grid of the moving image"]),
    ("labels not integers", "fixed", "moving", {"--moving-labels": "labels_fractional"}, ["moving label map", "non-integer"]),
    ("mask rotated", "fixed", "moving", {"--fixed-mask": "mask_rotated"}, ["fixed mask", "not on the grid of the fixed image"]),
    ("corrupt stack", "fixed", "moving", {"--stack": "corrupt_stack"}, ["corrupt.safetensors", "not a valid safetensors"]),
    ("unknown stack name", "fixed", "moving", {"--stack": "no-such-stack"}, ["no stack named 'no-such-stack'"]),
    ("negative refinement", "fixed", "moving", {"--refine": "-3"}, ["--refine -3", "auto", "negative"]),
]


@pytest.mark.parametrize("fixed, moving, extra, words", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_input_gives_one_sentence_and_touches_nothing(
    inputs: dict[str, Path], tmp_path: Path, run_dlir: RunDlir, fixed: str, moving: str, extra: dict[str, str], words: list[str]
) -> None:
    root = inputs["fixed"].parent
    before = snapshot(root)

    def path_of(key: str) -> str:
        return str(inputs.get(key, root / f"{key}.nii.gz"))

    options = {"--stack": str(inputs["stack"]), "--out": str(tmp_path / "out"), "--device": "cpu",
               "--moving-labels": str(inputs["labels"])}
    for flag, key in extra.items():
        options[flag] = path_of(key) if key in inputs else key
    result = run_dlir("register", path_of(fixed), path_of(moving), *[x for kv in options.items() for x in kv])

    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, f"exit code {result.returncode}; stderr: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    if fixed in inputs and moving in inputs:  # both files exist: a reason saying otherwise misleads the user
        assert "No such file" not in lines[0], lines[0]
    assert not (tmp_path / "out" / "result.json").exists(), "a refused registration must not write a result"
    assert snapshot(root) == before, "an input file was modified, deleted or added next to the inputs"
