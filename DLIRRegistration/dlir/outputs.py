"""One registration from files to files: read the pair, register it, write the outputs and ``result.json``.

The engine side of ``dlir register`` (one pair or a cohort) and of ``dlir bench``'s measured runs.
Outputs in the folder ``out``: ``warped.nii.gz`` (moving on the fixed grid, linear),
``jacobian.nii.gz`` (det J per fixed voxel), ``transform.h5`` (the fixed -> moving displacement,
LPS mm, ITK's resampling direction), ``labels.nii.gz`` (with moving labels) and ``result.json``.

Outputs are written safely (:class:`OutputFolder`): every file goes into a fresh hidden folder
beside ``out`` (``.NAME.dlir-XXXX.tmp``, same parent, so the final rename is atomic), is checked
and flushed to disk, and the folder is renamed to ``out`` only when all files are complete
(``result.json`` last).  So ``out`` is either absent or the complete result of one run, also
after a write error, a full disk or Ctrl-C.  ``out`` is refused when it holds or is held by an
input, is the current folder, already holds files (unless ``overwrite``, which replaces an
earlier dlir result whole and nothing else), or another run holds its lock ``out.lock``.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import SimpleITK as sitk
from tqdm import tqdm

from .errors import DLIRError, InputError
from .io import captured_stderr, write_image, write_transform
from .metrics import dice
from .nifti import NIFTI1_HEADER_BYTES, gzip_trailer_matches, parse_header
from .prefetch import STDERR_CAPTURE_LOCK, PairImages, read_pair_images
from .refine import Refinement
from .register import Registration, register
from .stack import Stack

log = logging.getLogger(__name__)

#: the files a registration writes into its output folder
WARPED_FILE = "warped.nii.gz"
JACOBIAN_FILE = "jacobian.nii.gz"
TRANSFORM_FILE = "transform.h5"
LABELS_FILE = "labels.nii.gz"
RESULT_FILE = "result.json"
OUTPUT_FILES = (WARPED_FILE, JACOBIAN_FILE, TRANSFORM_FILE, LABELS_FILE, RESULT_FILE)
#: what ``dlir register --outputs`` can ask for (default all) and the file each writes
OUTPUTS = ("warped", "labels", "jacobian", "transform")
OUTPUT_FILE = {"warped": WARPED_FILE, "labels": LABELS_FILE, "jacobian": JACOBIAN_FILE, "transform": TRANSFORM_FILE}
#: the table of a cohort (``dlir register --pairs``) beside its pair folders
SUMMARY_FILE = "summary.csv"
#: ``out`` + this suffix: the lock file of a run writing into ``out`` (beside it)
LOCK_SUFFIX = ".lock"
#: in the names of the hidden folders beside ``out`` that a run writes before renaming
TEMP_TAG = ".dlir-"

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class OutputError(DLIRError):
    """An output folder cannot be used, or its files cannot be written."""


# ----------------------------------------------------------------------------------- one pair
def register_pair(
    stack: Stack,
    fixed_path: str | Path,
    moving_path: str | Path,
    out: Path,
    *,
    moving_labels: str | Path | None = None,
    fixed_mask: str | Path | None = None,
    fixed_labels: str | Path | None = None,
    device: str = "auto",
    refine: Refinement = 0,
    initial_alignment: str | None = None,
    label_interpolation: str = "nearest",
    show_progress: bool = True,
    overwrite: bool = True,
    outputs: Collection[str] | None = None,
) -> dict[str, object]:
    """Read, register and write one pair's output files into ``out``; returns the contents of ``result.json``.

    For callers of the engine that keep files of their own in ``out`` (``dlir bench`` keeps its
    ``spec.json`` there): the outputs are staged beside ``out`` and moved in only when all are
    complete; the earlier run's output files are removed first and ``result.json`` is moved last,
    and other files are left alone.  ``overwrite=False`` refuses a folder that holds output files.
    ``dlir register`` writes whole folders instead (:class:`OutputFolder`).
    """
    inputs = {"fixed image": fixed_path, "moving image": moving_path, "moving label map": moving_labels,
              "fixed mask": fixed_mask, "fixed label map": fixed_labels}
    with OutputFolder(out, inputs, overwrite=overwrite, whole=False) as folder:
        result = register_into(folder.temp, stack, fixed_path, moving_path, moving_labels=moving_labels,
                               fixed_mask=fixed_mask, fixed_labels=fixed_labels, device=device, refine=refine,
                               initial_alignment=initial_alignment, label_interpolation=label_interpolation,
                               show_progress=show_progress, shown=Path(out), outputs=outputs)
        folder.commit()
    return result


def register_into(
    folder: Path,
    stack: Stack,
    fixed_path: str | Path,
    moving_path: str | Path,
    *,
    shown: Path | None = None,
    **options,
) -> dict[str, object]:
    """Read, register and write one pair into the existing, empty (staging) ``folder``; ``result.json`` last.

    Not atomic by itself: use :func:`register_pair`, or an :class:`OutputFolder` /
    :func:`staged_folder` around it.  ``shown`` names the final folder in error messages;
    ``options`` as for :func:`compute_pair`.
    """
    return write_pair(folder, compute_pair(stack, fixed_path, moving_path, **options), shown)


@dataclass
class ComputedPair:
    """A registered pair, not yet written: what :func:`write_pair` needs."""

    registration: Registration
    fixed_path: str | Path
    moving_path: str | Path
    wanted: tuple[str, ...]
    read_s: float
    moving_labels: sitk.Image | None
    reference: sitk.Image | None  # fixed labels, for Dice before / after


def compute_pair(
    stack: Stack,
    fixed_path: str | Path,
    moving_path: str | Path,
    *,
    moving_labels: str | Path | None = None,
    fixed_mask: str | Path | None = None,
    fixed_labels: str | Path | None = None,
    device: str = "auto",
    refine: Refinement = 0,
    initial_alignment: str | None = None,
    label_interpolation: str = "nearest",
    show_progress: bool = True,
    images: PairImages | None = None,
    outputs: Collection[str] | None = None,
) -> ComputedPair:
    """Read and register one pair, writing nothing.

    ``images``: the pair's files already read (:func:`dlir.prefetch.read_pair_images`; a cohort
    reads them ahead), used instead of reading the paths, which then only name the files.
    ``outputs``: the files to make, a subset of :data:`OUTPUTS` (default all; ``labels`` only with
    moving labels); only those are computed, except the folding fraction and std of the Jacobian,
    which ``result.json`` always reports.  Dice (with ``fixed_labels``) needs ``labels``.
    """
    wanted = check_outputs(outputs)
    if images is None:
        images = read_pair_images(fixed_path, moving_path, moving_labels, fixed_mask, fixed_labels)

    with tqdm(total=100, desc="register", unit="%", disable=not show_progress, leave=False,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}") as bar:
        def progress(step: str, fraction: float) -> None:
            bar.set_postfix_str(step)
            bar.update(round(100 * fraction) - bar.n)

        reg = register(images.fixed, images.moving, stack, moving_labels=images.moving_labels, fixed_mask=images.fixed_mask,
                       device=device, refine=refine, initial_alignment=initial_alignment,
                       label_interpolation=label_interpolation, progress=progress,
                       outputs=[name for name in wanted if name != "transform"])  # the compact transform needs no full-resolution work
    return ComputedPair(reg, fixed_path, moving_path, wanted, images.read_s, images.moving_labels, images.fixed_labels)


def write_pair(folder: Path, pair: ComputedPair, shown: Path | None = None, extra: Mapping[str, object] = {}) -> dict[str, object]:
    """Write a computed pair's outputs into the existing, empty (staging) ``folder``, ``result.json`` last; return its
    contents (``extra`` added to them).  ``shown`` names the final folder in error messages."""
    shown = folder if shown is None else shown
    reg = pair.registration
    t1 = time.perf_counter()
    if reg.warped is not None:
        warped = reg.warped
        _write_checked(folder / WARPED_FILE, shown, lambda p: write_image(warped, p))
    if "jacobian" in pair.wanted:
        _write_checked(folder / JACOBIAN_FILE, shown, lambda p: write_image(reg.jacobian, p))
    if "transform" in pair.wanted:
        _write_checked(folder / TRANSFORM_FILE, shown, lambda p: write_transform(reg.itk_transform(), p))
    if reg.warped_labels is not None:
        labels_out = reg.warped_labels
        _write_checked(folder / LABELS_FILE, shown, lambda p: write_image(labels_out, p))
    timings = {"read": pair.read_s, **reg.timings, "write": time.perf_counter() - t1}
    result: dict[str, object] = {
        **reg.summary(),
        "fixed": str(pair.fixed_path),
        "moving": str(pair.moving_path),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "total_s": round(sum(timings.values()), 4),
        **extra,
    }
    if pair.reference is not None and pair.moving_labels is not None and reg.warped_labels is not None:
        result["dice"] = _dice_before_after(pair.reference, pair.moving_labels, reg.warped_labels)
    text = json.dumps(result, indent=2) + "\n"
    _write_checked(folder / RESULT_FILE, shown, lambda p: p.write_text(text, encoding="utf-8"))
    return result


def check_outputs(outputs: Collection[str] | None) -> tuple[str, ...]:
    """The asked outputs in :data:`OUTPUTS` order (all when None); :class:`~dlir.errors.InputError` for an unknown one."""
    if outputs is None:
        return OUTPUTS
    names = {name.strip() for name in outputs if name.strip()}
    unknown = sorted(names - set(OUTPUTS))
    if unknown:
        raise InputError(f"unknown output {', '.join(repr(n) for n in unknown)}: choose from {', '.join(OUTPUTS)}")
    return tuple(name for name in OUTPUTS if name in names)


def _dice_before_after(reference: sitk.Image, moving_labels: sitk.Image, warped_labels: sitk.Image) -> dict[str, dict[str, float]]:
    """Dice per label of the fixed labels against the moving labels (resampled as is) and the warped ones."""
    identity = sitk.Resample(moving_labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    before, after = dice(reference, identity), dice(reference, warped_labels)
    return {str(k): {"before": before[k], "after": after[k]} for k in sorted(after)}


# ----------------------------------------------------------------------------------- checked writes
def _write_checked(path: Path, shown: Path, write: Callable[[Path], object]) -> None:
    """Write one output file and make sure it is whole; else :class:`OutputError` naming ``shown``.

    Native writers do not always say when a write fails: the NIfTI writer leaves an empty or
    short file on a full disk and only prints to stderr.  So what they print is captured (one
    sentence for the user instead), the file's own length records are checked, and the file is
    flushed to disk (``fsync``), which also reports errors a file system only finds then.
    """
    failure: BaseException | None = None
    with STDERR_CAPTURE_LOCK, captured_stderr() as said:  # never while a cohort's reader thread captures
        try:
            write(path)
        except (OSError, RuntimeError) as exc:
            failure = exc
    noise = [line for line in said if line]
    if noise:
        log.debug("the writer of %s printed: %s", path.name, " | ".join(noise)[:2000])
    problem = None
    if failure is None:
        problem = _incomplete(path)
        if problem is None:
            try:
                _fsync(path)
            except OSError as exc:
                failure = exc
    if failure is not None or problem is not None:
        raise OutputError(f"cannot write {path.name} into {shown} ({_write_reason(path, failure, noise, problem)}); "
                          "nothing was written there")


def _write_reason(path: Path, failure: BaseException | None, said: list[str], problem: str | None) -> str:
    """The most useful few words on why a write failed: the disk is full, no permission, or the writer's message."""
    text = " ".join(said) + " " + (str(failure) if failure is not None else "")
    code = failure.errno if isinstance(failure, OSError) else None
    if code == errno.ENOSPC or "No space left on device" in text or _disk_nearly_full(path.parent):
        return "the disk is full"
    if code in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
        return "permission denied"
    if code == errno.EROFS or "Read-only file system" in text:
        return "the file system is read-only"
    if isinstance(failure, OSError):
        return failure.strerror or str(failure)
    if problem is not None:
        return problem
    lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
    return (lines[-1] if lines else type(failure).__name__)[:200]


