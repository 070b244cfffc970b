"""What the browser tests do on the page and measure in its screenshots.

The axial view is the largest of the page's four remote-rendered views (``img.image-display-area``,
the "Axial Primary" layout); :func:`axial` crops it from a screenshot, waiting until the picture the
server streams has settled (two identical captures in a row).
"""

from __future__ import annotations

import json
import time

import numpy as np

AXIAL = ("[...document.querySelectorAll('img.image-display-area')].sort((a, b) => { const r = a.getBoundingClientRect(),"
         " q = b.getBoundingClientRect(); return q.width * q.height - r.width * r.height; })[0]")


def frame(page) -> str:
    """The axial view's current frame (the image the server last streamed into it)."""
    return page.evaluate(f"{AXIAL}.src")


def axial(page, since: str | None = None, timeout: float = 20.0) -> np.ndarray:
    """The axial view's pixels, (H, W, 3) uint8: after a frame other than ``since`` has arrived (when given), once no
    new frame has come for a second."""
    deadline = time.monotonic() + timeout
    if since is not None:
        while frame(page) == since and time.monotonic() < deadline:
            time.sleep(0.1)
    current, quiet = frame(page), time.monotonic()
    while time.monotonic() - quiet < 1.0 and time.monotonic() < deadline:
        time.sleep(0.1)
        latest = frame(page)
        if latest != current:
            current, quiet = latest, time.monotonic()
    x, y, w, h = (round(v) for v in page.evaluate(f"(() => {{ const r = {AXIAL}.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }})()"))
    return page.screenshot()[y + 2:y + h - 30, x + 2:x + w - 2]  # leave out the border and the slice slider


def state(page, name: str):
    return page.evaluate(f"trame.state.get({json.dumps(name)})")


def wait_idle(page, timeout: float = 240.0) -> None:
    """Until no registration runs (Register pressed earlier has finished, or failed with a message)."""
    page.wait_for("!trame.state.get('running')", timeout, "the registration to finish")


def choose(page, select_id: str, title: str) -> None:
    """Open a Vuetify select with a click and click its item ``title`` (as a user does)."""
    page.click(f".v-input:has([id='{select_id}']) .v-field")  # the id sits on a hidden input inside the field
    item = (f"[...document.querySelectorAll('.v-overlay--active .v-list-item')].find(e => e.innerText.trim() === {json.dumps(title)})")
    page.click_at(item, 10, f"the item {title} of {select_id}")
    page.wait_for("!document.querySelector('.v-overlay--active .v-list-item')", 10, "the list to close")


def set_opacity(page, value: float) -> None:
    """Click the overlay slider's track at ``value`` (0..1) and wait for the state to follow."""
    track = page.evaluate("(() => { const t = document.querySelector('#dlir-opacity').closest('.v-input').querySelector('.v-slider-track');"
                          " const r = t.getBoundingClientRect(); return [r.x, r.y + r.height / 2, r.width]; })()")
    left, middle, width = track
    target = left + value * width
    for kind in ("mousePressed", "mouseReleased"):
        page.call("Input.dispatchMouseEvent", type=kind, x=target, y=middle, button="left", clickCount=1)
    page.wait_for(f"Math.abs(trame.state.get('opacity') - {value}) < 0.051", 10, f"the opacity {value}")


def misalignment(fixed_only: np.ndarray, blended: np.ndarray) -> float:
    """Mean absolute grey difference (0..255) between the fixed volume alone and the fixed with an overlay at 50 %:
    zero where the overlay equals the fixed volume, large where edges do not coincide."""
    return float(np.abs(blended.astype(float) - fixed_only.astype(float)).mean())


def colour_pixels(image: np.ndarray, rgb: tuple[int, int, int], tolerance: float = 40.0) -> np.ndarray:
    """Mask of the pixels within ``tolerance`` (Euclidean, 0..255) of ``rgb``."""
    return np.linalg.norm(image.astype(float) - np.array(rgb, float), axis=-1) < tolerance
