"""The NIfTI-1 and NIfTI-2 file header, read from its bytes, and the gzip trailer of a ``.nii.gz`` file.

What the engine checks without a NIfTI library: where a file's voxel data ends (so a file cut
short is found), its geometry fields, and whether a gzip file's trailer records the length the
header promises (so a whole file is known without inflating it).  Lengths are in bytes.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: the length of a NIfTI-1 header (its sizeof_hdr), bytes
NIFTI1_HEADER_BYTES = 348
#: the length of a NIfTI-2 header (its sizeof_hdr), bytes; read this much to recognise either
NIFTI2_HEADER_BYTES = 540

#: NIfTI datatype codes of floating-point voxels -> numpy type code (complex: its real and imaginary parts)
_FLOAT_DATATYPES = {16: "f4", 64: "f8", 32: "f4", 1792: "f8"}


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1 or NIfTI-2 header that decide how ITK reads the file's geometry and voxels."""

    order: str  # "<" or ">"
    dims: tuple[int, ...]  # dim[0..7]
    datatype: int
    bitpix: int  # bits per voxel
    offset: int  # vox_offset: where the voxel data starts, bytes
    pixdim: tuple[float, ...]  # pixdim[0..7]
    qform_code: int
    sform_code: int
    quatern: tuple[float, ...]  # b, c, d, qoffset_x, y, z
    srow: tuple[float, ...]  # srow_x, srow_y, srow_z (12 values)

    @property
    def voxels(self) -> int:
        """The number of voxels (every component of every time point)."""
        ndim = self.dims[0]
        return int(np.prod([max(1, d) for d in self.dims[1 : ndim + 1]], dtype=np.int64))

    @property
    def data_end(self) -> int:
        """Bytes of the file up to the end of its voxel data (header, extensions, voxels): its least whole length."""
        return self.offset + self.voxels * self.bitpix // 8

    @property
    def float_dtype(self) -> np.dtype | None:
        """The numpy type of one float value of the voxels (byte order included), None for integer voxels."""
        code = _FLOAT_DATATYPES.get(self.datatype)
        return None if code is None else np.dtype(self.order + code)

    def geometry_problem(self) -> str | None:
        """A phrase naming an unusable geometry field (voxel size, qform, sform), or None."""
        spatial = self.pixdim[1 : 1 + min(3, max(1, self.dims[0]))]
        for axis, value in enumerate(spatial):
            if not math.isfinite(value) or value <= 0:
                return f"a voxel size (pixdim[{axis + 1}]) of {value:g}"
        if self.qform_code > 0 and not all(math.isfinite(v) for v in self.quatern):
            return "NaN or infinite values in the qform (quatern / qoffset)"
        if self.sform_code > 0 and not all(math.isfinite(v) for v in self.srow):
            return "NaN or infinite values in the sform (srow)"
        return None


def parse_header(header: bytes) -> NiftiHeader | None:
    """The header at the start of a NIfTI-1 or NIfTI-2 file (uncompressed bytes, either byte order);
    None when ``header`` is not one (too short, another sizeof_hdr, or impossible dims, bitpix or vox_offset)."""
    for order in "<>":
        if len(header) >= NIFTI1_HEADER_BYTES and struct.unpack(order + "i", header[:4])[0] == NIFTI1_HEADER_BYTES:
            parsed = NiftiHeader(
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
        if len(header) >= NIFTI2_HEADER_BYTES and struct.unpack(order + "i", header[:4])[0] == NIFTI2_HEADER_BYTES:
            parsed = NiftiHeader(
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
    if not 1 <= parsed.dims[0] <= 7 or parsed.bitpix <= 0 or parsed.offset < 0:
        return None
    return parsed


def gzip_trailer_length(path: Path) -> int:
    """The uncompressed length (mod 2^32) a gzip file's trailer records (its last 4 bytes; -1 when shorter)."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:
            return -1
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def gzip_trailer_matches(path: Path, header: NiftiHeader) -> bool:
    """Whether the gzip file ``path`` is whole by its trailer: the length it records is the header's :attr:`~NiftiHeader.data_end`.

    Reads the last 4 bytes only.  A truncated file ends in compressed data, so its last 4 bytes
    match only by a 1 in 2^32 chance; a mismatch (truncation, extra bytes, several gzip members)
    says nothing more: a reader that must know inflates the file.
    """
    return gzip_trailer_length(path) == header.data_end % 2**32
