"""Reading, checking and writing images, label maps and transforms with SimpleITK.

Images come in as NIfTI, NRRD, MHA/MHD or a DICOM series folder and stay in ITK's physical LPS
space (mm).  Input files are only ever read, after the byte-level checks of :mod:`dlir.filecheck`;
``.nii.gz`` files are written with the parallel encoder of :mod:`dlir.gzipstream`.  What ITK prints
while reading never reaches the terminal: a failure becomes one sentence naming the problem and its fix,
a known warning a logged sentence (:data:`_ITK_REFUSALS`, :data:`_ITK_WARNINGS`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .filecheck import check_image_file
from .geometry import Grid, header_problem
from .gzipstream import gzip_stream

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")

log = logging.getLogger(__name__)


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read a 3D image (file or DICOM series folder).  ``what`` names it in error messages.

    What ITK and its file libraries print meanwhile is captured, never shown: a failure is one
    sentence (:class:`InputError`), a known warning of a read that succeeded a logged sentence.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"the {what} {path} does not exist")
    said: list[str] = []
    try:
        with captured_stderr() as said:
            image = _read_series(path, what) if path.is_dir() else _read_file(path, what)
    except RuntimeError as exc:
        raise InputError(_unreadable(path, what, str(exc), said)) from exc
    _report_warnings(path, what, said)
    return image


def _read_series(folder: Path, what: str) -> sitk.Image:
    """The one DICOM series in ``folder``."""
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"the {what} folder {folder} holds no DICOM series; give a folder with the DICOM files of one "
                         "series, or an image file (NIfTI, NRRD or MetaImage)")
    if len(series) > 1:
        raise InputError(f"the {what} folder {folder} holds {len(series)} DICOM series; point to a folder with one")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def _read_file(path: Path, what: str) -> sitk.Image:
    """An image file, after the byte-level checks of :func:`dlir.filecheck.check_image_file`."""
    if path.stat().st_size == 0:
        raise InputError(f"the {what} file {path} is empty")
    check_image_file(path, what)
    return sitk.ReadImage(str(path))


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collect what native readers and writers write to file descriptor 2 (MetaIO prints its errors there)."""
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


#: ITK's words for a file it cannot read (a phrase of its exception or of what it printed) -> DLIR's sentence
#: (``{what}``: "fixed image", ...; ``{path}``: the file); the first phrase found decides
_ITK_REFUSALS = (
    ("orthonormal direction cosines",
     "the {what} file {path} cannot be placed in space: the direction in its header is not a rotation (it shears "
     "the axes); fix the header, for example by resampling the image onto a grid without shear (e.g. with nibabel or FSL)"),
    ("determinant is 0",
     "the {what} file {path} cannot be placed in space: the direction matrix in its header is singular (an axis is "
     "zero or two axes are parallel); correct the direction in the header so that its three axes are perpendicular"),
    ("Unable to determine ImageIO reader",
     "the {what} {path} cannot be read as an image: its contents are not NIfTI, NRRD or MetaImage; give the image in "
     "one of these formats, or a folder with the DICOM files of one series"),
)
#: ITK's words for a file it read with a caveat -> the sentence logged as a warning instead
_ITK_WARNINGS = (
    ("unexpected scales in sform",
     "the {what} file {path} has a sform in its NIfTI header that disagrees with its voxel size or shears the axes, "
     "so the image was placed by the rest of the header (as 3D Slicer does); check that it lies where you expect, "
     "or fix the sform"),
)
#: the parts of ITK's messages that mean nothing to a user: source locations, object addresses, severity tags
_ITK_NOISE = re.compile(r"Exception thrown in SimpleITK \w+: \S+:\d+:|WARNING: In \S+, line \d+|"
                        r"(ITK ERROR|sitk::ERROR|ERROR|WARNING):|\w+ ?\(0x[0-9a-fA-F]+\):")


def _unreadable(path: Path, what: str, error: str, said: list[str]) -> str:
    """The sentence for a file ITK failed to read: from :data:`_ITK_REFUSALS` when a known phrase is in its
    exception ``error`` or in what it printed (``said``), else ITK's own words without source paths and addresses."""
    text = " ".join([error, *said])
    for phrase, sentence in _ITK_REFUSALS:
        if phrase in text:
            return sentence.format(what=what, path=path)
    reason = _plain(" ".join(said)) or _plain(error.strip().splitlines()[-1] if error.strip() else "") or "unknown reason"
    return f"the {what} {path} cannot be read as an image ({reason[:300]})"


def _report_warnings(path: Path, what: str, said: list[str]) -> None:
    """Log what a reader printed about a file it did read: a known caveat as a sentence, anything else at debug level."""
    text = " ".join(said)
    for phrase, sentence in _ITK_WARNINGS:
        if phrase in text:
            log.warning(sentence.format(what=what, path=path))
            return
    if text:
        log.debug("the reader of %s printed: %s", path, text[:2000])


def _plain(text: str) -> str:
    """ITK's message without its source locations, object addresses and severity tags, on one line."""
    return " ".join(_ITK_NOISE.sub(" ", text).split())


