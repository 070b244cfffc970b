"""Hostile but realistic inputs: refused with one sentence, or registered right -- never a wrong result with exit 0.

The contract, as a user meets it through ``python -m dlir register`` (a subprocess):

* a refused input ends with exit code 2 and ONE line on stderr, ``error: <sentence naming the
  problem>``; the input files are byte for byte as they were; no output folder is created;
* an accepted input gives a result that is right: finite, on the fixed grid, labels exact.

Cases (issue 14, group 2 and the input side of group 3):

1. NaN / infinite voxels in every format, including NIfTI, whose reader turns them into 0.
2. Headers ITK would misread without a word or refuse cryptically: zero / NaN / negative NIfTI
   pixdim, NaN qform or sform, MetaImage / NRRD zero or NaN spacing and NaN origin, a direction
   matrix that is not orthonormal, an absurdly far origin; and, property-based (``hypothesis``,
   derandomised, recorded examples), any spacing / origin / direction: refused exactly when
   unusable, else registered with finite outputs on the input grid.
3. Values beyond single precision (refused) and huge finite values (1e38: registered, no NaN).
4. A NaN in a stage's output (damaged weights) stops the run naming the stage.
5. The same pair 1e9 mm from the origin registers exactly like near it.
6. Label values above 2^24, negative, int64 and uint32 come back unchanged (both interpolations,
   through the API and through the files the CLI writes).
7. ``one-hot-linear`` with 27,000 labels: fast, exact, with progress inside the warp.
8. No overlap after the initial alignment: a warning and ``no_overlap`` in result.json.
9. Extreme grids: a 0.01 x 0.01 x 50 mm pair (1024 x 1024 x 8 voxels) stays under 1.5 GB (it took
   5 GB and more), and a header whose spacing asks for a gigantic network grid is refused before
   allocating.

Issue 26 (nothing silently empty, every sentence plain):

10. An image narrower than one network voxel of a stage (2 x 2 x 2 mm; 0.01 x 0.01 x 50 mm voxels,
    1.28 mm wide) is refused with a sentence that says so, before any work; a result whose transform
    maps the fixed image out of the moving one says so on the command line and in result.json.
11. ITK's words never reach the terminal: a sheared sform, a singular direction matrix and a folder
    without DICOM files are each one sentence of ours (a sform ITK reads with a caveat: a warning of ours).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from dlir.cli import main
from dlir.errors import InputError, StackError
from dlir.geometry import Grid, sample
from dlir.io import check_image, read_image
from dlir.pipeline import check_stage_output
from dlir.register import register
from dlir.stack import Stack, load_stack, save_stack
from dlir.transforms import AffineTransform

RunDlir = Callable[..., subprocess.CompletedProcess]
SHAPE = (16, 16, 16)  # (k, j, i)


# ----------------------------------------------------------------------------------- helpers
def volume(seed: int, shape: tuple[int, int, int] = SHAPE, spacing=(2.0, 2.0, 2.0), dtype=np.float32) -> sitk.Image:
    """A smooth random blob volume centred on the origin."""
    arr = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 1.5).astype(dtype)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetOrigin(tuple(-0.5 * (n - 1) * s for n, s in zip(image.GetSize(), spacing)))
    return image


def translated(image: sitk.Image, offset: float) -> sitk.Image:
    out = sitk.Image(image)
    out.SetOrigin(tuple(o + offset for o in image.GetOrigin()))
    return out


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_sentence(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message


def metaimage(path: Path, array: np.ndarray, spacing: str, origin: str, direction: str) -> Path:
    """An uncompressed MetaImage (.mha) with the header fields written exactly as given (text)."""
    header = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"CompressedData = False\nTransformMatrix = {direction}\nOffset = {origin}\n"
              f"ElementSpacing = {spacing}\nDimSize = {array.shape[2]} {array.shape[1]} {array.shape[0]}\n"
              f"ElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    path.write_bytes(header.encode() + np.ascontiguousarray(array, dtype="<f4").tobytes())
    return path


def patched_nifti(source: Path, target: Path, offset: int, fmt: str, value: float) -> Path:
    """A copy of an uncompressed NIfTI-1 file with one header field (at byte ``offset``) replaced."""
    import struct

    data = bytearray(source.read_bytes())
    data[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    target.write_bytes(bytes(data))
    return target


@pytest.fixture(scope="module")
def stack(fresh_stack_file: Path):
    """The freshly initialised small stack: exactly the identity after the centre alignment."""
    return load_stack(fresh_stack_file)


@pytest.fixture(scope="module")
def active_stack(fresh_stack_file: Path):
    """The small stack with seeded non-zero output layers, so that every stage moves the image."""
    stack = load_stack(fresh_stack_file)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for stage in stack.stages:
            layer = stage.net.head[-1] if stage.spec.kind == "affine" else stage.net.output
            layer.weight.copy_(0.05 * torch.randn(layer.weight.shape, generator=generator))
            layer.bias.copy_(0.05 * torch.randn(layer.bias.shape, generator=generator))
    return stack


# ----------------------------------------------------------------------------------- 1-3, 9: refused by the CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, fresh_stack_file: Path) -> dict[str, Path]:
    """Good and hostile input files in one folder (written once)."""
    root = tmp_path_factory.mktemp("hostile-inputs")
    paths: dict[str, Path] = {"stack": root / "stack.safetensors"}
    paths["stack"].write_bytes(fresh_stack_file.read_bytes())
    fixed, moving = volume(0), volume(1)
    for name, image, suffix in (("fixed", fixed, ".nii.gz"), ("moving", moving, ".nii.gz"), ("fixed_nii", fixed, ".nii")):
        paths[name] = root / f"{name}{suffix}"
        sitk.WriteImage(image, str(paths[name]))
    array = sitk.GetArrayFromImage(moving)

    nan = array.copy()
    nan[3, 4, 5] = np.nan
    paths["nan_nifti"] = root / "nan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(paths["nan_nifti"]))
    inf = array.astype(np.float64)
    inf[1, 2, 3], inf[7, 7, 7] = np.inf, -np.inf
    paths["inf_nifti"] = root / "inf.nii"
    sitk.WriteImage(sitk.GetImageFromArray(inf), str(paths["inf_nifti"]))

    # NIfTI-1 header fields (byte offsets of the standard): pixdim[1] at 80, qoffset_x at 268 (qform only)
    qform_only = patched_nifti(paths["fixed_nii"], root / "qform_only.nii", 254, "<h", 0)
    paths["pixdim_zero"] = patched_nifti(qform_only, root / "pixdim_zero.nii", 80, "<f", 0.0)
    paths["pixdim_nan"] = patched_nifti(qform_only, root / "pixdim_nan.nii", 80, "<f", float("nan"))
    paths["pixdim_negative"] = patched_nifti(paths["fixed_nii"], root / "pixdim_negative.nii", 80, "<f", -2.0)
    paths["qoffset_nan"] = patched_nifti(qform_only, root / "qoffset_nan.nii", 268, "<f", float("nan"))

    good_header = dict(spacing="2 2 2", origin="-15 -15 -15", direction="1 0 0 0 1 0 0 0 1")
    for name, change in (("mha_nan_origin", dict(origin="nan -15 -15")), ("mha_zero_spacing", dict(spacing="2 0 2")),
                         ("mha_sheared", dict(direction="1 0.2 0 0 1 0 0 0 1")),
                         ("mha_far_origin", dict(origin="1e11 0 0")),
                         ("mha_huge_spacing", dict(spacing="500 500 500"))):
        paths[name] = metaimage(root / f"{name}.mha", array, **{**good_header, **change})
    nrrd = root / "good.nrrd"
    sitk.WriteImage(moving, str(nrrd), False)
    text = nrrd.read_bytes()
    paths["nrrd_nan_origin"] = root / "nan_origin.nrrd"
    paths["nrrd_nan_origin"].write_bytes(re.sub(rb"space origin: \(([^,]*),", rb"space origin: (nan,", text))
    paths["nrrd_zero_axis"] = root / "zero_axis.nrrd"
    paths["nrrd_zero_axis"].write_bytes(text.replace(b"space directions: (2,0,0)", b"space directions: (0,0,0)"))
    nrrd.unlink()

    big = sitk.GetImageFromArray(array.astype(np.float64) * 1e300)
    big.CopyInformation(moving)
    paths["beyond_float32"] = root / "beyond_float32.nii.gz"
    sitk.WriteImage(big, str(paths["beyond_float32"]))
    return paths


REFUSED = [
    # id, fixed key, moving key, words the one sentence must contain
    ("NaN voxels in NIfTI (.nii.gz)", "fixed", "nan_nifti", ["moving image", "1 NaN or infinite voxels"]),
    ("Inf voxels in float64 NIfTI (.nii)", "inf_nifti", "moving", ["fixed image", "2 NaN or infinite voxels"]),
    ("NIfTI pixdim 0 (ITK reads 1 mm)", "pixdim_zero", "moving", ["fixed image", "pixdim[1]", "0"]),
    ("NIfTI pixdim NaN (ITK reads 1 mm)", "fixed", "pixdim_nan", ["moving image", "pixdim[1]", "nan"]),
    ("NIfTI pixdim negative (ITK flips the axis)", "pixdim_negative", "moving", ["fixed image", "pixdim[1]", "-2"]),
    ("NIfTI qoffset NaN (ITK reads 0)", "fixed", "qoffset_nan", ["moving image", "qform"]),
    ("MetaImage NaN origin (ITK reads 0)", "fixed", "mha_nan_origin", ["moving image", "Offset", "origin"]),
    ("MetaImage zero spacing", "mha_zero_spacing", "moving", ["fixed image", "zero voxel size", "ElementSpacing"]),
    ("MetaImage sheared direction", "fixed", "mha_sheared", ["moving image", "direction matrix is not orthonormal", "re-save"]),
    ("MetaImage origin 1e11 mm", "mha_far_origin", "moving", ["fixed image", "origin", "1e+10 mm"]),
    ("NRRD NaN origin", "fixed", "nrrd_nan_origin", ["moving image", "space origin", "origin"]),
    ("NRRD zero axis vector", "nrrd_zero_axis", "moving", ["fixed image", "space directions", "zero voxel size"]),
    ("values beyond float32", "fixed", "beyond_float32", ["moving image", "beyond single precision"]),
    ("network grid of 10^11 voxels", "mha_huge_spacing", "moving", ["fixed image", "network grid", "spacing"]),
]


@pytest.fixture(scope="module")
def refusals(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, run_dlir: RunDlir) -> dict[str, tuple]:
    """Every REFUSED case run as a user runs it, three processes at a time: (result, --out folder) per case id.

    The input folder is compared byte for byte before and after all runs.
    """
    from concurrent.futures import ThreadPoolExecutor

    root = files["fixed"].parent
    before = snapshot(root)
    outs = {case[0]: tmp_path_factory.mktemp("refused") / "out" for case in REFUSED}

    def run(case):
        name, fixed_key, moving_key, _ = case
        return name, run_dlir("register", files[fixed_key], files[moving_key], "--stack", files["stack"],
                              "--out", outs[name], "--device", "cpu")

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(pool.map(run, REFUSED))
    assert snapshot(root) == before, "an input file changed"
    return {name: (results[name], outs[name]) for name in results}


@pytest.mark.parametrize("name, words", [(c[0], c[3]) for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_hostile_file_is_refused_with_one_sentence(refusals: dict[str, tuple], name: str, words: list[str]) -> None:
    result, out = refusals[name]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()


# ----------------------------------------------------------------------------------- 2: headers, property-based
def _rotation(a: float, b: float, c: float) -> np.ndarray:
    ca, sa, cb, sb, cc, sc = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(c), math.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


SPACINGS = st.one_of(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1e-5, 1e-4, 0.01, 50.0, 1e4, 2e4]),
                     st.floats(0.3, 6.0))
ORIGINS = st.one_of(st.sampled_from([float("nan"), float("inf"), -1e9, 1e9, 3e9, 2e10]), st.floats(-500.0, 500.0))
DISTORTIONS = st.sampled_from(["none", "1e-6 shear", "1e-3 shear", "scaled column", "swapped axes", "nan"])


def _direction(angles: tuple[float, float, float], distortion: str) -> np.ndarray:
    d = _rotation(*angles)
    if distortion == "1e-6 shear":
        d[0, 1] += 1e-6
    elif distortion == "1e-3 shear":
        d[0, 1] += 1e-3
    elif distortion == "scaled column":
        d[:, 2] *= 1.5
    elif distortion == "swapped axes":
        d = d[:, [1, 0, 2]]  # left-handed but orthonormal: fine
    elif distortion == "nan":
        d[2, 2] = np.nan
    return d


def _usable(spacing: list[float], origin: list[float], direction: np.ndarray) -> bool:
    """The header rule, written independently of dlir: what must be accepted (MetaImage: a negative spacing flips its axis)."""
    s = np.abs(np.asarray(spacing))
    return bool(np.isfinite(s).all() and (s >= 1e-4).all() and (s <= 1e4).all()
                and np.isfinite(origin).all() and (np.abs(origin) <= 1e10).all()
                and np.isfinite(direction).all() and np.abs(direction.T @ direction - np.eye(3)).max() <= 1e-4)


def _visible(spacing: list[float], transform_matrix: np.ndarray, size: int) -> bool:
    """Whether a usable header's image of ``size``^3 voxels is at least one 8 mm voxel (the small stack's affine
    stage) wide along every LPS axis: its box, edge to edge, projected on each axis.  ``transform_matrix`` as
    written in the MetaImage header, which lists the direction's columns one after the other (ITK reads it transposed)."""
    widths = np.abs(transform_matrix.T) @ (np.abs(np.asarray(spacing)) * size)
    return bool((widths >= 8.0).all())


