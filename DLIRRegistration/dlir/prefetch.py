"""Reading a pair's images, and reading a cohort's pairs one ahead in a background thread.

``dlir register --pairs`` registers pair *i* while :class:`PairReader` reads pair *i + 1*
(SimpleITK releases the GIL while it reads and decompresses), so reading costs a cohort only
the time the registration does not hide.  At most two pairs are in memory at once: the one being
registered and the next.

Reading and writing both capture what native ITK code prints on file descriptor 2, which is one
per process (:func:`dlir.io.read_image`, :func:`dlir.outputs._write_checked`); the two must not
capture at the same time or stderr ends up pointing at a closed temporary file.  They take
:data:`STDERR_CAPTURE_LOCK` around every capture.  (While the reader captures, anything else the
process prints to stderr goes into the capture too: at most one image read long.)
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Sequence

from .io import check_label_map, read_image

if TYPE_CHECKING:
    import SimpleITK as sitk

#: held around every capture of file descriptor 2 (reading an image, writing an output file)
STDERR_CAPTURE_LOCK = threading.Lock()


@dataclass(frozen=True)
class PairImages:
    """The images of one pair as read from disk (SimpleITK, LPS mm; ``None`` where not given).

    ``read_s``: seconds the caller spent on reading (with :class:`PairReader`: the time it
    waited for the images, which is all reading costs it); ``read_ahead_s``: seconds the reading
    itself took (in the background with :class:`PairReader`, else equal to ``read_s``).
    """

    fixed: sitk.Image
    moving: sitk.Image
    moving_labels: sitk.Image | None = None
    fixed_mask: sitk.Image | None = None
    fixed_labels: sitk.Image | None = None  # checked against the fixed grid
    read_s: float = 0.0
    read_ahead_s: float = 0.0


def _read(path: str | Path, what: str) -> sitk.Image:
    with STDERR_CAPTURE_LOCK:
        return read_image(path, what)


def read_pair_images(
    fixed: str | Path,
    moving: str | Path,
    moving_labels: str | Path | None = None,
    fixed_mask: str | Path | None = None,
    fixed_labels: str | Path | None = None,
) -> PairImages:
    """Read one pair's files (what ``dlir register`` reads, in that order, with its error sentences).

    Raises :class:`dlir.errors.InputError` for a file that is missing or not an image, and for
    fixed labels on another grid than the fixed image.
    """
    t0 = time.perf_counter()
    fixed_image = _read(fixed, "fixed image")
    moving_image = _read(moving, "moving image")
    labels = None if moving_labels is None else _read(moving_labels, "moving label map")
    mask = None if fixed_mask is None else _read(fixed_mask, "fixed mask")
    reference = None
    if fixed_labels is not None:
        reference = check_label_map(_read(fixed_labels, "fixed label map"), fixed_image, "fixed label map", "fixed image")
    seconds = time.perf_counter() - t0
    return PairImages(fixed_image, moving_image, labels, mask, reference, seconds, seconds)


class PairFiles(Protocol):
    """What :class:`PairReader` needs of a pair (:class:`dlir.pairs.Pair` has it)."""

    @property
    def fixed(self) -> str | Path: ...
    @property
    def moving(self) -> str | Path: ...
    @property
    def moving_labels(self) -> str | Path | None: ...
    @property
    def fixed_mask(self) -> str | Path | None: ...
    @property
    def fixed_labels(self) -> str | Path | None: ...


class PairReader:
    """Reads ``pairs`` in order in one background thread, one pair ahead of :meth:`next`.

    Use as a context manager; call :meth:`next` once per pair, in order.  A pair that cannot be
    read raises its error (the same sentence as a plain read) from :meth:`next`, in the caller's
    thread, and the reader goes on with the next pair.  Leaving the block (also by Ctrl-C) stops
    the reader after the read in progress, so nothing runs or captures stderr afterwards.
    """

    def __init__(self, pairs: Sequence[PairFiles]) -> None:
        self._pairs = list(pairs)
        self._ready: queue.Queue[tuple[PairImages | None, BaseException | None]] = queue.Queue()
        self._go = threading.Semaphore(1)  # one token per pair the reader may read: the first now, the next at each next()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dlir-pair-reader", daemon=True)
        self._taken = 0

    def __enter__(self) -> PairReader:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._go.release()  # wakes a reader waiting for its next token
        self._thread.join()

    def _run(self) -> None:
        for pair in self._pairs:
            self._go.acquire()
            if self._stop.is_set():
                return
            try:
                outcome: tuple[PairImages | None, BaseException | None] = (
                    read_pair_images(pair.fixed, pair.moving, pair.moving_labels, pair.fixed_mask, pair.fixed_labels), None)
            except Exception as exc:  # handed to the caller, raised in its thread
                outcome = (None, exc)
            self._ready.put(outcome)

    def next(self) -> PairImages:
        """The next pair's images (``read_s`` = the seconds this call waited for them); raises its read error."""
        if self._taken >= len(self._pairs):
            raise IndexError("every pair has been read")
        t0 = time.perf_counter()
        images, error = self._ready.get()
        self._taken += 1
        self._go.release()  # the reader starts on the pair after this one
        if error is not None:
            raise error
        assert images is not None
        return replace(images, read_s=time.perf_counter() - t0)
