"""Reading, checking and writing images, label maps and transforms with SimpleITK.

Images come in as NIfTI, NRRD, MHA/MHD or a DICOM series folder and stay in ITK's physical LPS
space (mm).  Input files are only ever read.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import Grid

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read a 3D image (file or DICOM series folder).  ``what`` names it in error messages."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"the {what} {path} does not exist")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(f"the {what} folder {path} holds no DICOM series")
            if len(series) > 1:
                raise InputError(f"the {what} folder {path} holds {len(series)} DICOM series; point to a folder with one")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            image = reader.Execute()
        else:
            if path.stat().st_size == 0:
                raise InputError(f"the {what} file {path} is empty")
            _check_nifti_complete(path, what)
            with _captured_stderr() as said:
                image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"the {what} {path} cannot be read as an image ({_reason(exc, said)})") from exc
    return image


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what native readers write to file descriptor 2 (MetaIO prints its errors there)."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(line.strip() for line in sink.read().decode(errors="replace").splitlines() if line.strip())


def _reason(exc: RuntimeError, said: list[str]) -> str:
    """The most telling line of a reader's failure: what it printed, else the exception's last line."""
    if said:
        return " ".join(said)[:300]
    text = str(exc).strip()
    return text.splitlines()[-1] if text else "unknown reason"


def _check_nifti_complete(path: Path, what: str) -> None:
    """Refuse a NIfTI file whose voxel data ends early (ITK reads such files with zeros or garbage)."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                header = f.read(540)
                size = len(header)
                while chunk := f.read(1 << 22):
                    size += len(chunk)
        else:
            header = path.read_bytes()[:540]
            size = path.stat().st_size
    except gzip.BadGzipFile:
        return  # not gzip at all: the image reader names the problem
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"the {what} file {path} is truncated or damaged ({exc})") from exc
    expected = _nifti_expected_bytes(header)
    if expected is not None and size < expected:
        raise InputError(f"the {what} file {path} is truncated: its header promises {expected} bytes, it holds {size}")


def _nifti_expected_bytes(header: bytes) -> int | None:
    """vox_offset + voxel bytes from a NIfTI-1 or NIfTI-2 header; None when the header is not recognised."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dims = struct.unpack(order + "8q", header[16:80])
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(1, d) for d in dims[1 : ndim + 1]], dtype=np.int64))
    return offset + voxels * bitpix // 8


def check_image(image: sitk.Image, what: str = "image") -> sitk.Image:
    """Refuse images DLIR cannot register; return the image as float32 (a new object).

    Refused: not 3D (2D, or 4D/multi-component), fewer than 2 voxels along an axis, NaN or
    infinite voxels, constant intensity.
    """
    if image.GetDimension() != 3:
        raise InputError(f"the {what} is {image.GetDimension()}D; DLIR registers 3D images")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"the {what} has {image.GetNumberOfComponentsPerPixel()} components per voxel (a 4D or colour image); DLIR needs a scalar 3D image"
        )
    if min(image.GetSize()) < 2:
        raise InputError(f"the {what} is a single slice ({image.GetSize()}); DLIR registers 3D volumes")
    arr = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise InputError(f"the {what} has {bad} NaN or infinite voxels; fix or mask them before registering")
    if float(arr.max()) == float(arr.min()):
        raise InputError(f"the {what} is constant (every voxel is {float(arr.min())}): there is nothing to register")
    return sitk.Cast(image, sitk.sitkFloat32)


def check_label_map(labels: sitk.Image, reference: sitk.Image, what: str = "label map", reference_what: str = "moving image") -> sitk.Image:
    """A label map (or mask) must be a 3D integer-valued image on the grid of ``reference``."""
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"the {what} must be a scalar 3D image")
    if not Grid.from_image(labels).same_as(Grid.from_image(reference), tol=1e-3):
        raise InputError(
            f"the {what} is not on the grid of the {reference_what} (size, spacing, origin or direction differ); "
            f"resample it onto the {reference_what} first"
        )
    arr = sitk.GetArrayViewFromImage(labels)
    if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
        raise InputError(f"the {what} has non-integer values; a label map holds whole label numbers")
    if arr.min() < 0:
        raise InputError(f"the {what} has negative values; labels are numbers >= 0")
    return labels


def write_image(image: sitk.Image, path: str | Path) -> Path:
    """Write an image (compressed when the format allows); creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def write_transform(transform: sitk.Transform, path: str | Path) -> Path:
    """Write an ITK transform file (.h5 / .tfm): fixed points -> moving points (resampling direction)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(transform, str(path))
    return path
