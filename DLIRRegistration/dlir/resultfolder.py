"""The output folder of a run, written atomically and locked: ``out`` is absent or one complete result.

Every file goes into a fresh hidden folder beside ``out`` (``.NAME.dlir-XXXXXXXX.tmp``, same parent, so
the final rename is atomic), is flushed to disk, and the folder is renamed to ``out`` only when all
files are complete (:class:`OutputFolder`; :func:`staged_folder` for the pair folders of a cohort).
So ``out`` is either absent or the complete result of one run, also after a write error, a full
disk or Ctrl-C.  ``out`` is refused when it holds or is held by an input, is the current folder,
already holds files (unless ``overwrite``, which replaces an earlier dlir result whole and nothing
else), or another run holds its lock ``out.lock``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from .atomic import TEMP_TAG, fsync_path, fsync_tree
from .errors import OutputError

#: the files a registration writes into its output folder (what a dlir result may hold)
WARPED_FILE = "warped.nii.gz"
JACOBIAN_FILE = "jacobian.nii.gz"
TRANSFORM_FILE = "transform.h5"
LABELS_FILE = "labels.nii.gz"
RESULT_FILE = "result.json"
OUTPUT_FILES = (WARPED_FILE, JACOBIAN_FILE, TRANSFORM_FILE, LABELS_FILE, RESULT_FILE)
#: the table of a cohort (``dlir register --pairs``) beside its pair folders
SUMMARY_FILE = "summary.csv"
#: ``out`` + this suffix: the lock file of a run writing into ``out`` (beside it)
LOCK_SUFFIX = ".lock"


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
    ``whole=False`` (:func:`dlir.outputs.register_pair`) other files in ``out`` are kept and only the output
    files are swapped at :meth:`commit`.  On leaving without :meth:`commit` (an error, Ctrl-C)
    the staging folder, the lock and any parent folders made for it are removed; ``out`` is as
    it was.  From :meth:`commit` to the end of the block Ctrl-C is ignored: the run has succeeded.
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
        self._after_commit = contextlib.ExitStack()  # Ctrl-C ignored from the commit to the end of the block

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
        with self._after_commit, _interrupts_deferred():
            self._clean_up()

    def commit(self) -> None:
        """Put the staged files in place as ``out``; Ctrl-C is ignored from here to the end of the block.

        A Ctrl-C could not stop the commit half-way, and once the files are in place the run has
        succeeded: a script trusting the exit code must not throw the complete result away.
        """
        self._after_commit.enter_context(interrupts_ignored())
        try:
            fsync_tree(self.temp)
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
                fsync_path(self.out.parent)
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
                fsync_tree(temp)
                os.rename(temp, final)
            except OSError as exc:
                raise OutputError(f"cannot put the results in place as {shown} ({_os_reason(exc)})") from exc
    finally:
        with _interrupts_deferred():
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the disk is full"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    return exc.strerror or str(exc)


@contextlib.contextmanager
def interrupts_ignored() -> Iterator[None]:
    """Ignore Ctrl-C (SIGINT) inside the block: for what follows a run's success (its result in place).

    Outside the main thread (where Python cannot handle signals) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