def _disk_nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _incomplete(path: Path) -> str | None:
    """Why a file just written is not whole (None when it is): missing, empty, or shorter than its own header says."""
    try:
        size = path.stat().st_size
    except OSError:
        return "the file was not created"
    if size == 0:
        return "the file was left empty"
    name = path.name.lower()
    try:
        if name.endswith(".nii.gz"):
            return _incomplete_nifti_gz(path)
        if name.endswith(".h5"):
            with path.open("rb") as f:
                return None if f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE else "the file has no HDF5 header"
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        return f"the file cannot be read back: {exc}"
    return None


def _incomplete_nifti_gz(path: Path) -> str | None:
    """A gzip-compressed NIfTI-1 file (as ITK writes them) is whole when its gzip trailer records its header's data length.

    Reads (inflates) the 348-byte header and the last 4 bytes only: cheap for any image size.
    """
    with gzip.open(path, "rb") as f:
        head = f.read(NIFTI1_HEADER_BYTES)
    if len(head) < NIFTI1_HEADER_BYTES:
        return "the file ends inside its header"
    header = parse_header(head)
    if header is None:
        return None  # not NIfTI-1: nothing more to check cheaply
    if not gzip_trailer_matches(path, header):
        return "the file is shorter than its header says"
    return None


def _fsync(path: Path) -> None:
    """Flush a file (or, on POSIX, a folder's entries) to disk."""
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomically(path: Path, text: str) -> None:
    """Write a text file so that ``path`` holds either its old contents or all of ``text`` (never a part)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{TEMP_TAG}", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


# ----------------------------------------------------------------------------------- the output folder
def check_output_folder(out: str | Path, inputs: Mapping[str, str | Path | None] = {}) -> Path:
    """``out`` made absolute (symbolic links resolved), or :class:`OutputError` when no run may write there.

    Refused: a folder without a name (the file-system root), an existing file, a mount point, the
    current folder or one that holds it, a folder that holds an input (its results could replace it) or lies
    inside an input folder, and a folder whose lock file would be an input.  ``inputs`` maps what
    each input is ("fixed image", ...) to its path (None: not given).
    """
    shown = str(out)
    try:
        target = Path(out).resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError) as exc:  # a loop of symbolic links, a vanished current folder
        raise OutputError(f"the output folder {shown!r} cannot be resolved ({exc})") from exc
    if not target.name:
        raise OutputError(f"the output folder {shown!r} is the root of the file system; give a new folder for the results")
    if target.exists() and not target.is_dir():
        raise OutputError(f"the output folder {shown} is an existing file; give a folder for the results")
    if target.is_dir() and os.path.ismount(target):  # its staging folder would be on another file system
        raise OutputError(f"the output folder {shown} is a mount point; give a new folder inside it")
    if target == cwd or target in cwd.parents:
        raise OutputError(f"the output folder {shown!r} is the current folder{'' if target == cwd else ' or holds it'}; "
                          "give a new folder for the results")
    lock = lock_path(target)
    for what, given in inputs.items():
        if given is None or str(given) == "":
            continue
        try:
            path = Path(given).resolve()
        except (OSError, RuntimeError):
            continue  # unreadable: the reader names the problem
        if path == target or target in path.parents:
            raise OutputError(f"the {what} {given} is inside the output folder {shown}, where the results would replace it; "
                              "choose an output folder that holds no inputs")
        if path in target.parents:
            raise OutputError(f"the output folder {shown} is inside the {what} {given}; choose a folder outside the inputs")
        if path == lock:
            raise OutputError(f"the {what} {given} is where dlir puts the lock file of the output folder {shown}; "
                              "choose another output folder")
    return target


def lock_path(out: Path) -> Path:
    """The lock file of a run writing into ``out``: ``out.lock`` beside it."""
    return out.parent / (out.name + LOCK_SUFFIX)


class OutputFolder:
    """The output folder of one run, written atomically.  Use as::

        with OutputFolder(out, inputs, overwrite=False) as folder:
            ...  # write every file into folder.temp
            folder.commit()  # only now does `out` appear (or replace an earlier dlir result whole)

    On entering: ``out`` is checked (:func:`check_output_folder`), missing parent folders are
    created, the lock ``out.lock`` is taken (refused while another run holds it; a lock left by a
    dead process is taken over), ``out`` must be absent or empty, or with ``overwrite`` an earlier
    dlir result, and an empty staging folder ``folder.temp`` is made beside ``out``.  With
    ``whole=False`` (:func:`register_pair`) other files in ``out`` are kept and only the output
    files are swapped at :meth:`commit`.  On leaving without :meth:`commit` (an error, Ctrl-C)
    the staging folder, the lock and any parent folders made for it are removed; ``out`` is as
    it was.
    """

    def __init__(self, out: str | Path, inputs: Mapping[str, str | Path | None] = {}, *, overwrite: bool = False,
                 whole: bool = True) -> None:
        self.shown = Path(out)
        self.out = check_output_folder(out, inputs)
        self.overwrite = overwrite
        self.whole = whole
        self.temp = Path()
        self.committed = False
        self._lock: _Lock | None = None
        self._made: list[Path] = []  # parent folders this run created, outermost first

    def __enter__(self) -> OutputFolder:
        with _interrupts_deferred():
            try:
                self._make_parents()
                self._lock = _Lock(lock_path(self.out), self.shown)
                self._lock.acquire()
                self._remove_stale_staging()
                self._check_replaceable()
                try:
                    self.temp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{TEMP_TAG}", suffix=".tmp", dir=self.out.parent))
                except OSError as exc:
                    raise OutputError(f"cannot write into {self.shown.parent} ({_os_reason(exc)}); "
                                      "choose an output folder where you can write") from exc
            except BaseException:
                self._clean_up()
                raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        with _interrupts_deferred():
            self._clean_up()

    def commit(self) -> None:
        """Put the staged files in place as ``out`` (Ctrl-C is held back until this is done)."""
        with _interrupts_deferred():
            try:
                _fsync_tree(self.temp)
                if not self.whole:
                    self._move_files()
                elif self.out.exists() and any(self.out.iterdir()):
                    if not self.overwrite or foreign_entry(self.out) is not None:
                        raise OutputError(f"the output folder {self.shown} got other files while dlir was running; "
                                          "the results were not put there")
                    self._replace()
                else:
                    if self.out.exists():
                        self.out.rmdir()
                    os.rename(self.temp, self.out)
                if os.name != "nt":
                    _fsync(self.out.parent)
            except OSError as exc:
                raise OutputError(f"cannot put the results in place as {self.shown} ({_os_reason(exc)}); "
                                  "nothing was written there") from exc
            self.committed = True

    def _replace(self) -> None:
        """Swap an earlier result for the new one: old aside, new in, old deleted (put back if the swap fails)."""
        aside = self.out.parent / f".{self.out.name}{TEMP_TAG}{secrets.token_hex(4)}.old"
        os.rename(self.out, aside)
        try:
            os.rename(self.temp, self.out)
        except BaseException:
            os.rename(aside, self.out)
            raise
        shutil.rmtree(aside, ignore_errors=True)

    def _move_files(self) -> None:
        """``whole=False``: the earlier output files out (result.json first), the new ones in (result.json last)."""
        if not self.out.exists():
            os.rename(self.temp, self.out)
            return
        for name in (RESULT_FILE, *OUTPUT_FILES):
            with contextlib.suppress(FileNotFoundError):
                (self.out / name).unlink()
        staged = sorted(p.name for p in self.temp.iterdir())
        for name in sorted(staged, key=lambda n: n == RESULT_FILE):
            os.replace(self.temp / name, self.out / name)

    def _remove_stale_staging(self) -> None:
        """Staging folders of earlier runs into ``out`` that were killed (with the lock held, no live run owns them)."""
        pattern = re.compile(re.escape(f".{self.out.name}{TEMP_TAG}") + r"[a-z0-9_]{8}\.(tmp|old)")
        for entry in os.scandir(self.out.parent):
            if pattern.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)

    def _make_parents(self) -> None:
        missing = [p for p in reversed(self.out.parents) if not p.exists()]
        for folder in missing:
            try:
                folder.mkdir()
            except FileExistsError:
                if not folder.is_dir():
                    raise OutputError(f"cannot create the output folder {self.shown}: {folder} is a file") from None
                continue
            except OSError as exc:
                raise OutputError(f"cannot create the folder {folder} for the output folder {self.shown} ({_os_reason(exc)})") from exc
            self._made.append(folder)

    def _check_replaceable(self) -> None:
        if not self.out.is_dir() or not any(self.out.iterdir()):
            return
        if not self.whole:
            earlier = sorted(name for name in OUTPUT_FILES if (self.out / name).exists())
            if earlier and not self.overwrite:
                raise OutputError(f"the output folder {self.shown} already holds {', '.join(earlier)} of an earlier run; "
                                  "choose another folder")
            return
        if not self.overwrite:
            raise OutputError(f"the output folder {self.shown} already holds files; give --overwrite to replace it whole, "
                              "or choose another folder")
        foreign = foreign_entry(self.out)
        if foreign is not None:
            raise OutputError(f"the output folder {self.shown} holds {foreign}, which dlir did not write; --overwrite only "
                              "replaces an earlier dlir result: choose another folder")

    def _clean_up(self) -> None:
        if self.temp != Path() and self.temp.exists():
            shutil.rmtree(self.temp, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if not self.committed:
            for folder in reversed(self._made):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when still empty
            self._made = []


def foreign_entry(folder: Path) -> str | None:
    """What in ``folder`` shows it is not an earlier dlir result (None when it is one).

    A dlir result holds ``result.json`` (one pair) or ``summary.csv`` (a cohort), the output
    files, and for a cohort pair folders holding output files only; no links, nothing else.
    """
    entries = list(os.scandir(folder))
    names = {e.name for e in entries}
    if RESULT_FILE not in names and SUMMARY_FILE not in names:
        return f"no {RESULT_FILE} or {SUMMARY_FILE}"
    for entry in entries:
        if entry.is_symlink():
            return f"the link {entry.name!r}"
        if entry.is_file() and entry.name in (*OUTPUT_FILES, SUMMARY_FILE):
            continue
        if not entry.is_dir():
            return repr(entry.name)
        for sub in os.scandir(entry.path):
            if sub.is_symlink() or not sub.is_file() or sub.name not in OUTPUT_FILES:
                return repr(f"{entry.name}/{sub.name}")
    return None


@contextlib.contextmanager
def staged_folder(final: Path, shown: Path | None = None) -> Iterator[Path]:
    """An empty staging folder beside ``final`` (which must not exist), renamed to ``final`` when the block succeeds.

    For the pair folders inside a cohort's own staging folder; on any exception (Ctrl-C
    included) the staging folder is removed and ``final`` never appears.
    """
    shown = final if shown is None else shown
    try:
        temp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TEMP_TAG}", suffix=".tmp", dir=final.parent))
    except OSError as exc:
        raise OutputError(f"cannot write {shown} ({_os_reason(exc)})") from exc
    try:
        yield temp
        with _interrupts_deferred():
            try:
                _fsync_tree(temp)
                os.rename(temp, final)
            except OSError as exc:
                raise OutputError(f"cannot put the results in place as {shown} ({_os_reason(exc)})") from exc
    finally:
        with _interrupts_deferred():
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and, on POSIX, the folders themselves."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_file() or os.name != "nt":
            _fsync(path)
    if os.name != "nt":
        _fsync(folder)


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the disk is full"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    return exc.strerror or str(exc)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) for a few quick file operations that must not stop half-way.

    A Ctrl-C received meanwhile is delivered (as ``KeyboardInterrupt``) when the block ends.
    Outside the main thread (where Python cannot handle signals) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and previous is not signal.SIG_IGN:
            if callable(previous):
                previous(signal.SIGINT, None)
            else:
                raise KeyboardInterrupt


class _Lock:
    """An exclusive lock on an output folder: the file ``out.lock`` holding the owner's pid, locked by the OS.

    The OS lock (``flock``; ``msvcrt.locking`` on Windows) ends with its process, so a lock file
    left by a killed run is simply taken over.  A file of that name that is not a dlir lock is
    never written to.
    """

    def __init__(self, path: Path, shown_out: Path) -> None:
        self.path = path
        self.shown_out = shown_out
        self.fd: int | None = None

    def acquire(self) -> None:
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                created = True
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:
                    continue  # removed by its owner just now: try again
                except OSError as exc:
                    raise OutputError(f"cannot open the lock file {self.path} ({_os_reason(exc)})") from exc
                created = False
            except OSError as exc:
                raise OutputError(f"cannot write into {self.path.parent} ({_os_reason(exc)}); "
                                  "choose an output folder where you can write") from exc
            try:
                if not created and not os.read(fd, 64).startswith(b"dlir lock") and os.fstat(fd).st_size > 0:
                    raise OutputError(f"{self.path} exists and is not a dlir lock file; move it away or choose another output folder")
                if not _os_lock(fd):
                    raise OutputError(f"another dlir run is writing into {self.shown_out} (it holds {self.path}); "
                                      "wait for it to finish or choose another output folder")
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if not same:  # its owner removed it between our open and our lock: take the new one
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, f"dlir lock pid {os.getpid()}\n".encode())
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                if created:
                    with contextlib.suppress(OSError):
                        os.unlink(self.path)
                raise
            self.fd = fd
            return
        raise OutputError(f"cannot take the lock {self.path} of the output folder {self.shown_out}; try again")

    def release(self) -> None:
        if self.fd is None:
            return
        if os.name == "nt":  # an open file cannot be removed there
            os.close(self.fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        else:  # removed while still locked, so that nobody locks a file on its way out
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
        self.fd = None


def _os_lock(fd: int) -> bool:
    """Lock an open file exclusively without waiting; False when another process holds it."""
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
