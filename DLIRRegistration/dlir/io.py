"""Reading, checking and writing images, label maps and transforms with SimpleITK.

Images come in as NIfTI, NRRD, MHA/MHD or a DICOM series folder and stay in ITK's physical LPS
space (mm).  Input files are only ever read.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import Grid, header_problem

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
            _check_text_header(path, what)
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
    """Refuse a NIfTI file that ITK would read wrongly without a word.

    * voxel data that ends early (ITK reads such files with zeros or garbage);
    * a header whose voxel size (pixdim) is zero, negative or not a number (ITK reads 1 mm, or
      flips the axis), or whose qform / sform holds NaN or infinite values (ITK reads 0);
    * NaN or infinite voxels in float data (the NIfTI library turns them into 0 while reading).
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                header = f.read(540)
                layout = _nifti_layout(header)
                scan = _NonFiniteScan(layout, len(header))
                scan.feed(header)
                size = len(header)
                if layout is not None and not scan.active and _gzip_trailer_length(path) == _nifti_length(layout) % 2**32:
                    size = _nifti_length(layout)  # whole by its gzip trailer, and no float voxels to scan: not inflated twice
                else:
                    while chunk := f.read(1 << 22):
                        size += len(chunk)
                        scan.feed(chunk)
        else:
            size = path.stat().st_size
            with path.open("rb") as f:
                header = f.read(540)
                layout = _nifti_layout(header)
                scan = _NonFiniteScan(layout, len(header))
                scan.feed(header)
                if scan.active:
                    while chunk := f.read(1 << 22):
                        scan.feed(chunk)
    except gzip.BadGzipFile:
        return  # not gzip at all: the image reader names the problem
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"the {what} file {path} is truncated or damaged ({exc})") from exc
    if layout is None:
        return
    expected = _nifti_length(layout)
    if size < expected:
        raise InputError(f"the {what} file {path} is truncated: its header promises {expected} bytes, it holds {size}")
    problem = layout.header_problem()
    if problem:
        raise InputError(f"the {what} file {path} has {problem} in its NIfTI header, which ITK would misread without a word; "
                         "correct the header (or save the image again with its true geometry, e.g. with SimpleITK or 3D Slicer)")
    if scan.bad:
        raise InputError(f"the {what} file {path} has {scan.bad} NaN or infinite voxels; fix or mask them before registering")


def _nifti_length(layout: "_NiftiLayout") -> int:
    """Bytes of a NIfTI file up to the end of its voxel data (header, extensions, voxels)."""
    return layout.offset + layout.voxels * layout.bitpix // 8


def _gzip_trailer_length(path: Path) -> int:
    """The uncompressed length (mod 2^32) a gzip file's trailer records (its last 4 bytes; -1 when shorter).

    A truncated file ends in compressed data, so its last 4 bytes match the length its NIfTI header
    promises only by a 1 in 2^32 chance; a mismatch (truncation, extra bytes, several members)
    leads to the full check, which inflates the file.
    """
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:
            return -1
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


