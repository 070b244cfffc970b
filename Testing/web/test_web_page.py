"""The registration page end to end in a real headless Chromium: served on a loopback port, clicked through,
checked in its screenshots and downloads against ``dlir register``.

Order matters within the module (one server, one page): the bad uploads first (the server must keep
serving), then the sample pair (before/after, segments, numbers, downloads), then the folding-prone
stack (Jacobian colours, folding in red).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from pagechecks import axial, choose, colour_pixels, frame, misalignment, set_opacity, state, wait_idle

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "SampleData"
#: the overlay colours of DLIRRegistrationLib.display at 50 % over grey, and its solid folding red
FOLDING_RED = (255, 0, 0)


def cli_register(args: list[str], cwd: Path, capsys, monkeypatch) -> tuple[int, str]:
    """``dlir register ARGS`` as a user runs it in ``cwd`` (the command line's ``main``, in this process): exit code
    and what it printed to stderr."""
    from dlir.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = main(["register", *args])
    return code, capsys.readouterr().err


def save_screenshot(page, name: str) -> None:
    """The whole page at 2/3 size in 128 colours (a small PNG) into ``$DLIR_WEB_SCREENSHOT_DIR`` when set (the README's
    pictures are taken here: ``Resources/Screenshots``)."""
    folder = os.environ.get("DLIR_WEB_SCREENSHOT_DIR")
    if folder:
        from PIL import Image

        image = Image.fromarray(page.screenshot())
        image = image.resize((image.width * 2 // 3, image.height * 2 // 3), Image.LANCZOS)
        image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(Path(folder) / name, optimize=True)


def server_rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def test_the_page_serves_on_loopback_and_draws_slicers_views(served, page) -> None:
    assert served.url.startswith("http://127.0.0.1:")
    assert page.evaluate("document.title") == "DLIR registration"
    stacks = [s["title"].split(" | ")[0] for s in state(page, "stacks")]
    assert "brain-mri" in stacks and "folding-prone" in stacks, stacks  # the registry, with --models
    print(f"\ndlir-web: serving after {served.ready_s:.1f} s, page with its four views after {page.first_view_s:.1f} s, "
          f"server memory {server_rss_mb(served.process.pid):.0f} MB")


@pytest.mark.parametrize("name", ["notes.nii.gz", "slice.nii.gz"])
def test_a_bad_upload_gets_the_command_lines_sentence_and_the_server_keeps_serving(served, page, name: str, capsys,
                                                                                   monkeypatch) -> None:
    page.set_files("#dlir-upload", [served.folder / name])
    page.wait_for(f"trame.state.get('files').some(f => f.value === 'upload:{name}')", 30, "the upload")
    choose(page, "dlir-fixed", f"uploaded: {name}")
    page.wait_for("trame.state.get('messageType') === 'error'", 30, "the error message")
    code, said = cli_register([name, str(SAMPLE / "sample_moving.nii.gz"), "--stack", "brain-mri", "--out", "out"],
                              served.folder, capsys, monkeypatch)
    assert code == 2, said
    sentence = said.strip().splitlines()[-1].removeprefix("error: ")
    assert state(page, "message") == sentence
    assert page.evaluate("document.querySelector('#dlir-message').innerText.trim()") == sentence
    assert state(page, "fixed") is None  # the choice is not kept
    assert served.process.poll() is None


def test_the_sample_pair_registers_and_shows_before_after_segments_numbers_and_downloads(served, page, tmp_path, capsys,
                                                                                         monkeypatch) -> None:
    page.click("#dlir-sample")
    page.wait_for("trame.state.get('movingLabels') && !trame.state.get('message')", 60, "the sample pair")
    assert state(page, "fixed") == "sample:sample_fixed.nii.gz"
    shown = frame(page)
    set_opacity(page, 0.0)
    before_fixed = axial(page, shown)
    shown = frame(page)
    set_opacity(page, 0.5)
    before = axial(page, shown)

    started = time.monotonic()
    page.click("#dlir-register")
    page.wait_for("trame.state.get('running')", 10, "the registration to start")
    wait_idle(page)
    took = time.monotonic() - started
    assert state(page, "hasResult"), state(page, "message")
    assert state(page, "view") == "after"
    assert state(page, "contrast") == "auto" and "(chosen automatically" in state(page, "summary")  # the contrast choice
    after = axial(page)
    shown = frame(page)
    set_opacity(page, 0.0)
    after_fixed = axial(page, shown)
    set_opacity(page, 0.5)

    # the overlay: misaligned before, edges coinciding after (the warped moving nearly equals the fixed)
    moved, aligned = misalignment(before_fixed, before), misalignment(after_fixed, after)
    with capsys.disabled():  # shown with -s (capsys serves the command line's output below)
        print(f"\nregistered from the page in {took:.1f} s; overlay difference before {moved:.2f}, after {aligned:.2f} (0..255)")
    assert aligned < 0.6 * moved, (moved, aligned)

    # the propagated segments: outlines in their colours, inside the brain
    brain = after_fixed.max(axis=-1) > 40
    rows, cols = np.nonzero(brain)
    legend = state(page, "legend")
    assert len(legend) == 4
    coloured = 0
    for segment in legend:
        rgb = tuple(int(v) for v in re.findall(r"\d+", segment["css"]))
        if max(rgb) - min(rgb) < 60:
            continue  # greyish colours cannot be told from the anatomy
        found = colour_pixels(after, rgb)
        assert found.sum() > 30, (segment, int(found.sum()))
        r, c = np.nonzero(found)
        assert rows.min() - 3 <= r.min() and r.max() <= rows.max() + 3 and cols.min() - 3 <= c.min() and c.max() <= cols.max() + 3
        coloured += 1
    assert coloured >= 2

    # the 3D view (top right): the propagated segments as surfaces
    three_d = page.evaluate("(() => { const r = [...document.querySelectorAll('img.image-display-area')].map(e => e.getBoundingClientRect())"
                            ".sort((a, b) => a.y - b.y || b.x - a.x)[0]; return [r.x, r.y, r.width, r.height]; })()")
    x, y, w, h = (round(v) for v in three_d)
    surfaces = page.screenshot()[y + 20:y + h - 5, x + 20:x + w - 5].astype(int)
    saturated = (surfaces.max(axis=-1) - surfaces.min(axis=-1)) > 60
    assert saturated.sum() > 500, int(saturated.sum())
    with capsys.disabled():
        print(f"server memory after the registration {server_rss_mb(served.process.pid):.0f} MB")

    # the numbers
    assert re.match(r"[0-9.]+ s on cpu; folding [0-9.]+ %", state(page, "summary")), state(page, "summary")
    dice = state(page, "dice")
    assert len(dice) == 4 and all(float(d["after"]) > float(d["before"]) for d in dice), dice

    save_screenshot(page, "web_registration.png")

    # the downloads equal what `dlir register` writes for the same pair and stack
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    page.allow_downloads(downloads)
    names = [d["name"] for d in state(page, "downloads")]
    assert sorted(names) == ["jacobian.nii.gz", "labels.nii.gz", "result.json", "transform.h5", "warped.nii.gz"]
    for name in names:  # one at a time: the browser holds back a burst of downloads
        page.click(f"[id='dlir-download-{name}']")
        deadline = time.monotonic() + 30
        while not (downloads / name).is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (downloads / name).is_file(), f"{name} was not downloaded"
    cli = cli_register([str(SAMPLE / "sample_fixed.nii.gz"), str(SAMPLE / "sample_moving.nii.gz"), "--stack", "brain-mri",
                        "--moving-labels", str(SAMPLE / "sample_moving_labels.nii.gz"),
                        "--fixed-labels", str(SAMPLE / "sample_fixed_labels.nii.gz"), "--device", "cpu",
                        "--out", str(tmp_path / "cli")], tmp_path, capsys, monkeypatch)
    assert cli[0] == 0, cli[1]
    assert_same_outputs(downloads, tmp_path / "cli")


def assert_same_outputs(web: Path, cli: Path) -> None:
    """The arrays, the transform and the numbers of two result folders agree."""
    import json

    import SimpleITK as sitk

    for name in ("warped.nii.gz", "jacobian.nii.gz", "labels.nii.gz"):
        a, b = sitk.ReadImage(str(web / name)), sitk.ReadImage(str(cli / name))
        assert a.GetPixelID() == b.GetPixelID(), name
        assert a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing()) and np.allclose(a.GetOrigin(), b.GetOrigin())
        assert np.allclose(a.GetDirection(), b.GetDirection())
        np.testing.assert_allclose(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b), atol=1e-4, err_msg=name)
    tw, tc = sitk.ReadTransform(str(web / "transform.h5")), sitk.ReadTransform(str(cli / "transform.h5"))
    fixed = sitk.ReadImage(str(SAMPLE / "sample_fixed.nii.gz"))
    for index in np.random.default_rng(0).integers(0, fixed.GetSize(), size=(50, 3)):
        point = fixed.TransformIndexToPhysicalPoint([int(i) for i in index])
        np.testing.assert_allclose(tw.TransformPoint(point), tc.TransformPoint(point), atol=1e-4)
    rw, rc = json.loads((web / "result.json").read_text()), json.loads((cli / "result.json").read_text())
    assert rw["stack"] == rc["stack"] and rw["folding_fraction"] == pytest.approx(rc["folding_fraction"], abs=1e-6)
    assert rw["dice"].keys() == rc["dice"].keys()
    for label, scores in rc["dice"].items():
        assert rw["dice"][label] == pytest.approx(scores, abs=1e-6), label


def test_cancel_stops_a_running_registration_and_keeps_nothing(page) -> None:
    page.click("#dlir-mode-accurate")
    page.wait_for("trame.state.get('mode') === 'accurate'", 10)
    page.click("#dlir-register")
    page.wait_for("trame.state.get('running')", 10, "the registration to start")
    assert page.evaluate("document.querySelector('#dlir-register').disabled")  # one at a time
    page.click("#dlir-cancel")
    wait_idle(page, 120)
    assert state(page, "message") == "registration cancelled; nothing was kept"
    assert not state(page, "hasResult") and state(page, "downloads") == []
    page.click("#dlir-mode-fast")
    page.wait_for("trame.state.get('mode') === 'fast'", 10)


def test_the_jacobian_shows_its_colours_and_folding_in_red(page) -> None:
    for select in ("dlir-fixedLabels", "dlir-movingLabels"):  # no outlines: only the Jacobian's colours
        page.click(f".v-input:has([id='{select}']) .v-field__clearable .v-icon")
    page.wait_for("!trame.state.get('movingLabels') && !trame.state.get('fixedLabels')", 10, "the labels to be cleared")
    choose(page, "dlir-stack", next(s["title"] for s in state(page, "stacks") if s["title"].startswith("folding-prone")))
    page.click("#dlir-mode-fast")  # accurate mode never folds
    page.wait_for("trame.state.get('mode') === 'fast'", 10)
    page.click("#dlir-register")
    page.wait_for("trame.state.get('running')", 10, "the registration to start")
    wait_idle(page)
    assert state(page, "hasResult"), state(page, "message")
    folding = float(re.search(r"folding ([0-9.]+) %", state(page, "summary")).group(1))
    assert folding > 0
    shown = frame(page)
    page.click("#dlir-view-jacobian")
    page.wait_for("trame.state.get('view') === 'jacobian'", 10)
    deadline = time.monotonic() + 30
    while True:  # the view's next frames, until the colours are there (or the time is up)
        image = axial(page, shown).astype(int)
        shown = frame(page)
        red, green, blue = image[..., 0], image[..., 1], image[..., 2]
        folded = colour_pixels(image, FOLDING_RED, 60)
        compressed = (blue - red > 60) & ~folded  # blue over grey
        expanded = (red - blue > 80) & (green > 60) & ~folded  # orange over grey
        if (folded.sum() > 20 and compressed.sum() > 200 and expanded.sum() > 200) or time.monotonic() > deadline:
            break
    save_screenshot(page, "web_jacobian.png")
    print(f"\nJacobian view: {int(folded.sum())} folding-red, {int(compressed.sum())} blue, {int(expanded.sum())} orange pixels")
    assert folded.sum() > 20 and compressed.sum() > 200 and expanded.sum() > 200


def test_assert_same_outputs_is_not_vacuous(tmp_path) -> None:
    """The download comparison fails for folders that differ."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(SAMPLE / "sample_fixed_labels.nii.gz"))
    for folder, shift in (("a", 0), ("b", 1)):
        (tmp_path / folder).mkdir()
        for name in ("warped.nii.gz", "jacobian.nii.gz", "labels.nii.gz"):
            sitk.WriteImage(image + shift, str(tmp_path / folder / name))
    with pytest.raises(AssertionError):
        assert_same_outputs(tmp_path / "a", tmp_path / "b")