@settings(derandomize=True, max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spacing=st.lists(SPACINGS, min_size=3, max_size=3), origin=st.lists(ORIGINS, min_size=3, max_size=3),
       angles=st.tuples(*[st.floats(-math.pi, math.pi)] * 3), distortion=DISTORTIONS)
@example(spacing=[2.0, 2.0, 2.0], origin=[1e9, 1e9, 1e9], angles=(0.3, -0.2, 0.1), distortion="none")
@example(spacing=[0.0, 2.0, 2.0], origin=[0.0, 0.0, 0.0], angles=(0.0, 0.0, 0.0), distortion="none")
@example(spacing=[float("nan"), 2.0, 2.0], origin=[0.0, 0.0, 0.0], angles=(0.0, 0.0, 0.0), distortion="none")
@example(spacing=[2.0, 2.0, 2.0], origin=[float("nan"), 0.0, 0.0], angles=(0.0, 0.0, 0.0), distortion="none")
@example(spacing=[2.0, 2.0, 2.0], origin=[0.0, 0.0, 0.0], angles=(0.0, 0.0, 0.0), distortion="1e-3 shear")
@example(spacing=[2.0, 2.0, 2.0], origin=[0.0, 0.0, 0.0], angles=(0.5, 0.5, 0.5), distortion="1e-6 shear")
@example(spacing=[2.0, 2.0, 2.0], origin=[0.0, 0.0, 0.0], angles=(0.0, 0.0, 0.0), distortion="scaled column")
@example(spacing=[0.01, 0.01, 50.0], origin=[0.0, 0.0, 0.0], angles=(0.0, 0.0, 0.0), distortion="none")
@example(spacing=[1e-5, 1.0, 1.0], origin=[0.0, 0.0, 0.0], angles=(0.0, 0.0, 0.0), distortion="none")
@example(spacing=[-1.0, 2.0, 2.0], origin=[0.0, 0.0, 0.0], angles=(0.0, 0.0, 0.0), distortion="swapped axes")
def test_any_header_is_refused_with_a_sentence_or_registered_right(stack, spacing, origin, angles, distortion) -> None:
    """A MetaImage pair with the header written as given: refused exactly when unusable or narrower than a network
    voxel, else finite outputs on its grid."""
    direction = _direction(angles, distortion)
    text = dict(spacing=" ".join(repr(float(v)) for v in spacing), origin=" ".join(repr(float(v)) for v in origin),
                direction=" ".join(repr(float(v)) for v in direction.ravel()))
    shape = (6, 6, 6)
    with tempfile.TemporaryDirectory() as folder:
        fixed_path = metaimage(Path(folder) / "fixed.mha", sitk.GetArrayFromImage(volume(0, shape)), **text)
        moving_path = metaimage(Path(folder) / "moving.mha", sitk.GetArrayFromImage(volume(1, shape)), **text)
        try:
            fixed, moving = read_image(fixed_path, "fixed image"), read_image(moving_path, "moving image")
            result = register(fixed, moving, stack, device="cpu", initial_alignment="centre")  # two noise images
        except InputError as exc:
            one_sentence(str(exc))
            grid_too_big = "network grid" in str(exc)
            too_small = "cannot see it" in str(exc)
            assert grid_too_big or not _usable(spacing, origin, direction) or too_small, str(exc)
            assert not too_small or not _visible(spacing, direction, shape[0]), str(exc)
            words = ("network grid", "cannot see it", "spacing", "voxel size", "origin", "Offset", "direction")
            assert any(w in str(exc) for w in words), str(exc)
            event("refused: " + next(w for w in words if w in str(exc)))
            return
    event("registered")
    assert _usable(spacing, origin, direction) and _visible(spacing, direction, shape[0])
    for image in (result.displacement, result.warped, result.jacobian):
        assert np.isfinite(sitk.GetArrayViewFromImage(image)).all()
        assert Grid.from_image(image).same_as(Grid.from_image(fixed), tol=0.0)
    assert np.abs(sitk.GetArrayViewFromImage(result.displacement)).max() < 1e-3  # identity stack, same grids


