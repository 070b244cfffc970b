"""``dlir register --pairs`` reads the next pair while the current one is registered.

A cohort run writes the same files as registering each pair on its own, and its reader thread
runs one pair ahead: with a slow reader (monkeypatched in this process) pair 2 is being read
while pair 1 is registered, and never more than one pair ahead.
"""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

import dlir.outputs
import dlir.prefetch
from dlir.cli import main
from dlir.errors import InputError
from dlir.prefetch import PairReader, read_pair_images


def smooth_volume(seed: int, shape: tuple[int, int, int] = (16, 18, 20)) -> sitk.Image:
    arr = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 1.5).astype(np.float32)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((2.0, 2.5, 3.0))
    image.SetOrigin((-20.0, -22.0, -24.0))
    return image


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CSV of three pairs (one with moving labels) of small smooth images."""
    folder = tmp_path_factory.mktemp("cohort-inputs")
    for k in range(4):
        sitk.WriteImage(smooth_volume(k), str(folder / f"image{k}.nii.gz"))
    labels = sitk.Cast(sitk.ReadImage(str(folder / "image1.nii.gz")) > 0.5, sitk.sitkUInt8)
    sitk.WriteImage(labels, str(folder / "labels1.nii.gz"))
    table = folder / "pairs.csv"
    table.write_text("id,fixed,moving,moving_labels\na,image0.nii.gz,image1.nii.gz,labels1.nii.gz\n"
                     "b,image0.nii.gz,image2.nii.gz,\nc,image3.nii.gz,image1.nii.gz,\n", encoding="utf-8")
    return table


def _outputs(folder: Path) -> dict[str, np.ndarray]:
    arrays = {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}
    warped = sitk.ReadImage(str(folder / "warped.nii.gz"))
    field = sitk.TransformToDisplacementField(sitk.ReadTransform(str(folder / "transform.h5")), sitk.sitkVectorFloat64,
                                              warped.GetSize(), warped.GetOrigin(), warped.GetSpacing(), warped.GetDirection())
    arrays["transform.h5"] = sitk.GetArrayFromImage(field)
    return arrays


def test_a_cohort_writes_what_pair_by_pair_runs_write(cohort: Path, fresh_stack_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    assert main(["register", "--pairs", str(cohort), "--stack", str(fresh_stack_file), "--out", str(out), "--device", "cpu"]) == 0
    with (out / "summary.csv").open(newline="", encoding="utf-8") as f:
        assert [(row["id"], row["status"]) for row in csv.DictReader(f)] == [("a", "ok"), ("b", "ok"), ("c", "ok")]
    folder = cohort.parent
    for pair_id, fixed, moving, labels in (("a", 0, 1, True), ("b", 0, 2, False), ("c", 3, 1, False)):
        single = tmp_path / f"single-{pair_id}"
        args = ["register", str(folder / f"image{fixed}.nii.gz"), str(folder / f"image{moving}.nii.gz"), "--stack",
                str(fresh_stack_file), "--out", str(single), "--device", "cpu"]
        assert main(args + (["--moving-labels", str(folder / "labels1.nii.gz")] if labels else [])) == 0
        assert sorted(p.name for p in (out / pair_id).iterdir()) == sorted(p.name for p in single.iterdir())
        together, alone = _outputs(out / pair_id), _outputs(single)
        assert together.keys() == alone.keys()
        for name in alone:
            np.testing.assert_array_equal(together[name], alone[name], err_msg=f"{pair_id}/{name}")
        report = json.loads((out / pair_id / "result.json").read_text(encoding="utf-8"))
        assert report["moving"] == str(folder / f"image{moving}.nii.gz") and report["timings_s"]["read"] >= 0


def test_the_reader_runs_one_pair_ahead_and_the_writer_one_pair_behind(cohort: Path, fresh_stack_file: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Pair n + 1 is read while pair n is registered, and pair n + 2 only after pair n is done; pair n is written
    while pair n + 1 is registered; the pairs' shares of the wall time (cohort_s) add up to the cohort's."""
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    real_read, real_compute, real_write = dlir.prefetch.read_pair_images, dlir.outputs.compute_pair, dlir.outputs.write_pair

    def note(what: str, moving) -> None:
        with lock:
            events.append((what, Path(moving).name))

    def slow_read(fixed, moving, *args):
        note("read start", moving)
        time.sleep(0.5)
        images = real_read(fixed, moving, *args)
        note("read end", moving)
        return images

    def compute_pair(stack, fixed, moving, **kwargs):
        note("register start", moving)
        time.sleep(1.0)  # the registration: long enough for the next pair's slow read and the previous pair's write
        computed = real_compute(stack, fixed, moving, **kwargs)
        note("register end", moving)
        return computed

    def write_pair(folder, computed, shown=None, extra={}):
        note("write start", computed.moving_path)
        time.sleep(0.5)
        result = real_write(folder, computed, shown, extra)
        note("write end", computed.moving_path)
        return result

    monkeypatch.setattr(dlir.prefetch, "read_pair_images", slow_read)
    monkeypatch.setattr(dlir.outputs, "compute_pair", compute_pair)
    monkeypatch.setattr(dlir.outputs, "write_pair", write_pair)
    out = tmp_path / "cohort"
    t0 = time.perf_counter()
    # the centre alignment: the real registration of these small pairs adds next to nothing to the sleeps
    assert main(["register", "--pairs", str(cohort), "--stack", str(fresh_stack_file), "--out", str(out), "--device", "cpu",
                 "--initial-alignment", "centre"]) == 0
    wall = time.perf_counter() - t0
    order = [f"{what} {name}" for what, name in events]
    # pair 2 (moving image2) is read while pair 1 (image1) is registered; pair 3 while pair 2 is
    assert order.index("read start image2.nii.gz") < order.index("register end image1.nii.gz")
    assert order.index("read end image2.nii.gz") < order.index("register end image1.nii.gz")
    # one pair ahead, not more: the third pair is read only once the first is registered and the second handed over
    third = [i for i, entry in enumerate(order) if entry == "read start image1.nii.gz"][1]
    assert third > order.index("register end image1.nii.gz")
    # pair 1 is written while pair 2 is registered
    assert order.index("register end image1.nii.gz") < order.index("write start image1.nii.gz")
    assert order.index("write end image1.nii.gz") < order.index("register end image2.nii.gz")
    rows = list(csv.DictReader((out / "summary.csv").open(newline="", encoding="utf-8")))
    results = {row["id"]: json.loads((out / row["id"] / "result.json").read_text(encoding="utf-8")) for row in rows}
    # the reads of pairs 2 and 3 were hidden: each pair's read time is what it waited for its images
    assert results["b"]["timings_s"]["read"] < 0.4 and results["c"]["timings_s"]["read"] < 0.4, results
    # the writes of pairs 1 and 2 were hidden (each share is about the 1 s registration, not 1.5 s); all shares
    # together are the cohort's time after loading the stack, which the last pair's write ends
    shares = [float(row["cohort_s"]) for row in rows]
    assert shares[1] < 1.4 and shares[2] > 1.4, shares
    assert sum(shares) < wall and all(abs(float(r["cohort_s"]) - s) < 1e-3 for r, s in zip(results.values(), shares[:2]))


