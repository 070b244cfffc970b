"""A headless Chromium driven over the DevTools protocol (no Playwright, no browser download).

:class:`Browser` starts Debian's ``chromium`` on a free loopback port with a private profile,
attaches to its page over a websocket (``aiohttp``, which trame installs) and offers what the web
tests need: navigate, evaluate JavaScript, click an element by CSS selector with real mouse events,
set the files of a file input, allow downloads into a folder, and take a screenshot as an
``(H, W, 3)`` uint8 array.  Everything runs on the browser's own event loop in this thread.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

#: the page's size in CSS pixels (device scale 1)
WIDTH, HEIGHT = 1400, 900


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_path() -> str | None:
    """Debian's ``chromium`` (or ``chromium-browser``), None when not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium page; close with :meth:`close`."""

    def __init__(self, executable: str) -> None:
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="dlir-web-chromium-")
        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-address=127.0.0.1", f"--remote-debugging-port={self.port}",
             f"--user-data-dir={self.profile}", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # its own process group
        self.loop = asyncio.new_event_loop()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.session = self.ws = self._reader = None
        self.loop.run_until_complete(self._attach())

    async def _attach(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        deadline = time.monotonic() + 60
        while True:
            try:
                async with self.session.get(f"http://127.0.0.1:{self.port}/json/list") as response:
                    pages = [t for t in await response.json() if t.get("type") == "page"]
                if pages:
                    break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            await asyncio.sleep(0.2)
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.ensure_future(self._read())
        await self._call("Page.enable")
        await self._call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            future = self._pending.pop(data.get("id"), None)
            if future is not None and not future.done():
                if "error" in data:
                    future.set_exception(RuntimeError(f"DevTools: {data['error']}"))
                else:
                    future.set_result(data.get("result", {}))

    async def _call(self, method: str, **params) -> dict:
        number = next(self._ids)
        future = self.loop.create_future()
        self._pending[number] = future
        await self.ws.send_str(json.dumps({"id": number, "method": method, "params": params}))
        return await asyncio.wait_for(future, 120)

    def call(self, method: str, **params) -> dict:
        """One DevTools command; its result."""
        return self.loop.run_until_complete(self._call(method, **params))

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails'].get('text')} in {expression[:200]}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, what: str = "") -> object:
        """Poll a JavaScript expression in real time until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what or expression}")
            time.sleep(0.25)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def box(self, selector: str) -> tuple[float, float, float, float]:
        """(x, y, width, height) of the first element matching ``selector``, in page pixels."""
        rect = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
                             " const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()")
        if rect is None:
            raise LookupError(f"no element {selector} on the page")
        return tuple(rect)

    def click(self, selector: str, timeout: float = 10.0) -> None:
        """A real left click (mouse pressed and released) at the centre of the element: scrolled into view, and once
        the element lies on top there and has stayed put for a moment (the page may still be laying itself out)."""
        self.click_at(f"document.querySelector({json.dumps(selector)})", timeout, selector)

    def click_at(self, element: str, timeout: float = 10.0, what: str = "") -> None:
        """:meth:`click` on the element a JavaScript expression gives."""
        where = (f"(() => {{ const e = {element}; if (!e) return null; e.scrollIntoView({{block: 'nearest'}});"
                 " const r = e.getBoundingClientRect(); const x = r.x + r.width / 2, y = r.y + r.height / 2;"
                 " const hit = document.elementFromPoint(x, y); return hit && e.contains(hit) ? JSON.stringify([x, y]) : null; })()")
        deadline = time.monotonic() + timeout
        last = None
        while True:
            found = self.evaluate(where)
            if found and found == last:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what or element} did not come to rest on top of the page")
            last = found
            time.sleep(0.2)
        x, y = json.loads(found)
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def set_files(self, selector: str, paths: list[Path]) -> None:
        """Choose files in a file input (as the file dialog would)."""
        document = self.call("DOM.getDocument")
        node = self.call("DOM.querySelector", nodeId=document["root"]["nodeId"], selector=selector)
        self.call("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(p) for p in paths])

    def allow_downloads(self, folder: Path) -> None:
        self.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(folder))

    def screenshot(self) -> np.ndarray:
        """The page as an (H, W, 3) uint8 RGB array."""
        from PIL import Image

        data = self.call("Page.captureScreenshot", format="png")["data"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))

    def close(self) -> None:
        async def shut() -> None:
            if self.ws is not None:
                await self.ws.close()
            if self._reader is not None:
                self._reader.cancel()
            if self.session is not None:
                await self.session.close()

        try:
            self.loop.run_until_complete(shut())
        finally:
            self.loop.close()
            self._stop(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self._stop(signal.SIGKILL)
                self.process.wait()
            shutil.rmtree(self.profile, ignore_errors=True)

    def _stop(self, sig: int) -> None:
        """Signal the browser's process group (Debian's ``chromium`` is a script that starts the browser as a child)."""
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