# ----------------------------------------------------------------------------------- 3: intensities
def test_huge_finite_intensities_register_without_nan(stack) -> None:
    """1e38 (float32) intensities: normalised safely, finite transform, same result as the image scaled down."""
    fixed, moving = volume(0), volume(1)
    for scale in (3e38, -3e38):
        result = register(fixed * scale, moving, stack, device="cpu")
        assert np.isfinite(sitk.GetArrayViewFromImage(result.displacement)).all()
        assert result.folding_fraction == 0.0 and math.isfinite(result.jacobian_std)


def test_values_beyond_single_precision_are_refused() -> None:
    image = sitk.Cast(volume(0), sitk.sitkFloat64) * 1e300
    with pytest.raises(InputError, match="beyond single precision") as raised:
        check_image(image, "moving image")
    one_sentence(str(raised.value))


# ----------------------------------------------------------------------------------- 4: NaN in a stage
def test_nan_in_a_stage_output_stops_the_run_naming_the_stage(fresh_stack_file: Path) -> None:
    damaged = load_stack(fresh_stack_file)  # its own copy, damaged in memory (a stack file is checked when loaded)
    with torch.no_grad():
        damaged.stages[1].net.output.bias.fill_(float("nan"))
    with pytest.raises(StackError, match=r"stage 2/2 \(bspline\) of the stack 'fresh-small'.*network output") as raised:
        register(volume(0), volume(1), damaged, device="cpu")
    one_sentence(str(raised.value))
    infinite = AffineTransform(torch.eye(3)[None], torch.tensor([[float("inf"), 0.0, 0.0]]))
    with pytest.raises(StackError, match=r"stage 1/2 \(affine\).*its transform"):
        check_stage_output("stage 1/2 (affine)", "damaged", torch.zeros(1, 12), infinite)


