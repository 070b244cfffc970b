"""One registration from files to files: read the pair, register it, write the outputs and ``result.json``.

The engine side of ``dlir register`` (one pair or a cohort) and of ``dlir bench``'s measured runs.
Outputs in the folder ``out``: ``warped.nii.gz`` (moving on the fixed grid, linear),
``jacobian.nii.gz`` (det J per fixed voxel), ``transform.h5`` (the fixed -> moving displacement,
LPS mm, ITK's resampling direction), ``labels.nii.gz`` (with moving labels) and ``result.json``.

Every file is written checked (whole by its own length records, flushed to disk; else one
sentence), ``result.json`` last, into the staging folder of a :class:`~dlir.resultfolder.OutputFolder`,
which puts the complete result in place as ``out`` (atomically, under the lock ``out.lock``).
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import shutil
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import SimpleITK as sitk
from tqdm import tqdm

from .atomic import fsync_path
from .choices import FILE_OUTPUTS as OUTPUTS
from .choices import SimilarityChoice
from .errors import InputError, OutputError
from .io import captured_stderr, write_image, write_transform
from .metrics import dice
from .nifti import NIFTI1_HEADER_BYTES, gzip_trailer_matches, parse_header
from .prefetch import STDERR_CAPTURE_LOCK, PairImages, read_pair_images
from .refine import Refinement
from .register import Registration, register
from .resultfolder import JACOBIAN_FILE, LABELS_FILE, RESULT_FILE, TRANSFORM_FILE, WARPED_FILE, OutputFolder
from .stack import Stack

log = logging.getLogger(__name__)


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


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
    similarity: SimilarityChoice = "auto",
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
                               initial_alignment=initial_alignment, similarity=similarity,
                               label_interpolation=label_interpolation, show_progress=show_progress, shown=Path(out),
                               outputs=outputs)
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
    :func:`~dlir.resultfolder.staged_folder` around it.  ``shown`` names the final folder in error messages;
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
    similarity: SimilarityChoice = "auto",
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
                       device=device, refine=refine, initial_alignment=initial_alignment, similarity=similarity,
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
                fsync_path(path)
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