def test_a_read_error_is_raised_for_its_own_pair_and_the_reader_goes_on(cohort: Path, tmp_path: Path) -> None:
    folder = cohort.parent
    good = dict(fixed=folder / "image0.nii.gz", moving=folder / "image1.nii.gz", moving_labels=None, fixed_mask=None,
                fixed_labels=None)
    missing = {**good, "moving": tmp_path / "nope.nii.gz"}
    pairs = [type("P", (), p)() for p in (good, missing, good)]
    with PairReader(pairs) as reader:
        assert reader.next().fixed.GetSize() == (20, 18, 16)
        with pytest.raises(InputError, match="the moving image .*nope.nii.gz does not exist"):
            reader.next()
        assert reader.next().moving.GetSize() == (20, 18, 16)
        with pytest.raises(IndexError):
            reader.next()
    with pytest.raises(InputError, match="the moving image"):
        read_pair_images(missing["fixed"], missing["moving"])


def test_leaving_early_stops_the_reader(cohort: Path) -> None:
    folder = cohort.parent
    pair = type("P", (), dict(fixed=folder / "image0.nii.gz", moving=folder / "image1.nii.gz", moving_labels=None,
                              fixed_mask=None, fixed_labels=None))()
    with PairReader([pair] * 5) as reader:
        reader.next()
        thread = reader._thread
    assert not thread.is_alive()