# ----------------------------------------------------------------------------------- 5: far from the origin
@pytest.mark.parametrize("offset", [1e9, -2.5e9])
def test_a_pair_far_from_the_origin_registers_like_the_same_pair_near_it(active_stack, offset: float) -> None:
    fixed, moving = volume(0), volume(1, shape=(14, 18, 16), spacing=(2.2, 1.8, 2.0))
    moving.SetDirection(tuple(_rotation(0.1, -0.05, 0.2).ravel()))
    labels = sitk.Cast(moving > float(np.median(sitk.GetArrayViewFromImage(moving))), sitk.sitkUInt8)
    near = register(fixed, moving, active_stack, moving_labels=labels, device="cpu")
    far = register(translated(fixed, offset), translated(moving, offset), active_stack,
                   moving_labels=translated(labels, offset), device="cpu")
    u_near, u_far = (sitk.GetArrayFromImage(r.displacement) for r in (near, far))
    assert np.abs(u_near).max() > 1.0  # the stack really moves the image
    assert np.abs(u_far - u_near).max() < 1e-3  # mm
    assert np.abs(sitk.GetArrayFromImage(far.warped) - sitk.GetArrayFromImage(near.warped)).max() < 1e-4
    assert np.array_equal(sitk.GetArrayFromImage(far.warped_labels), sitk.GetArrayFromImage(near.warped_labels))
    assert np.abs(sitk.GetArrayFromImage(far.jacobian) - sitk.GetArrayFromImage(near.jacobian)).max() < 1e-4
    assert far.warped.GetOrigin() == translated(fixed, offset).GetOrigin()