@dataclass(frozen=True)
class _NiftiLayout:
    """The fields of a NIfTI-1 or NIfTI-2 header that decide how ITK reads the file's geometry and voxels."""

    order: str  # "<" or ">"
    dims: tuple[int, ...]  # dim[0..7]
    datatype: int
    bitpix: int
    offset: int  # vox_offset, bytes
    pixdim: tuple[float, ...]  # pixdim[0..7]
    qform_code: int
    sform_code: int
    quatern: tuple[float, ...]  # b, c, d, qoffset_x, y, z
    srow: tuple[float, ...]  # srow_x, srow_y, srow_z (12 values)

    @property
    def voxels(self) -> int:
        ndim = self.dims[0]
        return int(np.prod([max(1, d) for d in self.dims[1 : ndim + 1]], dtype=np.int64))

    def header_problem(self) -> str | None:
        """A phrase naming an unusable geometry field, or None."""
        spatial = self.pixdim[1 : 1 + min(3, max(1, self.dims[0]))]
        for axis, value in enumerate(spatial):
            if not math.isfinite(value) or value <= 0:
                return f"a voxel size (pixdim[{axis + 1}]) of {value:g}"
        if self.qform_code > 0 and not all(math.isfinite(v) for v in self.quatern):
            return "NaN or infinite values in the qform (quatern / qoffset)"
        if self.sform_code > 0 and not all(math.isfinite(v) for v in self.srow):
            return "NaN or infinite values in the sform (srow)"
        return None


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """The header fields of a NIfTI-1 or NIfTI-2 file; None when the header is not recognised."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            layout = _NiftiLayout(
                order=order,
                dims=struct.unpack(order + "8h", header[40:56]),
                datatype=struct.unpack(order + "h", header[70:72])[0],
                bitpix=struct.unpack(order + "h", header[72:74])[0],
                offset=int(struct.unpack(order + "f", header[108:112])[0]),
                pixdim=struct.unpack(order + "8f", header[76:108]),
                qform_code=struct.unpack(order + "h", header[252:254])[0],
                sform_code=struct.unpack(order + "h", header[254:256])[0],
                quatern=struct.unpack(order + "6f", header[256:280]),
                srow=struct.unpack(order + "12f", header[280:328]),
            )
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            layout = _NiftiLayout(
                order=order,
                dims=struct.unpack(order + "8q", header[16:80]),
                datatype=struct.unpack(order + "h", header[12:14])[0],
                bitpix=struct.unpack(order + "h", header[14:16])[0],
                offset=struct.unpack(order + "q", header[168:176])[0],
                pixdim=struct.unpack(order + "8d", header[104:168]),
                qform_code=struct.unpack(order + "i", header[344:348])[0],
                sform_code=struct.unpack(order + "i", header[348:352])[0],
                quatern=struct.unpack(order + "6d", header[352:400]),
                srow=struct.unpack(order + "12d", header[400:496]),
            )
            break
    else:
        return None
    if not 1 <= layout.dims[0] <= 7 or layout.bitpix <= 0 or layout.offset < 0:
        return None
    return layout


def _nifti_expected_bytes(header: bytes) -> int | None:
    """vox_offset + voxel bytes from a NIfTI-1 or NIfTI-2 header; None when the header is not recognised."""
    layout = _nifti_layout(header)
    return None if layout is None else layout.offset + layout.voxels * layout.bitpix // 8


#: NIfTI datatype codes of floating-point voxels -> numpy type (complex: its real and imaginary parts)
_NIFTI_FLOATS = {16: "f4", 64: "f8", 32: "f4", 1792: "f8"}


class _NonFiniteScan:
    """Counts NaN and infinite values in the float voxel data of a NIfTI stream fed chunk by chunk."""

    def __init__(self, layout: _NiftiLayout | None, header_length: int) -> None:
        code = None if layout is None else _NIFTI_FLOATS.get(layout.datatype)
        self.active = code is not None
        self.bad = 0
        if layout is None or code is None:
            return
        self.dtype = np.dtype(layout.order + code)
        self.start = layout.offset
        self.end = layout.offset + layout.voxels * layout.bitpix // 8
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
#: and compresses at zlib's default, 6, on one core; level 1 in blocks on up to 4 cores: see :func:`gzip_stream`)
NIFTI_GZIP_LEVEL = 1
#: deflate strategy for images of floating-point voxels (a Jacobian, a float warped image): Huffman coding only.
#: Their low mantissa bits never repeat, so string matching finds nothing: on a 52-million-voxel Jacobian
#: Huffman-only wrote the same size (80 % of raw) 2.4x faster than level 1's matching (109 vs 45 MB/s per core);
#: integer images (CT, labels) keep the matching (int16 CT: 50 % of raw instead of 60 %).
FLOAT_STRATEGY = zlib.Z_HUFFMAN_ONLY
_COPY_BYTES = 16 * 2**20


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


def gzip_stream(source, target, level: int = NIFTI_GZIP_LEVEL, threads: int | None = None,
                strategy: int = zlib.Z_DEFAULT_STRATEGY) -> None:
    """Compress the binary stream ``source`` into ``target`` as ONE gzip member, blocks deflated in parallel.

    As pigz does: each block of :data:`_COPY_BYTES` is deflated on its own (zlib releases the GIL) and
    ends on a byte boundary (a sync flush; the last one finishes the stream), so the concatenation is
    one valid deflate stream; the CRC-32 and length trailer are those of the whole input.  So the
    file is an ordinary ``.gz`` (one member: its trailer gives the whole length) written about as
    many times faster as there are cores.  ``strategy``: zlib's deflate strategy (e.g. ``zlib.Z_HUFFMAN_ONLY``).
    """
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, threads if threads is not None else min(4, os.cpu_count() or 1))

    def deflate(block: bytes, last: bool) -> bytes:
        packer = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 8, strategy)
        return packer.compress(block) + packer.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

    target.write(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + (b"\x04" if level == 1 else b"\x00") + b"\xff")
    crc, length = 0, 0
    pending = []
    with ThreadPoolExecutor(workers) as pool:
        block = source.read(_COPY_BYTES)
        while True:
            following = source.read(_COPY_BYTES) if block else b""
            last = not following
            crc = zlib.crc32(block, crc)
            length += len(block)
            pending.append(pool.submit(deflate, block, last))
            while len(pending) > workers or (last and pending):
                target.write(pending.pop(0).result())
            if last:
                break
            block = following
    target.write(struct.pack("<II", crc & 0xFFFFFFFF, length & 0xFFFFFFFF))


def write_transform(transform: sitk.Transform, path: str | Path) -> Path:
    """Write an ITK transform file (.h5 / .tfm): fixed points -> moving points (resampling direction)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(transform, str(path))
    return path
