"""A parallel gzip encoder: one ordinary gzip member whose blocks are deflated on several cores (as pigz does)."""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

#: bytes of input deflated as one block (one task of the thread pool)
BLOCK_BYTES = 16 * 2**20


def gzip_stream(source: BinaryIO, target: BinaryIO, level: int, threads: int | None = None,
                strategy: int = zlib.Z_DEFAULT_STRATEGY) -> None:
    """Compress the binary stream ``source`` into ``target`` as ONE gzip member, blocks deflated in parallel.

    Each block of :data:`BLOCK_BYTES` is deflated on its own (zlib releases the GIL) and ends on a
    byte boundary (a sync flush; the last one finishes the stream), so the concatenation is one
    valid deflate stream; the CRC-32 and length trailer are those of the whole input.  So the file
    is an ordinary ``.gz`` (one member: its trailer gives the whole length) written about as many
    times faster as there are cores.  ``level``: zlib's compression level (1-9); ``threads``: the
    workers (default: up to 4, one per core); ``strategy``: zlib's deflate strategy (e.g.
    ``zlib.Z_HUFFMAN_ONLY``).
    """
    workers = max(1, threads if threads is not None else min(4, os.cpu_count() or 1))

    def deflate(block: bytes, last: bool) -> bytes:
        packer = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 8, strategy)
        return packer.compress(block) + packer.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

    target.write(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + (b"\x04" if level == 1 else b"\x00") + b"\xff")
    crc, length = 0, 0
    pending = []
    with ThreadPoolExecutor(workers) as pool:
        block = source.read(BLOCK_BYTES)
        while True:
            following = source.read(BLOCK_BYTES) if block else b""
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