# ----------------------------------------------------------------------------------- 6, 7: labels exact
LABEL_VALUES = {
    "int64 beyond 2^53": (np.int64, [0, -5, 2**24 + 1, 2**40 + 3, 2**62 + 7]),
    "uint32 above 2^24": (np.uint32, [0, 16_777_217, 16_777_219, 4_294_967_295]),
    "int16 negative": (np.int16, [0, -32768, -1, 7]),
}


@pytest.mark.parametrize("interpolation", ["nearest", "one-hot-linear"])
@pytest.mark.parametrize("kind", sorted(LABEL_VALUES))
def test_label_values_come_back_exactly(stack, active_stack, kind: str, interpolation: str) -> None:
    dtype, values = LABEL_VALUES[kind]
    moving = volume(1)
    blocks = np.random.default_rng(3).integers(0, len(values), size=(4, 4, 4))
    array = np.asarray(values, dtype=dtype)[np.kron(blocks, np.ones((4, 4, 4), dtype=int))]
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(moving)
    identity = register(moving, moving, stack, moving_labels=labels, device="cpu", label_interpolation=interpolation)
    assert identity.warped_labels.GetPixelID() == labels.GetPixelID()
    assert np.array_equal(sitk.GetArrayFromImage(identity.warped_labels), array)
    moved = register(volume(0), moving, active_stack, moving_labels=labels, device="cpu", label_interpolation=interpolation)
    warped = sitk.GetArrayFromImage(moved.warped_labels)
    assert warped.dtype == array.dtype and set(np.unique(warped).tolist()) <= set(values)
    assert len(np.unique(warped)) >= 3