#: how to repair each header field, for the sentence that refuses it
_HEADER_FIXES = {
    "spacing": "set its true voxel size in mm (e.g. with SimpleITK's SetSpacing, or in 3D Slicer's Volumes module) and save it again",
    "origin": "set its true origin in mm (e.g. with SimpleITK's SetOrigin, or in 3D Slicer's Volumes module) and save it again",
    "direction": "re-save it with a proper direction, e.g. with SimpleITK/3D Slicer",
}

#: the largest magnitude a float32 holds; the engine computes in float32
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_geometry(image: sitk.Image, what: str = "image") -> None:
    """Refuse an image whose spacing, origin or direction cannot be used (see :func:`dlir.geometry.header_problem`)."""
    problem = header_problem(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    if problem is not None:
        field, phrase = problem
        raise InputError(f"the {what}'s {phrase}; {_HEADER_FIXES[field]}")


def check_image(image: sitk.Image, what: str = "image", as_float32: bool = True) -> sitk.Image:
    """Refuse images DLIR cannot register; return the image as float32 (a new object), or ``image``
    itself with ``as_float32=False`` (no copy: the engine reads it in its own type).

    Refused: not 3D (2D, or 4D/multi-component), fewer than 2 voxels along an axis, a spacing,
    origin or direction that is not finite, a spacing outside 0.0001 to 10,000 mm, an origin
    farther than 1e10 mm from zero, a direction matrix that is not orthonormal (within 1e-4),
    NaN or infinite voxels, values beyond single precision (|v| > 3.4e38), constant intensity.
    """
    if image.GetDimension() != 3:
        raise InputError(f"the {what} is {image.GetDimension()}D; DLIR registers 3D images")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"the {what} has {image.GetNumberOfComponentsPerPixel()} components per voxel (a 4D or colour image); DLIR needs a scalar 3D image"
        )
    if min(image.GetSize()) < 2:
        raise InputError(f"the {what} is a single slice ({image.GetSize()}); DLIR registers 3D volumes")
    check_geometry(image, what)
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise InputError(f"the {what} has {bad} NaN or infinite voxels; fix or mask them before registering")
    low, high = float(arr.min()), float(arr.max())
    if max(abs(low), abs(high)) > _FLOAT32_MAX:
        raise InputError(f"the {what} has values from {low:g} to {high:g}, beyond single precision (3.4e38); "
                         "rescale its intensities before registering")
    if high == low:
        raise InputError(f"the {what} is constant (every voxel is {low}): there is nothing to register")
    return sitk.Cast(image, sitk.sitkFloat32) if as_float32 else image


def check_label_map(labels: sitk.Image, reference: sitk.Image, what: str = "label map", reference_what: str = "moving image",
                    allow_negative: bool = False) -> sitk.Image:
    """A label map (or mask) must be a 3D integer-valued image on the grid of ``reference``.

    Negative labels are refused unless ``allow_negative`` (warping keeps any integer exactly).
    """
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"the {what} must be a scalar 3D image")
    if not Grid.from_image(labels).same_as(Grid.from_image(reference), tol=1e-3):
        raise InputError(
            f"the {what} is not on the grid of the {reference_what} (size, spacing, origin or direction differ); "
            f"resample it onto the {reference_what} first"
        )
    arr = sitk.GetArrayViewFromImage(labels)
    if arr.dtype.kind == "f" and (not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr))):
        raise InputError(f"the {what} has non-integer values; a label map holds whole label numbers")
    if not allow_negative and arr.min() < 0:
        raise InputError(f"the {what} has negative values; labels are numbers >= 0")
    return labels


#: gzip level of the ``.nii.gz`` files DLIR writes (SimpleITK's NIfTI writer ignores the level it is given
#: and compresses at zlib's default, 6, on one core; level 1 in blocks on up to 4 cores: see :func:`dlir.gzipstream.gzip_stream`)
NIFTI_GZIP_LEVEL = 1
#: deflate strategy for images of floating-point voxels (a Jacobian, a float warped image): Huffman coding only.
#: Their low mantissa bits never repeat, so string matching finds nothing and only costs time; integer images
#: (CT, labels) repeat values and keep the matching.
FLOAT_STRATEGY = zlib.Z_HUFFMAN_ONLY


def write_image(image: sitk.Image, path: str | Path) -> Path:
    """Write an image (compressed when the format allows); creates the parent folder.

    ``.nii.gz``: written uncompressed by SimpleITK beside ``path`` (a hidden temporary ``.nii``),
    then compressed into ``path`` at :data:`NIFTI_GZIP_LEVEL` (:data:`FLOAT_STRATEGY` for floating-point
    voxels; one gzip member, readable by every NIfTI reader) and the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.name.lower().endswith(".nii.gz"):
        sitk.WriteImage(image, str(path), useCompression=True)
        return path
    raw = path.with_name(f".{path.name[:-3]}.{os.getpid()}.tmp.nii")
    try:
        sitk.WriteImage(image, str(raw), useCompression=False)
        floating = image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)
        with raw.open("rb") as source, path.open("wb") as target:
            gzip_stream(source, target, NIFTI_GZIP_LEVEL, strategy=FLOAT_STRATEGY if floating else zlib.Z_DEFAULT_STRATEGY)
    finally:
        with contextlib.suppress(OSError):
            raw.unlink()
    return path


def write_transform(transform: sitk.Transform, path: str | Path) -> Path:
    """Write an ITK transform file (.h5 / .tfm): fixed points -> moving points (resampling direction)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(transform, str(path))
    return path
