"""A cohort: many pairs registered with one stack into one output folder, ``OUT/ID`` per pair and
``OUT/summary.csv``.

The engine side of ``dlir register --pairs``, for any caller (the command line, a script, a Slicer
module): pairs in (:class:`dlir.pairs.Pair`, e.g. from :func:`dlir.pairs.read_pairs`), one row per
pair out, progress through a callback.  Each pair folder holds what :mod:`dlir.outputs` writes
for one pair; times are in seconds.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from . import outputs as pair_files  # compute_pair and write_pair are looked up when called (tests replace them)
from .atomic import write_text_atomically
from .choices import SimilarityChoice
from .errors import DLIRError, OutputError
from .outputs import ComputedPair
from .pairs import Pair
from .prefetch import PairReader
from .refine import Refinement
from .resultfolder import SUMMARY_FILE, OutputFolder, staged_folder
from .stack import load_stack

log = logging.getLogger(__name__)

#: the columns of ``summary.csv`` and the keys of a pair's row: ``status`` is ``ok`` or ``error: <sentence>``;
#: ``total_s``, ``folding_fraction`` and ``jacobian_std`` as in the pair's ``result.json``; ``cohort_s`` its
#: share of the cohort's wall time (see :func:`register_cohort`); empty where a pair has no value
SUMMARY_COLUMNS = ("id", "status", "total_s", "cohort_s", "folding_fraction", "jacobian_std")

#: ``progress(pairs done, pairs in all)``, called after each pair's registration
CohortProgress = Callable[[int, int], None]

Row = dict[str, object]


def register_cohort(
    pairs: Sequence[Pair],
    stack_path: Path,
    out: Path,
    *,
    source: Path | None = None,
    overwrite: bool = False,
    device: str = "auto",
    refine: Refinement = 0,
    initial_alignment: str | None = None,
    similarity: SimilarityChoice = "auto",
    label_interpolation: str = "nearest",
    outputs: Collection[str] | None = None,
    progress: CohortProgress | None = None,
) -> list[Row]:
    """Register every pair with the stack ``stack_path`` into ``out/ID``; one row per pair (:data:`SUMMARY_COLUMNS`).

    The cohort is staged and put in place as a whole (``out`` is absent or complete), each pair
    folder atomically inside it, ``summary.csv`` with the rows last.  A pair that fails (a refused
    input, or an unexpected error) is recorded in its row with its sentence and the others go on.
    The stack is loaded once; a background thread reads the next pair while the current one is
    registered (:class:`dlir.prefetch.PairReader`), so a pair's ``read`` time is only what was not
    hidden, and another writes a pair's outputs while the next one is registered (one pair at a
    time).  ``cohort_s`` (row, ``result.json``): the pair's share of the cohort's wall time, i.e.
    the time from the end of the previous pair's registration to the end of its own (waiting for
    its read and for the previous pair's write included; the last pair also gets the final write).

    ``source``: the CSV or folder the pairs were listed in, refused as an output like the pairs'
    files.  ``device``, ``refine``, ``initial_alignment``, ``similarity``, ``label_interpolation`` and ``outputs``
    are those of :func:`dlir.outputs.compute_pair`.  Raises a :class:`~dlir.errors.DLIRError` (one
    sentence, nothing written) when ``out`` cannot be used, the stack cannot be loaded, or
    ``summary.csv`` cannot be written.
    """
    inputs = _cohort_inputs(pairs, stack_path, source)
    options = dict(device=device, refine=refine, initial_alignment=initial_alignment, similarity=similarity,
                   label_interpolation=label_interpolation, outputs=outputs)
    rows: list[Row] = []

    def write(pair: Pair, computed: ComputedPair, extra: dict[str, object]) -> dict[str, object]:
        with staged_folder(folder.temp / pair.id, shown=out / pair.id) as temp:
            return pair_files.write_pair(temp, computed, shown=out / pair.id, extra=extra)

    with OutputFolder(out, inputs, overwrite=overwrite) as folder, PairReader(pairs) as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="dlir-writer") as writes:
        stack = load_stack(stack_path)  # while the first pair is read
        pending: tuple[Row, Future] | None = None  # the pair being written
        mark = time.perf_counter()
        for done, pair in enumerate(pairs, start=1):
            row: Row = dict.fromkeys(SUMMARY_COLUMNS, "") | {"id": pair.id}
            rows.append(row)
            computed: list[ComputedPair] = []
            _recorded(row, lambda: computed.append(pair_files.compute_pair(
                stack, pair.fixed, pair.moving, moving_labels=pair.moving_labels, fixed_mask=pair.fixed_mask,
                fixed_labels=pair.fixed_labels, show_progress=False, images=reader.next(), **options)))
            if pending is not None:  # one write at a time: the previous pair's, while this one was registered
                _recorded(pending[0], pending[1].result)
            now = time.perf_counter()
            row["cohort_s"] = round(now - mark, 4)
            mark = now
            pending = (row, writes.submit(write, pair, computed[0], {"cohort_s": row["cohort_s"]})) if computed else None
            if progress is not None:
                progress(done, len(pairs))
        if pending is not None:
            _recorded(pending[0], pending[1].result)
            pending[0]["cohort_s"] = round(float(pending[0]["cohort_s"]) + time.perf_counter() - mark, 4)
        _write_summary(folder.temp, out, rows)
        folder.commit()
    return rows


def _cohort_inputs(pairs: Sequence[Pair], stack_path: Path, source: Path | None) -> dict[str, str | Path | None]:
    """Every file the cohort reads, by what it is (``"fixed of pair ID"``, ``"stack"``, ...): refused as outputs."""
    inputs: dict[str, str | Path | None] = {} if source is None else {"pairs file" if source.is_file() else "pairs folder": source}
    inputs["stack"] = stack_path
    for pair in pairs:
        for what in ("fixed", "moving", "moving_labels", "fixed_mask", "fixed_labels"):
            inputs[f"{what.replace('_', ' ')} of pair {pair.id}"] = getattr(pair, what)
    return inputs


def _write_summary(temp: Path, out: Path, rows: Sequence[Row]) -> None:
    """``summary.csv`` of ``rows`` into the staged cohort folder ``temp`` (shown as ``out`` in the error sentence)."""
    try:
        write_text_atomically(temp / SUMMARY_FILE, _summary_csv(rows))
    except OSError as exc:
        raise OutputError(f"cannot write {SUMMARY_FILE} into {out} ({exc.strerror or exc}); nothing was written there") from exc


def _summary_csv(rows: Sequence[Row]) -> str:
    """The text of ``summary.csv``: a header of :data:`SUMMARY_COLUMNS`, one line per row (``\\n`` line ends)."""
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return table.getvalue()


def _recorded(row: Row, work: Callable[[], dict[str, object] | None]) -> None:
    """Run ``work`` for the pair of ``row``: its result fills the row, an error becomes its status."""
    try:
        result = work()
        if result is not None:
            row.update(status="ok", total_s=result["total_s"], folding_fraction=result["folding_fraction"],
                       jacobian_std=result["jacobian_std"])
    except DLIRError as exc:
        row["status"] = f"error: {exc}"
    except Exception as exc:  # a bug or an unforeseen input: recorded (on one line), and the cohort goes on
        log.info("pair %s failed", row["id"], exc_info=True)  # the traceback with -v
        row["status"] = f"error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