def test_one_hot_linear_agrees_with_per_label_linear_interpolation(active_stack) -> None:
    """The 8-neighbour one-hot-linear equals the definition (each label's one-hot image sampled linearly, argmax)."""
    moving = volume(1)
    labels = sitk.GetImageFromArray(np.random.default_rng(4).integers(0, 5, size=SHAPE).astype(np.uint8))
    labels.CopyInformation(moving)
    result = register(volume(0), moving, active_stack, moving_labels=labels, device="cpu", label_interpolation="one-hot-linear")
    grid, lab = Grid.from_image(moving), torch.from_numpy(sitk.GetArrayFromImage(labels).astype(np.float32))[None, None]
    u = torch.from_numpy(sitk.GetArrayFromImage(result.displacement))
    points = (Grid.from_image(result.warped).physical_points() + u)[None]
    best = sample((lab == 0).float(), grid, points, outside=1.0)[0, 0]
    reference = torch.zeros_like(best)
    for v in range(1, 5):
        p = sample((lab == v).float(), grid, points)[0, 0]
        reference = torch.where(p > best, torch.full_like(reference, float(v)), reference)
        best = torch.maximum(best, p)
    agree = np.mean(sitk.GetArrayFromImage(result.warped_labels) == reference.numpy().astype(np.uint8))
    assert agree > 0.998, agree  # only exact ties (within float rounding) may go either way


def test_one_hot_linear_with_27000_labels_is_fast_exact_and_reports_progress(stack, monkeypatch) -> None:
    import dlir.fullres as engine

    monkeypatch.setattr(engine, "_CHUNK_VOXELS", 30 * 30 * 5)  # several slabs, so the warp reports progress inside
    moving = volume(1, shape=(30, 30, 30), spacing=(1.0, 1.0, 1.0))
    array = (np.random.default_rng(5).permutation(30**3).reshape(30, 30, 30) + 1).astype(np.uint32)
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(moving)
    reports: list[tuple[str, float]] = []
    start = time.perf_counter()
    result = register(moving, moving, stack, moving_labels=labels, device="cpu", label_interpolation="one-hot-linear",
                      progress=lambda step, fraction: reports.append((step, fraction)))
    assert time.perf_counter() - start < 30
    assert np.array_equal(sitk.GetArrayFromImage(result.warped_labels), array)
    inside_warp = [f for step, f in reports if step == "warp"]
    assert len(inside_warp) > 3 and inside_warp == sorted(inside_warp)


def test_label_files_written_by_the_cli_keep_values_above_2_24(files: dict[str, Path], tmp_path: Path, run_dlir: RunDlir) -> None:
    fixed = sitk.ReadImage(str(files["fixed"]))
    array = np.where(sitk.GetArrayFromImage(fixed) > 0.5, 16_777_217, 0).astype(np.uint32)
    array[:4] = 4_000_000_001
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(fixed)
    path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(labels, str(path))
    out = tmp_path / "out"
    result = run_dlir("register", files["fixed"], files["fixed"], "--stack", files["stack"], "--out", out,
                      "--moving-labels", path, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    written = sitk.ReadImage(str(out / "labels.nii.gz"))
    assert written.GetPixelID() == sitk.sitkUInt32
    assert np.array_equal(sitk.GetArrayFromImage(written), array)


# ----------------------------------------------------------------------------------- 8: no overlap
def test_no_overlap_after_the_initial_alignment_is_flagged(files: dict[str, Path], tmp_path: Path, run_dlir: RunDlir) -> None:
    far = translated(sitk.ReadImage(str(files["moving"])), 1000.0)
    path = tmp_path / "far.nii.gz"
    sitk.WriteImage(far, str(path))
    out = tmp_path / "out"
    result = run_dlir("register", files["fixed"], path, "--stack", files["stack"], "--out", out, "--device", "cpu",
                      "--initial-alignment", "none")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "do not overlap" in line]
    assert len(warnings) == 1 and "0.00 %" in warnings[0], result.stderr
    report = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert report["no_overlap"] is True and report["overlap_fraction"] == 0.0
    centred = register(sitk.ReadImage(str(files["fixed"])), far, load_stack(files["stack"]), device="cpu",
                       initial_alignment="centre")
    assert centred.summary()["no_overlap"] is False and centred.overlap_fraction == 1.0 and not centred.warnings


