"""Atomic file writes: a file holds either its old contents or all of its new ones, never a part.

The new contents go to a hidden temporary file in the file's own folder (``.NAME.dlir-XXXXXXXX.tmp``:
the same file system, so the final rename is atomic), are flushed to disk (``fsync``) and then take
the file's place with ``os.replace``; on any error (Ctrl-C included) the temporary file is removed
and the file is as it was.  Whole folders are staged the same way by :mod:`dlir.resultfolder`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: in the names of the hidden temporary files and folders that dlir writes before renaming them
TEMP_TAG = ".dlir-"


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """A new, empty temporary file beside ``path`` for the block to write (by its path); when the block
    succeeds it is flushed, made an ordinary file (mode 0666 less the umask: writers such as
    safetensors make theirs private) and put in place of ``path``.  The folder must exist."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{TEMP_TAG}", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        fsync_path(temp)
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write the text file ``path`` (UTF-8, line ends as given) atomically (:func:`atomic_write`)."""
    with atomic_write(path) as temp:
        temp.write_text(text, encoding="utf-8", newline="")


def fsync_path(path: Path) -> None:
    """Flush a file (or, on POSIX, a folder's entries) to disk."""
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and, on POSIX, the folders themselves."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_file() or os.name != "nt":
            fsync_path(path)
    if os.name != "nt":
        fsync_path(folder)


def _umask() -> int:
    """The process's file mode creation mask (read by setting it, then setting it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask
