"""Byte-level checks of an image file before ITK reads it: what ITK would read wrongly without a word.

NIfTI (``.nii``, ``.nii.gz``): voxel data that ends early, an unusable voxel size, qform or sform
(:mod:`dlir.nifti`), NaN or infinite float voxels.  MetaImage (``.mha``, ``.mhd``) and NRRD
(``.nrrd``, ``.nhdr``): zero, NaN or infinite voxel sizes and origins in the text header.  Each
refusal is an :class:`~dlir.errors.InputError` with one sentence; files are only read.
"""

from __future__ import annotations

import gzip
import math
import re
import zlib
from pathlib import Path

import numpy as np

from .errors import InputError
from .nifti import NIFTI2_HEADER_BYTES, NiftiHeader, gzip_trailer_matches, parse_header

#: bytes read (inflated) at a time while a NIfTI file's voxels are checked
_CHUNK_BYTES = 1 << 22


def check_image_file(path: Path, what: str = "image") -> None:
    """Refuse an image file (by its name's suffix) that ITK would misread; ``what`` names it in the sentence.

    Files of other formats, and files that are not what their suffix says, pass: the image reader
    names their problem.
    """
    _check_nifti(path, what)
    _check_text_header(path, what)


def _check_nifti(path: Path, what: str) -> None:
    """Refuse a NIfTI file that ITK would read wrongly without a word.

    * voxel data that ends early (ITK reads such files with zeros or garbage);
    * a header whose voxel size (pixdim) is zero, negative or not a number (ITK reads 1 mm, or
      flips the axis), or whose qform / sform holds NaN or infinite values (ITK reads 0);
    * NaN or infinite voxels in float data (the NIfTI library turns them into 0 while reading).

    A ``.nii.gz`` of integer voxels that is whole by its gzip trailer is not inflated beyond its header.
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                head = f.read(NIFTI2_HEADER_BYTES)
                header = parse_header(head)
                scan = _NonFiniteScan(header)
                scan.feed(head)
                size = len(head)
                if header is not None and not scan.active and gzip_trailer_matches(path, header):
                    size = header.data_end  # whole by its gzip trailer, and no float voxels to scan: not inflated twice
                else:
                    while chunk := f.read(_CHUNK_BYTES):
                        size += len(chunk)
                        scan.feed(chunk)
        else:
            size = path.stat().st_size
            with path.open("rb") as f:
                head = f.read(NIFTI2_HEADER_BYTES)
                header = parse_header(head)
                scan = _NonFiniteScan(header)
                scan.feed(head)
                if scan.active:
                    while chunk := f.read(_CHUNK_BYTES):
                        scan.feed(chunk)
    except gzip.BadGzipFile:
        return  # not gzip at all: the image reader names the problem
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"the {what} file {path} is truncated or damaged ({exc})") from exc
    if header is None:
        return
    if size < header.data_end:
        raise InputError(f"the {what} file {path} is truncated: its header promises {header.data_end} bytes, it holds {size}")
    problem = header.geometry_problem()
    if problem:
        raise InputError(f"the {what} file {path} has {problem} in its NIfTI header, which ITK would misread without a word; "
                         "correct the header (or save the image again with its true geometry, e.g. with SimpleITK or 3D Slicer)")
    if scan.bad:
        raise InputError(f"the {what} file {path} has {scan.bad} NaN or infinite voxels; fix or mask them before registering")


class _NonFiniteScan:
    """Counts NaN and infinite values in the float voxel data of a NIfTI stream fed chunk by chunk from its first byte."""

    def __init__(self, header: NiftiHeader | None) -> None:
        dtype = None if header is None else header.float_dtype
        self.active = dtype is not None
        self.bad = 0
        if header is None or dtype is None:
            return
        self.dtype = dtype
        self.start = header.offset
        self.end = header.data_end
        self.position = 0
        self.carry = b""

    def feed(self, chunk: bytes) -> None:
        if not self.active:
            return
        begin, self.position = self.position, self.position + len(chunk)
        lo, hi = max(self.start, begin), min(self.end, self.position)
        if hi <= lo:
            return
        data = self.carry + chunk[lo - begin : hi - begin]
        usable = len(data) - len(data) % self.dtype.itemsize
        values = np.frombuffer(data[:usable], dtype=self.dtype)
        self.bad += int(values.size - np.count_nonzero(np.isfinite(values)))
        self.carry = data[usable:]


#: header keys of MetaImage (.mha / .mhd) and NRRD (.nrrd / .nhdr) files that hold geometry
_META_KEYS = {"elementspacing": "spacing", "elementsize": "spacing", "offset": "origin", "origin": "origin",
              "position": "origin", "transformmatrix": "direction", "rotation": "direction", "orientation": "direction"}
_NRRD_KEYS = {"spacings": "spacing", "space directions": "direction", "space origin": "origin"}


def _check_text_header(path: Path, what: str) -> None:
    """Refuse a MetaImage or NRRD header whose geometry ITK would replace or refuse with a cryptic message.

    Zero, NaN or infinite voxel sizes (ITK refuses them as "Refusing to change spacing"), and NaN
    or infinite origins (MetaImage reads them as 0).
    """
    name = path.name.lower()
    if name.endswith((".mha", ".mhd")):
        keys, separator = _META_KEYS, "="
    elif name.endswith((".nrrd", ".nhdr")):
        keys, separator = _NRRD_KEYS, ":"
    else:
        return
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return  # the image reader names the problem
    for raw in head.split(b"\n"):
        line = raw.decode("latin-1").strip()
        if not line and separator == ":":
            break  # end of an NRRD header
        label, sep, value = line.partition(separator)
        label = label.strip()
        key = label.lower()
        if not sep or key not in keys:
            if key == "elementdatafile":
                break  # end of a MetaImage header
            continue
        field = keys[key]
        numbers = _header_numbers(value)
        if any(not math.isfinite(v) for v in numbers):
            raise InputError(f"the {what} file {path} has NaN or infinite values in its header's {label} "
                             f"({value.strip()}); correct the {field} in the header")
        if field == "spacing" and any(v == 0 for v in numbers):
            raise InputError(f"the {what} file {path} has a zero voxel size in its header's {label} "
                             f"({value.strip()}); correct the spacing in the header")
        if field == "direction" and separator == ":":
            for vector in re.findall(r"\(([^)]*)\)", value):
                if all(v == 0 for v in _header_numbers(vector)):
                    raise InputError(f"the {what} file {path} has a zero axis vector in its header's space directions "
                                     f"({value.strip()}), i.e. a zero voxel size; correct the spacing in the header")


def _header_numbers(text: str) -> list[float]:
    """The numbers of a header value ("1 2 3", "(1,0,0) (0,1,0)", "nan"); words such as ``none`` are skipped."""
    out = []
    for token in re.split(r"[\s,()]+", text):
        try:
            out.append(float(token))
        except ValueError:
            continue
    return out