# ----------------------------------------------------------------------------------- 9: extreme grids
def test_an_extremely_anisotropic_pair_registers_in_bounded_memory(files: dict[str, Path], tmp_path: Path) -> None:
    """0.01 x 0.01 x 50 mm voxels (1024 x 1024 x 8, 10.24 mm wide: the 8 mm stage sees it): the anti-aliasing kernels
    once took 5 GB at 256 x 256 and 20 GB at 512 x 512; this pair peaks at about 0.72 GB (README, "Bad input")."""
    paths = []
    for seed in (0, 1):
        image = volume(seed, shape=(8, 1024, 1024), spacing=(0.01, 0.01, 50.0))
        paths.append(tmp_path / f"aniso{seed}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    # the peak of this process's own address space: /proc's VmHWM (kB) starts afresh at exec, where ru_maxrss
    # keeps the high-water mark of the forked pytest process (GBs late in a full run); ru_maxrss off Linux
    measure = ("import os, resource, sys; from dlir.cli import main; code = main(sys.argv[1:]); "
               "hwm = [int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')] "
               "if os.path.exists('/proc/self/status') else []; "
               "print('maxrss', hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
               "sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", measure, "register", *map(str, paths), "--stack", str(files["stack"]),
                             "--out", str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    peak = int(result.stderr.split("maxrss")[-1]) * (1 if sys.platform == "darwin" else 1024)
    assert peak < 1.5 * 2**30, f"peak memory {peak / 2**30:.2f} GB"


# ----------------------------------------------------------------------------------- 10: nothing silently empty
def run_main(capfd: pytest.CaptureFixture[str], *args: object) -> tuple[int, list[str], str]:
    """``dlir ARGS`` in this process: (exit code, non-empty stderr lines, stdout), captured at the file descriptors
    (so what native code prints counts too).  The engine's logged warnings, which the command prints as
    ``WARNING: <sentence>``, go to pytest's log capture here (``caplog``)."""
    capfd.readouterr()
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, [line for line in err.splitlines() if line.strip()], out


def logged_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


TOO_SMALL = {
    "2 x 2 x 2 voxels of 1 mm": ((2, 2, 2), (1.0, 1.0, 1.0), "2 mm wide"),
    "0.01 x 0.01 x 50 mm voxels, 128 x 128 x 8": ((8, 128, 128), (0.01, 0.01, 50.0), "1.28 mm wide"),
}


@pytest.mark.parametrize("shape, spacing, width", TOO_SMALL.values(), ids=TOO_SMALL.keys())
def test_an_image_narrower_than_a_network_voxel_is_refused_before_any_work(
    files: dict[str, Path], tmp_path: Path, capfd, monkeypatch, shape, spacing, width: str
) -> None:
    """Such a pair registered with exit 0 and an all-zero warped image: the stages moved points by millimetres, out of it."""
    import dlir.register

    def never(*args, **kwargs):
        raise AssertionError("the registration started")

    monkeypatch.setattr(dlir.register, "_register", never)
    paths = [tmp_path / f"tiny{seed}.nii.gz" for seed in (0, 1)]
    for seed, path in enumerate(paths):
        sitk.WriteImage(volume(seed, shape=shape, spacing=spacing), str(path))
    out = tmp_path / "out"
    code, err, _ = run_main(capfd, "register", *paths, "--stack", files["stack"], "--out", out, "--device", "cpu")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: the fixed image is only "), err
    for words in (width, "less than one 8 mm voxel of stage 1/2 (affine)", "cannot see it", "voxel size"):
        assert words in err[0], err[0]
    assert not out.exists()
    with pytest.raises(InputError, match="the moving image is only .* cannot see it") as raised:
        register(volume(0), sitk.ReadImage(str(paths[1])), load_stack(files["stack"]), device="cpu")
    one_sentence(str(raised.value))


def shifting_stack(fresh_stack_file: Path, shift_voxels: float) -> Stack:
    """The small stack whose B-spline stage moves every point by ``shift_voxels`` of its 4 mm grid along x (LPS)."""
    stack = load_stack(fresh_stack_file)
    with torch.no_grad():
        output = stack.stages[1].net.output
        output.weight.zero_()
        output.bias.copy_(torch.tensor([shift_voxels, 0.0, 0.0]))
    return stack


def test_a_transform_that_maps_the_fixed_image_out_of_the_moving_one_is_flagged(
    files: dict[str, Path], tmp_path: Path, capfd, caplog, fresh_stack_file: Path
) -> None:
    """40 mm out of a 32 mm wide pair: exit 0, but a warning on the command line and in result.json (it said nothing)."""
    stack_path = save_stack(shifting_stack(fresh_stack_file, 10.0), tmp_path / "shifting.safetensors")
    out = tmp_path / "out"
    code, err, _ = run_main(capfd, "register", files["fixed"], files["moving"], "--stack", stack_path, "--out", out,
                            "--device", "cpu", "--initial-alignment", "none")
    assert code == 0, err
    warned = [line for line in logged_warnings(caplog) if "maps only" in line]
    assert len(warned) == 1 and warned[0].startswith("the registered transform maps only 0.0 % of the fixed image "
                                                     "inside the moving image (100.0 % after the initial"), warned
    report = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert report["registered_overlap_fraction"] == 0.0 and report["overlap_fraction"] == 1.0
    assert any("maps only" in w for w in report["warnings"]) and report["no_overlap"] is False
    slight = register(volume(0), volume(1), shifting_stack(fresh_stack_file, 1.0), device="cpu", initial_alignment="none")
    assert 0.8 < slight.registered_overlap_fraction < 1.0  # 4 mm of 32: kept, no warning
    assert not any("maps only" in w for w in slight.warnings)


# ----------------------------------------------------------------------------------- 11: ITK's words never shown
def _nifti_with_sform(source: Path, target: Path, qform_code: int, srow: list[float]) -> Path:
    """A copy of an uncompressed NIfTI-1 file with the qform code and the sform (code 1, ``srow``) replaced."""
    import struct

    data = bytearray(source.read_bytes())
    data[252:256] = struct.pack("<hh", qform_code, 1)
    data[280:328] = struct.pack("<12f", *srow)
    target.write_bytes(bytes(data))
    return target


SHEARED_SROW = [2.0, 0.6, 0.0, -15.0, 0.0, 2.0, 0.0, -15.0, 0.0, 0.0, 2.0, -15.0]
ITK_WORDS = ("ITK", "WARNING: In", ".cxx", "0x", "sitk::", "GDCM")


def _hostile_reads(files: dict[str, Path], root: Path) -> dict[str, tuple[Path, list[str]]]:
    nodicom = root / "nodicom"
    nodicom.mkdir()
    (nodicom / "notes.txt").write_text("no DICOM here\n", encoding="utf-8")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(files["moving"])))
    return {
        "sheared sform, no qform": (_nifti_with_sform(files["fixed_nii"], root / "sheared.nii", 0, SHEARED_SROW),
                                    ["moving image file", "sheared.nii", "not a rotation (it shears", "fix the header"]),
        "singular direction (MetaImage)": (metaimage(root / "singular.mha", array, "2 2 2", "-15 -15 -15", "1 0 0 0 1 0 0 0 0"),
                                           ["moving image file", "singular.mha", "singular", "correct the direction"]),
        "folder without DICOM files": (nodicom, ["moving image folder", "holds no DICOM series", "give a folder"]),
    }


