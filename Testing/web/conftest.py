"""Fixtures of the browser tests: the web extra, Chromium, off-screen rendering, a served page.

The tests run where the ``web`` extra is installed (``pip install -e ".[web]"`` in an environment of
its own: trame-slicer needs slicer-core 5.11, the test environment has 5.13; ``.ci/run`` makes
``.venv-web`` for them) and skip elsewhere with that hint.  ``DLIR_REQUIRE_BROWSER=1`` (set by
``.ci/run``) turns a missing Chromium or off-screen renderer into a failure.

``served`` starts ``python -m dlirweb`` on a free loopback port with a served folder (bad files
for the upload test) and a model folder holding the folding-prone test stack, and stops it by its
process id at the end, checking that its private folder is gone.  ``page`` is one headless
Chromium tab on it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for folder in (REPO / "DLIRRegistration", REPO / "DLIRWeb", HERE, HERE.parent / "slicer_views"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

INSTALL_HINT = ('the web extra is not installed here: python3 -m venv .venv-web && .venv-web/bin/pip install -e ".[web]" '
                "(an environment of its own: it needs slicer-core 5.11), then .venv-web/bin/python -m pytest Testing/web")


def _require(problem: str) -> None:
    if os.environ.get("DLIR_REQUIRE_BROWSER") == "1":
        pytest.fail(problem)
    pytest.skip(problem)


@pytest.fixture(scope="session")
def web_extra() -> None:
    pytest.importorskip("trame_slicer", reason=INSTALL_HINT)


@pytest.fixture(scope="session")
def chromium(web_extra) -> str:
    from browser import chromium_path

    path = chromium_path()
    if path is None:
        _require("Chromium is not installed here (Debian: apt-get install chromium); the browser tests need it")
    from slicerviews import offscreenRenderingError

    error = offscreenRenderingError()
    if error:
        _require(error)
    return path


@dataclass
class Served:
    """A running ``dlir-web``: its address, process, private folder and start-up time."""

    url: str
    process: subprocess.Popen
    private: Path
    folder: Path
    started: float  # time.monotonic() when the process was started
    ready_s: float  # seconds until it said it serves


@pytest.fixture(scope="module")
def served(chromium, tmp_path_factory) -> Served:
    import numpy as np
    import SimpleITK as sitk
    from browser import free_port
    from views_checks import folding_stack

    from dlir.stack import save_stack

    folder = tmp_path_factory.mktemp("served")
    (folder / "notes.nii.gz").write_text("a text file, not an image\n")
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((20, 30)).astype(np.float32)),
                    str(folder / "slice.nii.gz"))
    models = tmp_path_factory.mktemp("models")
    save_stack(folding_stack(), models / "folding-prone.safetensors")
    port = free_port()
    log = (tmp_path_factory.mktemp("log") / "server.log").open("w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DLIR_MODELS_DIR": str(tmp_path_factory.mktemp("user-models"))}
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "dlirweb", "--port", str(port), "--folder", str(folder),
                                "--models", str(models)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        private = _wait_for_banner(process, log, 120)
        yield Served(f"http://127.0.0.1:{port}/", process, private, folder, started, time.monotonic() - started)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.seek(0)
        text = log.read()
        log.close()
    assert process.returncode in (0, -15), text[-3000:]
    assert not private.exists(), f"the private folder {private} was left behind"


def _wait_for_banner(process: subprocess.Popen, log, timeout: float) -> Path:
    """The private folder the server names when it starts serving."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log.flush()
        log.seek(0)
        found = re.search(r"uploads and results in (\S+) ", log.read())
        if found:
            return Path(found.group(1))
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"dlir-web exited ({process.returncode}):\n{log.read()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError("dlir-web did not start serving")


@pytest.fixture(scope="module")
def page(served, chromium):
    """One Chromium tab on the served page, its views drawn."""
    from browser import Browser

    browser = Browser(chromium)
    try:
        browser.open(served.url)
        browser.wait_for("document.querySelector('#dlir-register') && [...document.querySelectorAll('img.image-display-area')].filter(i => i.naturalWidth > 0).length == 4",
                         60, "the page and its four views")
        browser.first_view_s = time.monotonic() - served.started
        yield browser
    finally:
        browser.close()
