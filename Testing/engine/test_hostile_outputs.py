"""Hostile use of `dlir register`'s outputs: the output folder is absent or complete from one run, inputs are never touched.

The contract, asserted in every case: exit code 2 with exactly one line on stderr starting with
``error: `` that names the problem (130 and the one line ``interrupted`` for Ctrl-C), every input
byte for byte as it was (SHA-256), and ``--out`` either absent (as it was) or the complete
result of one run (every expected file, ``result.json`` of that run), with no staging folder
(``.NAME.dlir-*``) and no lock (``NAME.lock``) left beside it.  A refusal that needs no image
comes before anything is read or registered; a Ctrl-C once the result is in place exits 0 (issue 26).

Most cases call ``dlir.cli.main`` in this process (fast; file-descriptor level capture, so native
writers' messages count as lines too); Ctrl-C, two processes at once and a real full disk run
``python -m dlir`` as a user does.  Ctrl-C is sent at moments made deterministic by a
``sitecustomize`` hook that pauses the child at a named import or call and says so in a file.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

import dlir.outputs
from dlir.atomic import TEMP_TAG
from dlir.cli import main
from dlir.resultfolder import LOCK_SUFFIX, OutputFolder

RunDlir = Callable[..., subprocess.CompletedProcess]
OUTPUTS = ("warped.nii.gz", "jacobian.nii.gz", "transform.h5", "result.json")
LABELS = "labels.nii.gz"
SRC = Path(__file__).resolve().parents[2] / "DLIRRegistration"


# ----------------------------------------------------------------------------------- helpers
def smooth_volume(seed: int, shape: tuple[int, int, int] = (16, 16, 16)) -> sitk.Image:
    arr = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 1.5).astype(np.float32)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin(tuple(-0.5 * (n - 1) * 2.0 for n in image.GetSize()))
    return image


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder``, by name and SHA-256: catches changed, deleted and new files."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Staging folders and lock files that a run left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if TEMP_TAG in p.name or p.name.endswith(LOCK_SUFFIX))


def assert_refused(code: int, lines: list[str], *words: str) -> None:
    assert code == 2, f"exit code {code}; stderr: {lines}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {lines}"
    assert lines[0].startswith("error: "), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def assert_complete(out: Path, moving: Path, labels: bool) -> dict:
    """``out`` holds exactly the files of one run of ``moving`` (all readable), and nothing was left beside it."""
    expected = set(OUTPUTS) | ({LABELS} if labels else set())
    assert {p.name for p in out.iterdir()} == expected
    report = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert report["stack"] == "fresh-small" and report["moving"] == str(moving), report
    for name in expected - {"result.json", "transform.h5"}:
        assert sitk.ReadImage(str(out / name)).GetSize() == (16, 16, 16), name
    assert sitk.ReadTransform(str(out / "transform.h5")) is not None
    assert leftovers(out.parent) == []
    return report


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture
def run_main(capfd: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, list[str], str]]:
    """``dlir ARGS`` in this process: (exit code, non-empty stderr lines, stdout); stderr captured at fd 2."""
    def run(*args: object) -> tuple[int, list[str], str]:
        capfd.readouterr()
        code = main([str(a) for a in args])
        out, err = capfd.readouterr()
        return code, lines_of(err), out

    return run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, fresh_stack_file: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile-outputs-inputs")
    paths = {"fixed": root / "fixed.nii.gz", "moving": root / "moving.nii.gz", "moving2": root / "moving2.nii.gz",
             "labels": root / "labels.nii.gz", "stack": root / "fresh-small.safetensors"}
    moving = smooth_volume(1)
    sitk.WriteImage(smooth_volume(0), str(paths["fixed"]))
    sitk.WriteImage(moving, str(paths["moving"]))
    sitk.WriteImage(smooth_volume(2), str(paths["moving2"]))
    sitk.WriteImage(sitk.Cast(moving > float(np.median(sitk.GetArrayViewFromImage(moving))), sitk.sitkUInt8), str(paths["labels"]))
    shutil.copyfile(fresh_stack_file, paths["stack"])
    return paths


@pytest.fixture
def untouched(inputs: dict[str, Path]):
    """Asserts after the test that no input changed (and nothing appeared beside the inputs)."""
    root = inputs["fixed"].parent
    before = snapshot(root)
    yield
    assert snapshot(root) == before, "an input was modified, deleted or added to"


def register_args(inputs: dict[str, Path], out: Path, *extra: object, moving: str = "moving") -> list[object]:
    return ["register", inputs["fixed"], inputs[moving], "--stack", inputs["stack"], "--out", out, "--device", "cpu", *extra]


# ----------------------------------------------------------------------------------- earlier results, --overwrite
def test_a_run_writes_one_complete_folder_and_nothing_beside_it(inputs, tmp_path, run_main, untouched) -> None:
    out = tmp_path / "deep" / "er" / "out"
    code, err, stdout = run_main(*register_args(inputs, out, "--moving-labels", inputs["labels"]))
    assert code == 0 and err == [], err
    assert_complete(out, inputs["moving"], labels=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["deep", "er", "out", *(p.name for p in out.iterdir())])


def test_rerun_into_an_earlier_result_is_refused_and_leaves_it_as_it_was(inputs, tmp_path, run_main, untouched) -> None:
    out = tmp_path / "out"
    assert run_main(*register_args(inputs, out, "--moving-labels", inputs["labels"]))[0] == 0
    before = snapshot(out)
    code, err, _ = run_main(*register_args(inputs, out, moving="moving2"))
    assert_refused(code, err, str(out), "already holds files", "--overwrite")
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_the_folder_whole(inputs, tmp_path, run_main, untouched) -> None:
    """The earlier run had labels, the new one has none: no old labels.nii.gz may survive beside the new result."""
    out = tmp_path / "out"
    assert run_main(*register_args(inputs, out, "--moving-labels", inputs["labels"]))[0] == 0
    code, err, _ = run_main(*register_args(inputs, out, "--overwrite", moving="moving2"))
    assert code == 0 and err == [], err
    assert_complete(out, inputs["moving2"], labels=False)


def test_overwrite_replaces_a_cohort_whole(inputs, tmp_path, run_main, untouched) -> None:
    table = tmp_path / "pairs.csv"
    table.write_text(f"id,fixed,moving\na,{inputs['fixed']},{inputs['moving']}\nb,{inputs['fixed']},{inputs['moving2']}\n",
                     encoding="utf-8")
    out = tmp_path / "cohort"
    assert run_main("register", "--pairs", table, "--stack", inputs["stack"], "--out", out, "--device", "cpu")[0] == 0
    assert_refused(*run_main("register", "--pairs", table, "--stack", inputs["stack"], "--out", out)[:2], "--overwrite")
    table.write_text(f"id,fixed,moving\nc,{inputs['fixed']},{inputs['moving']}\n", encoding="utf-8")
    code, err, _ = run_main("register", "--pairs", table, "--stack", inputs["stack"], "--out", out, "--device", "cpu", "--overwrite")
    assert code == 0 and err == [], err
    assert sorted(p.name for p in out.iterdir()) == ["c", "summary.csv"]
    assert_complete(out / "c", inputs["moving"], labels=False)
    assert leftovers(tmp_path) == []


FOREIGN = {
    "a folder of notes": {"notes.txt": "mine"},
    "notes beside a result": {"result.json": "{}", "warped.nii.gz": "x", "notes.txt": "mine"},
    "output names but no result.json": {"warped.nii.gz": "a user's own image"},
    "a subfolder of other files": {"result.json": "{}", "sub/data.csv": "1,2"},
}


@pytest.mark.parametrize("files", FOREIGN.values(), ids=FOREIGN.keys())
def test_overwrite_never_replaces_a_folder_dlir_did_not_write(inputs, tmp_path, run_main, untouched, files) -> None:
    """``--out ~ --overwrite`` must not delete a home folder: only an earlier dlir result is replaced."""
    out = tmp_path / "mine"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text, encoding="utf-8")
    before = snapshot(out)
    code, err, _ = run_main(*register_args(inputs, out, "--overwrite"))
    assert_refused(code, err, str(out), "dlir did not write", "choose another folder")
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------- outputs over inputs
@pytest.mark.parametrize("role, flag, name", [
    ("fixed", None, "warped.nii.gz"),
    ("moving", None, "warped.nii.gz"),
    ("labels", "--moving-labels", "labels.nii.gz"),
    ("fixed", "--fixed-mask", "jacobian.nii.gz"),
    ("stack", "--stack", "transform.h5"),
])
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_an_input_inside_out_named_like_an_output_is_never_written_over(
    inputs, tmp_path, run_main, role: str, flag: str | None, name: str, overwrite: bool
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    placed = out / name
    shutil.copyfile(inputs[role], placed)
    (out / "result.json").write_text("{}", encoding="utf-8")  # an earlier result, so that --overwrite would apply
    before = snapshot(out)
    args = {"fixed": inputs["fixed"], "moving": inputs["moving"], "--stack": inputs["stack"]}
    args[flag or role] = placed
    code, err, _ = run_main("register", args["fixed"], args["moving"], "--stack", args["--stack"], "--out", out, "--device", "cpu",
                            *([flag, placed] if flag and flag != "--stack" else []), *(["--overwrite"] if overwrite else []))
    assert_refused(code, err, str(placed), "inside the output folder")
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_out_inside_an_input_folder_is_refused(inputs, tmp_path, run_main) -> None:
    pair = tmp_path / "pair1"
    pair.mkdir()
    shutil.copyfile(inputs["fixed"], pair / "fixed.nii.gz")
    shutil.copyfile(inputs["moving"], pair / "moving.nii.gz")
    before = snapshot(tmp_path)
    code, err, _ = run_main("register", "--pairs", pair, "--stack", inputs["stack"], "--out", pair / "results", "--device", "cpu")
    assert_refused(code, err, "is inside the pairs folder")
    assert snapshot(tmp_path) == before and not (pair / "results").exists() and leftovers(pair) == []


@pytest.mark.parametrize("out", ["", " ", ".", "./", "..", "../.."], ids=["empty", "blank", "dot", "dot-slash", "parent", "grandparent"])
def test_out_empty_or_the_current_folder_is_refused(inputs, tmp_path, run_main, monkeypatch, untouched, out: str) -> None:
    cwd = tmp_path / "a" / "b" / "work"
    cwd.mkdir(parents=True)
    (cwd / "my-notes.txt").write_text("mine", encoding="utf-8")
    monkeypatch.chdir(cwd)
    before = snapshot(tmp_path)
    code, err, _ = run_main(*register_args(inputs, out, "--overwrite"))
    assert_refused(code, err, "--out is empty" if not out.strip() else "current folder")
    assert snapshot(tmp_path) == before
    assert leftovers(cwd) == [] and leftovers(cwd.parent) == []


# ----------------------------------------------------------------------------------- --pairs ids
@pytest.mark.parametrize("pair_id", ["../x", "ABSOLUTE", "..", "a/b", "a\\b", "C:x", "summary.csv", "tab\there"])
def test_pairs_ids_that_lead_outside_out_are_refused(inputs, tmp_path, run_main, untouched, pair_id: str) -> None:
    if pair_id == "ABSOLUTE":
        pair_id = str(tmp_path / "elsewhere")
    table = tmp_path / "pairs.csv"
    table.write_text(f'id,fixed,moving\nok,{inputs["fixed"]},{inputs["moving"]}\n"{pair_id}",{inputs["fixed"]},{inputs["moving"]}\n',
                     encoding="utf-8")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err, _ = run_main("register", "--pairs", table, "--stack", inputs["stack"], "--out", tmp_path / "out" / "cohort")
    assert_refused(code, err, "row 3", repr(pair_id), "plain name")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ----------------------------------------------------------------------------------- the lock
def test_a_second_run_is_refused_while_another_holds_the_folder(inputs, tmp_path, run_main, untouched) -> None:
    out = tmp_path / "out"
    with OutputFolder(out):  # another run, in the middle of its work
        code, err, _ = run_main(*register_args(inputs, out, "--overwrite"))
        assert_refused(code, err, "another dlir run is writing into", str(out))
        assert (tmp_path / "out.lock").is_file()
    assert not out.exists() and leftovers(tmp_path) == []
    assert run_main(*register_args(inputs, out))[0] == 0  # free again
    assert_complete(out, inputs["moving"], labels=False)


def test_a_lock_left_by_a_killed_run_is_taken_over(inputs, tmp_path, run_main, untouched) -> None:
    (tmp_path / "out.lock").write_text("dlir lock pid 999999999\n", encoding="utf-8")
    code, err, _ = run_main(*register_args(inputs, tmp_path / "out"))
    assert code == 0 and err == [], err
    assert_complete(tmp_path / "out", inputs["moving"], labels=False)


def test_a_user_file_named_like_the_lock_is_never_touched(inputs, tmp_path, run_main, untouched) -> None:
    (tmp_path / "out.lock").write_text("my padlock inventory\n", encoding="utf-8")
    code, err, _ = run_main(*register_args(inputs, tmp_path / "out"))
    assert_refused(code, err, "out.lock", "not a dlir lock file")
    assert (tmp_path / "out.lock").read_text(encoding="utf-8") == "my padlock inventory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.lock"]


# ----------------------------------------------------------------------------------- write errors
def _truncated_nifti(image: sitk.Image, path: Path) -> Path:
    """What the NIfTI writer leaves on a full disk: a short file and no error."""
    sitk.WriteImage(image, str(path), useCompression=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _failing_transform(transform: sitk.Transform, path: Path) -> Path:
    """What the HDF5 writer does on a full disk: part of a file, then an error."""
    Path(path).write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(4096))
    raise RuntimeError("Exception thrown in SimpleITK WriteTransform: itkHDF5TransformIO.cxx:462:\nITK ERROR: H5Dwrite failed "
                       "(errno = 28, error message = 'No space left on device')")


def _failing_fsync(fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


FULL_DISK = {
    "short NIfTI without an error": ("write_image", _truncated_nifti, "shorter than its header says"),
    "HDF5 error half-way": ("write_transform", _failing_transform, "the disk is full"),
    "error only at fsync": ("os.fsync", _failing_fsync, "the disk is full"),
}


@pytest.mark.parametrize("target, fake, words", FULL_DISK.values(), ids=FULL_DISK.keys())
@pytest.mark.parametrize("earlier", [False, True], ids=["new", "over-earlier"])
def test_a_full_disk_leaves_nothing_half_written(inputs, tmp_path, run_main, monkeypatch, untouched, target, fake, words, earlier) -> None:
    """Simulated in this process: the writer fails as SimpleITK does on a full disk; an earlier result survives intact."""
    out = tmp_path / "out"
    if earlier:
        assert run_main(*register_args(inputs, out, "--moving-labels", inputs["labels"]))[0] == 0
    before = snapshot(tmp_path)
    if target == "os.fsync":
        monkeypatch.setattr(os, "fsync", fake)
    else:
        monkeypatch.setattr(dlir.outputs, target, fake)
    code, err, _ = run_main(*register_args(inputs, out, "--overwrite", moving="moving2"))
    assert_refused(code, err, "cannot write", str(out), words)
    assert snapshot(tmp_path) == before
    assert leftovers(tmp_path) == []


def test_an_output_folder_where_nobody_may_write_is_refused(inputs, tmp_path, run_main, monkeypatch, untouched) -> None:
    """Simulated (root may write anywhere): making the staging folder is refused by the system."""
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    code, err, _ = run_main(*register_args(inputs, tmp_path / "new" / "out"))
    assert_refused(code, err, "permission denied", str(tmp_path / "new"))
    assert list(tmp_path.iterdir()) == []  # the parent made for it is gone too


@pytest.fixture
def read_only_folder(tmp_path: Path):
    """A folder nobody may write into: a read-only folder, or a read-only tmpfs for root; else a skip."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("running as root without permission to mount a read-only file system")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_read_only_out_parent_is_one_sentence(inputs, read_only_folder, run_main, untouched) -> None:
    code, err, _ = run_main(*register_args(inputs, read_only_folder / "out"))
    assert_refused(code, err, str(read_only_folder))
    assert any(word in err[0] for word in ("permission denied", "read-only"))
    assert list(read_only_folder.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 40 kB tmpfs: room for the staging folder and a little more, not for the outputs (root only)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("no permission to mount a small file system")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_real_full_disk_is_one_sentence_and_nothing_left(inputs, tiny_disk, run_dlir, run_main, untouched) -> None:
    result = run_dlir(*register_args(inputs, tiny_disk / "out"), env={"PYTHONPATH": str(SRC)})
    assert_refused(result.returncode, lines_of(result.stderr), "cannot write", "the disk is full")
    assert list(tiny_disk.iterdir()) == []
    # the mount point itself: its staging folder would be on another file system, so it is refused up front
    assert_refused(*run_main(*register_args(inputs, tiny_disk))[:2], "is a mount point")
    assert list(tiny_disk.iterdir()) == [] and leftovers(tiny_disk.parent) == []


# ----------------------------------------------------------------------------------- --pairs rows that fail
@pytest.mark.parametrize("phase", ["compute_pair", "write_pair"])
def test_a_crashing_row_is_recorded_and_the_cohort_goes_on(inputs, tmp_path, run_main, monkeypatch, untouched, phase) -> None:
    """A bug while registering a pair, or while writing it in the background, is recorded on that pair's row."""
    real_compute, real_write = dlir.outputs.compute_pair, dlir.outputs.write_pair

    def crash(moving) -> None:
        if Path(moving).name == "moving2.nii.gz":
            raise ZeroDivisionError("a bug\non this row")  # a message of two lines is recorded on one

    def compute_pair(stack, fixed, moving, **kwargs):
        if phase == "compute_pair":
            crash(moving)
        return real_compute(stack, fixed, moving, **kwargs)

    def write_pair(folder, computed, shown=None, extra={}):
        if phase == "write_pair":
            crash(computed.moving_path)
        return real_write(folder, computed, shown, extra)

    monkeypatch.setattr(dlir.outputs, "compute_pair", compute_pair)
    monkeypatch.setattr(dlir.outputs, "write_pair", write_pair)
    table = tmp_path / "pairs.csv"
    table.write_text(f"id,fixed,moving\nfirst,{inputs['fixed']},{inputs['moving']}\ncrash,{inputs['fixed']},{inputs['moving2']}\n"
                     f"missing,{inputs['fixed']},{tmp_path / 'nope.nii.gz'}\nlast,{inputs['fixed']},{inputs['moving']}\n",
                     encoding="utf-8")
    out = tmp_path / "out"
    code, err, stdout = run_main("register", "--pairs", table, "--stack", inputs["stack"], "--out", out, "--device", "cpu")
    assert code == 1, err
    assert "2 of 4 pairs registered" in stdout
    with (out / "summary.csv").open(newline="", encoding="utf-8") as f:
        rows = {row["id"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["first", "crash", "missing", "last"]
    assert rows["first"]["status"] == rows["last"]["status"] == "ok"
    assert rows["crash"]["status"] == "error: unexpected ZeroDivisionError: a bug on this row"
    assert rows["missing"]["status"].startswith("error: the moving image") and "does not exist" in rows["missing"]["status"]
    assert sorted(p.name for p in out.iterdir()) == ["first", "last", "summary.csv"]  # no folder for a failed row
    for name in ("first", "last"):
        assert_complete(out / name, inputs["moving"], labels=False)
    assert [line.split(":")[0].strip() for line in err] == ["crash", "missing"]
    assert leftovers(tmp_path) == [] and "Traceback" not in "".join(err)


def test_fixed_labels_on_another_grid_are_refused_before_registering(inputs, tmp_path, run_main, untouched) -> None:
    other = tmp_path / "fixed_labels.nii.gz"
    sitk.WriteImage(sitk.Cast(smooth_volume(5, (12, 16, 16)) > 0.5, sitk.sitkUInt8), str(other))
    code, err, _ = run_main(*register_args(inputs, tmp_path / "out", "--moving-labels", inputs["labels"], "--fixed-labels", other))
    assert_refused(code, err, "fixed label map", "not on the grid of the fixed image")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------- Ctrl-C and two processes
HOOK = '''
import importlib.abc, importlib.util, os, pathlib, sys, time

WHERE = os.environ.get("DLIR_TEST_PAUSE", "")
MARK = os.environ.get("DLIR_TEST_MARK", "")
AT = int(os.environ.get("DLIR_TEST_PAUSE_AT", "1"))
GO = os.environ.get("DLIR_TEST_GO", "")
MODULE, _, FUNCTION = WHERE[5:].rpartition(":") if WHERE.startswith("call:") else ("", "", "")
MODULE = MODULE or "dlir.outputs"


def pause():
    """Say so in MARK, then wait 120 s, or until the file GO exists when one is named (Ctrl-C ends the wait too)."""
    pathlib.Path(MARK).touch()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (GO and os.path.exists(GO)):
        time.sleep(0.05)


class Pause(importlib.abc.MetaPathFinder):
    """Pause at an import ("import:MODULE") or at the AT-th call of a function of dlir.outputs ("call:NAME") or of
    another module ("call:MODULE:NAME")."""

    def find_spec(self, name, path, target=None):
        if WHERE == "import:" + name:
            pause()
        if FUNCTION and name == MODULE:
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                real, calls = getattr(module, FUNCTION), []

                def paused(*args, **kwargs):
                    calls.append(1)
                    if len(calls) == AT:
                        pause()
                    return real(*args, **kwargs)

                setattr(module, FUNCTION, paused)

            spec.loader.exec_module = exec_module
            return spec
        return None


if WHERE:
    sys.meta_path.insert(0, Pause())
'''


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pause-hook")
    (folder / "sitecustomize.py").write_text(HOOK, encoding="utf-8")
    return folder


def start_paused(args: list[object], where: str, mark: Path, hook_dir: Path, at: int = 1, go: Path | None = None) -> subprocess.Popen:
    """``python -m dlir ARGS``, paused at ``where`` (until ``go`` exists, when given); returns once it is there (the
    marker file exists)."""
    env = {**os.environ, "PYTHONPATH": f"{hook_dir}{os.pathsep}{SRC}", "DLIR_TEST_PAUSE": where, "DLIR_TEST_MARK": str(mark),
           "DLIR_TEST_PAUSE_AT": str(at), "DLIR_MODELS_DIR": str(hook_dir), "DLIR_TEST_GO": str(go or "")}
    # Ctrl-C's own disposition, even when this test runs in a shell's background job (which ignores SIGINT,
    # and a child that inherits that would never see it)
    proc = subprocess.Popen([sys.executable, "-m", "dlir", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not mark.exists():
        if proc.poll() is not None:
            raise AssertionError(f"dlir ended before pausing at {where}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"dlir never reached {where}"
        time.sleep(0.05)
    return proc


def interrupt(proc: subprocess.Popen) -> tuple[int, list[str]]:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, lines_of(err)


CTRL_C = {
    "during python -m dlir start-up": ("import:dlir.cli", 1, False),
    "while importing PyTorch": ("import:torch", 1, False),
    "while registering": ("call:register", 1, False),
    "while writing, over an earlier result": ("call:write_transform", 1, True),
    "at the second pair of a cohort": ("call:compute_pair", 2, False),
}


@pytest.mark.parametrize("where, at, earlier", CTRL_C.values(), ids=CTRL_C.keys())
def test_ctrl_c_at_any_moment_exits_130_with_one_line_and_no_partial_folder(
    inputs, tmp_path, hook_dir, run_main, untouched, where: str, at: int, earlier: bool
) -> None:
    out = tmp_path / "out"
    if earlier:
        assert run_main(*register_args(inputs, out, "--moving-labels", inputs["labels"]))[0] == 0
    before = snapshot(tmp_path)
    if where == "call:compute_pair":
        table = tmp_path / "pairs.csv"
        table.write_text(f"id,fixed,moving\na,{inputs['fixed']},{inputs['moving']}\nb,{inputs['fixed']},{inputs['moving2']}\n",
                         encoding="utf-8")
        before = snapshot(tmp_path)
        args = ["register", "--pairs", table, "--stack", inputs["stack"], "--out", out, "--device", "cpu"]
    else:
        args = register_args(inputs, out, "--overwrite", moving="moving2")
    code, err = interrupt(start_paused(args, where, tmp_path.parent / f"{tmp_path.name}.mark", hook_dir, at))
    assert code == 130, err
    assert err == ["interrupted"], err
    assert snapshot(tmp_path) == before, "the output folder changed, or a partial one was left"
    assert leftovers(tmp_path) == []


AFTER_THE_WORK = {
    # where the run is paused when Ctrl-C comes, the call's number, a cohort
    "while the result is put in place": ("call:dlir.resultfolder:fsync_tree", 1, False),
    "while the result is printed": ("call:dlir.cli:_print_result", 1, False),
    "while a cohort is put in place": ("call:dlir.resultfolder:fsync_tree", 3, True),  # after its two pair folders
}


@pytest.mark.parametrize("where, at, cohort", AFTER_THE_WORK.values(), ids=AFTER_THE_WORK.keys())
def test_ctrl_c_once_the_result_is_being_put_in_place_exits_0_with_the_folder_complete(
    inputs, tmp_path, hook_dir, untouched, where: str, at: int, cohort: bool
) -> None:
    """The run has succeeded: a script trusting the exit code must not throw the result away (it exited 130)."""
    out, go = tmp_path / "out", tmp_path.parent / f"{tmp_path.name}.go"
    if cohort:
        table = tmp_path.parent / f"{tmp_path.name}.csv"
        table.write_text(f"id,fixed,moving\na,{inputs['fixed']},{inputs['moving']}\nb,{inputs['fixed']},{inputs['moving2']}\n",
                         encoding="utf-8")
        args = ["register", "--pairs", table, "--stack", inputs["stack"], "--out", out, "--device", "cpu"]
    else:
        args = register_args(inputs, out)
    proc = start_paused(args, where, tmp_path.parent / f"{tmp_path.name}.mark", hook_dir, at, go)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)  # delivered (or ignored) while paused
    go.touch()
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted" not in err and "registered" in stdout, (stdout, err)
    if cohort:
        assert sorted(p.name for p in out.iterdir()) == ["a", "b", "summary.csv"]
        assert {p.name for p in (out / "b").iterdir()} == set(OUTPUTS)
    else:
        assert_complete(out, inputs["moving"], labels=False)
    assert leftovers(tmp_path) == []


def test_two_runs_at_once_into_one_folder(inputs, tmp_path, hook_dir, run_dlir, untouched) -> None:
    """The second run is refused while the first holds the folder; the first still ends cleanly."""
    out = tmp_path / "out"
    first = start_paused(register_args(inputs, out), "call:register", tmp_path.parent / f"{tmp_path.name}.mark", hook_dir)
    try:
        second = run_dlir(*register_args(inputs, out, "--overwrite", moving="moving2"), env={"PYTHONPATH": str(SRC)})
        assert_refused(second.returncode, lines_of(second.stderr), "another dlir run is writing into", str(out))
        assert not out.exists()
    finally:
        code, err = interrupt(first)
    assert code == 130 and err == ["interrupted"], err
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_killed_run_leaves_nothing_that_stops_or_mixes_into_the_next(inputs, tmp_path, hook_dir, run_main, untouched) -> None:
    """SIGKILL cannot be caught: its staging folder and lock file stay, and the next run into that folder clears them."""
    out = tmp_path / "out"
    killed = start_paused(register_args(inputs, out), "call:write_transform", tmp_path.parent / f"{tmp_path.name}.mark", hook_dir)
    killed.kill()
    killed.communicate(timeout=60)
    assert not out.exists() and len(leftovers(tmp_path)) == 2  # the staging folder (with warped, jacobian) and the lock
    neighbour = tmp_path / ".out.dlir-q.dlir-abcdefgh.tmp"  # staging of a run into another folder, "out.dlir-q": not ours
    neighbour.mkdir()
    code, err, _ = run_main(*register_args(inputs, out, moving="moving2"))
    assert code == 0 and err == [], err
    assert {p.name for p in out.iterdir()} == set(OUTPUTS)
    assert json.loads((out / "result.json").read_text(encoding="utf-8"))["moving"] == str(inputs["moving2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [neighbour.name, "out"]


def test_register_pair_for_engine_callers_swaps_only_the_output_files(inputs, tmp_path, fresh_stack_file, untouched) -> None:
    """``dlir bench`` keeps its own spec.json in the run folder and registers into it repeatedly."""
    from dlir.errors import OutputError
    from dlir.outputs import register_pair
    from dlir.stack import load_stack

    stack = load_stack(fresh_stack_file)
    out = tmp_path / "run"
    out.mkdir()
    (out / "spec.json").write_text("{}", encoding="utf-8")
    register_pair(stack, inputs["fixed"], inputs["moving"], out, moving_labels=inputs["labels"], device="cpu", show_progress=False)
    assert {p.name for p in out.iterdir()} == {"spec.json", *OUTPUTS, LABELS}
    register_pair(stack, inputs["fixed"], inputs["moving2"], out, device="cpu", show_progress=False)
    assert {p.name for p in out.iterdir()} == {"spec.json", *OUTPUTS}  # no labels.nii.gz of the earlier run
    assert json.loads((out / "result.json").read_text(encoding="utf-8"))["moving"] == str(inputs["moving2"])
    with pytest.raises(OutputError, match="already holds .*result.json"):
        register_pair(stack, inputs["fixed"], inputs["moving"], out, device="cpu", show_progress=False, overwrite=False)
    assert leftovers(tmp_path) == []


def test_a_parent_of_out_that_is_a_file_is_one_sentence(inputs, tmp_path, run_main, untouched) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    code, err, _ = run_main(*register_args(inputs, tmp_path / "notes.txt" / "out"))
    assert_refused(code, err, "notes.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------------- refused before any work
@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What a run did: ``read <what>`` per image it read, and ``register`` if the registration started (it stops there)."""
    import dlir.prefetch
    import dlir.register

    done: list[str] = []
    read = dlir.prefetch.read_image

    def reading(path, what="image"):
        done.append(f"read {what}")
        return read(path, what)

    def registering(*args, **kwargs):
        done.append("register")
        raise AssertionError("the registration started")

    monkeypatch.setattr(dlir.prefetch, "read_image", reading)
    monkeypatch.setattr(dlir.register, "_register", registering)
    return done


def test_an_empty_fixed_mask_is_refused_before_registering(inputs, tmp_path, run_main, untouched, work) -> None:
    """It was refused after the whole registration."""
    fixed = sitk.ReadImage(str(inputs["fixed"]))
    mask = sitk.Image(fixed.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(fixed)
    sitk.WriteImage(mask, str(tmp_path / "empty_mask.nii.gz"))
    code, err, _ = run_main(*register_args(inputs, tmp_path / "out", "--fixed-mask", tmp_path / "empty_mask.nii.gz"))
    assert_refused(code, err, "the fixed mask is empty", "leave it out")
    assert "register" not in work and not (tmp_path / "out").exists()


def test_a_folder_held_by_another_run_is_refused_before_reading(inputs, tmp_path, run_main, untouched, work) -> None:
    with OutputFolder(tmp_path / "out"):
        code, err, _ = run_main(*register_args(inputs, tmp_path / "out"))
    assert_refused(code, err, "another dlir run is writing into")
    assert work == []


def test_a_cohort_on_a_device_this_machine_lacks_is_refused_at_once(inputs, tmp_path, run_main, untouched, work) -> None:
    """Every row failed (exit 1) where a single pair is refused at once (exit 2)."""
    table = tmp_path / "pairs.csv"
    table.write_text(f"id,fixed,moving\na,{inputs['fixed']},{inputs['moving']}\n", encoding="utf-8")
    code, err, _ = run_main("register", "--pairs", table, "--stack", inputs["stack"], "--out", tmp_path / "out",
                            "--device", "cuda:99")
    assert_refused(code, err, "cuda:99")
    assert work == [] and not (tmp_path / "out").exists()


def test_a_stack_that_is_a_folder_is_called_a_folder(inputs, tmp_path, run_main, monkeypatch, untouched, work) -> None:
    """``--stack ..`` was refused as the input folder that holds --out."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    code, err, _ = run_main("register", inputs["fixed"], inputs["moving"], "--stack", "..", "--out", "out", "--device", "cpu")
    assert_refused(code, err, "--stack .. is a folder, not a stack file", ".safetensors")
    assert work == [] and sorted(p.name for p in tmp_path.iterdir()) == ["here"]
