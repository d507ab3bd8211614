"""A headless Chromium driven over the DevTools protocol (tornado's websocket client).

For the live page's test: one real browser session that loads the page and
is asked, some seconds apart, for ``document.title`` (which the page keeps
up to date over its websocket) and for a screenshot. Loopback only. No
package beyond tornado (which Bokeh needs) and the system's ``chromium``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from typing import Any


def chromium() -> str | None:
    """The chromium executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


class Browser:
    """``with Browser(url) as b: b.title(); b.screenshot(path)``."""

    def __init__(self, url: str, size: tuple[int, int] = (1200, 800),
                 timeout: float = 30.0) -> None:
        exe = chromium()
        if exe is None:
            raise RuntimeError("no chromium")
        self.dir = tempfile.mkdtemp(prefix="cdp-")
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.dir}", f"--window-size={size[0]},{size[1]}",
             "--hide-scrollbars", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(self.dir, "DevToolsActivePort")
        end = time.time() + timeout
        while not os.path.exists(port_file):
            if time.time() > end or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        time.sleep(0.2)
        port = int(open(port_file).read().split()[0])
        ws = None
        while ws is None and time.time() < end:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                ws = pages[0]["webSocketDebuggerUrl"]
            else:
                time.sleep(0.1)
        if ws is None:
            self.close()
            raise RuntimeError("no page in chromium")
        self.ws_url = ws
        self.loop = asyncio.new_event_loop()
        self._id = 0
        self.conn: Any = self.loop.run_until_complete(self._connect())

    async def _connect(self) -> Any:
        from tornado.websocket import websocket_connect

        return await websocket_connect(self.ws_url, max_message_size=64 << 20)

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._id += 1
        mid = self._id
        await self.conn.write_message(json.dumps({"id": mid, "method": method,
                                                  "params": params}))
        while True:
            msg = await asyncio.wait_for(self.conn.read_message(), 30)
            if msg is None:
                raise RuntimeError("devtools connection closed")
            d = json.loads(msg)
            if d.get("id") == mid:
                if "error" in d:
                    raise RuntimeError(str(d["error"]))
                return d["result"]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.loop.run_until_complete(self._call(method, params))

    def evaluate(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return r.get("result", {}).get("value")

    def title(self) -> str:
        return str(self.evaluate("document.title"))

    def screenshot(self, path: str) -> None:
        r = self.call("Page.captureScreenshot", format="png")
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(r["data"]))

    def close(self) -> None:
        try:
            if getattr(self, "conn", None) is not None:
                self.conn.close()
            if getattr(self, "loop", None) is not None:
                self.loop.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