@pytest.mark.parametrize("case", ["sheared sform, no qform", "singular direction (MetaImage)", "folder without DICOM files"])
def test_an_image_itk_refuses_is_one_sentence_of_ours_and_nothing_of_itk(files: dict[str, Path], tmp_path: Path, capfd,
                                                                          case: str) -> None:
    path, words = _hostile_reads(files, tmp_path)[case]
    code, err, stdout = run_main(capfd, "register", files["fixed"], path, "--stack", files["stack"], "--out",
                                 tmp_path / "out", "--device", "cpu")
    assert code == 2 and stdout == "" and len(err) == 1 and err[0].startswith("error: "), (err, stdout)
    for word in words:
        assert word in err[0], err[0]
    assert not any(w in err[0] for w in ITK_WORDS), err[0]


def test_a_sform_itk_reads_with_a_caveat_is_a_warning_of_ours(files: dict[str, Path], tmp_path: Path, capfd, caplog) -> None:
    """A sheared sform beside a good qform: ITK places the image by the qform and prints its own warning twice."""
    path = _nifti_with_sform(files["fixed_nii"], tmp_path / "sheared_with_qform.nii", 1, SHEARED_SROW)
    code, err, stdout = run_main(capfd, "register", files["fixed"], path, "--stack", files["stack"], "--out",
                                 tmp_path / "out", "--device", "cpu")
    assert code == 0, err
    assert [line for line in logged_warnings(caplog) if "sform" in line] == [
        f"the moving image file {path} has a sform in its NIfTI header that disagrees with its voxel size or "
        "shears the axes, so the image was placed by the rest of the header (as 3D Slicer does); check that it lies "
        "where you expect, or fix the sform"], err
    assert not any(w in line for line in err + stdout.splitlines() for w in ITK_WORDS), (err, stdout)
