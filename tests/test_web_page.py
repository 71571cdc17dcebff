"""The page served at / in headless Chromium, driven over the DevTools protocol: its own JS posts an image it drew
on a canvas to the API, shows the overlay and the class areas, and reports a bad file as an error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import save_model, serving
from websockets.sync.client import connect

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]
# Draw a 64x32 image, left half red and right half blue, and hand it to the page as if it had been dropped.
DROP_DRAWN_IMAGE = """
(async () => {
  const canvas = document.createElement("canvas");
  canvas.width = 64; canvas.height = 32;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#ff0000"; ctx.fillRect(0, 0, 32, 32);
  ctx.fillStyle = "#0000ff"; ctx.fillRect(32, 0, 32, 32);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  await window.segmentFile(new File([blob], "drawn.png", { type: "image/png" }));
  const img = document.getElementById("overlay");
  return JSON.stringify({
    state: document.body.dataset.state,
    status: document.getElementById("status").textContent,
    size: [img.naturalWidth, img.naturalHeight],
    rows: [...document.querySelectorAll("#areas td:first-child")].map((td) => td.textContent),
  });
})()
"""
DROP_TEXT_FILE = """
(async () => {
  await window.segmentFile(new File(["hello"], "notes.txt", { type: "text/plain" }));
  return JSON.stringify({ state: document.body.dataset.state, status: document.getElementById("status").textContent });
})()
"""


# Three 64x64 frames of a red square moving over blue, dropped together as a clip.
DROP_CLIP = """
(async () => {
  const files = [];
  for (let t = 0; t < 3; t++) {
    const canvas = document.createElement("canvas");
    canvas.width = 64; canvas.height = 64;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#0000ff"; ctx.fillRect(0, 0, 64, 64);
    ctx.fillStyle = "#ff0000"; ctx.fillRect(10 + 4 * t, 16, 24, 24);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    files.push(new File([blob], `frame${t}.png`, { type: "image/png" }));
  }
  await window.propagateFiles(files);
  return JSON.stringify({
    state: document.body.dataset.state,
    status: document.getElementById("status").textContent,
    canvases: [...document.querySelectorAll("#clip canvas")].map((c) => [c.width, c.height]),
  });
})()
"""


class DevTools:
    """The smallest DevTools-protocol client: one page, Runtime.evaluate."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.next_id = 0

    def evaluate(self, expression: str, timeout_s: float = 30.0) -> dict:
        self.next_id += 1
        params = {"expression": expression, "awaitPromise": True, "returnByValue": True}
        self.socket.send(json.dumps({"id": self.next_id, "method": "Runtime.evaluate", "params": params}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = json.loads(self.socket.recv(timeout=timeout_s))
            if message.get("id") == self.next_id:
                result = message["result"]
                assert "exceptionDetails" not in result, result["exceptionDetails"]
                return json.loads(result["result"]["value"])
        raise TimeoutError(expression)


@pytest.fixture(scope="module")
def page(ray_session, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium; `make test` installs it)")
    model = save_model(tmp_path_factory.mktemp("web") / "colours.onnx")
    graphs = request.getfixturevalue("graphs_dir")  # an untrained propagation net, for the clip
    with (
        serving(model, propagation_model=str(graphs)) as url,
        # Chromium's helper processes (crashpad, utility) may still write to the profile after the browser exits,
        # which once failed the teardown with "Directory not empty"; the profile is scratch, so cleanup may fail.
        tempfile.TemporaryDirectory(prefix="efchrome-", ignore_cleanup_errors=True) as profile,
    ):
        browser = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", f"{url}/"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so the helpers are stopped with it
        )
        try:
            with connect(_page_socket(Path(profile), url), max_size=None, open_timeout=20) as socket:
                yield DevTools(socket)
        finally:
            _stop_process_group(browser)


def _stop_process_group(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM the browser's whole process group, then SIGKILL whatever is left of it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            time.sleep(0.5)  # helpers leave a moment after the browser; then sweep the group


def _page_socket(profile: Path, url: str, timeout_s: float = 30.0) -> str:
    """Chromium writes its DevTools port to DevToolsActivePort; then wait until the page has loaded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        port_file = profile / "DevToolsActivePort"
        if port_file.exists() and port_file.read_text().strip():
            port = port_file.read_text().split()[0]
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            except httpx.HTTPError:
                targets = []
            pages = [t for t in targets if t.get("type") == "page" and t.get("url", "").startswith(url)]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.2)
    raise TimeoutError(f"chromium did not open {url} within {timeout_s:.0f}s")


@pytest.mark.slow
def test_page_segments_a_dropped_image(page: DevTools) -> None:
    deadline = time.monotonic() + 20
    while page.evaluate("Promise.resolve(JSON.stringify(typeof window.segmentFile))") != "function":
        assert time.monotonic() < deadline, "the page's script never defined segmentFile"
        time.sleep(0.2)
    result = page.evaluate(DROP_DRAWN_IMAGE)
    assert result["state"] == "done", result
    assert result["size"] == [64, 32] and "64x32" in result["status"]
    assert set(result["rows"]) == {"red", "blue"}


@pytest.mark.slow
def test_page_reports_a_bad_file(page: DevTools) -> None:
    result = page.evaluate(DROP_TEXT_FILE)
    assert result["state"] == "error" and "not a PNG or JPEG" in result["status"], result


@pytest.mark.slow
def test_page_propagates_a_dropped_clip(page: DevTools) -> None:
    result = page.evaluate(DROP_CLIP)
    assert result["state"] == "done", result
    assert result["canvases"] == [[64, 64]] * 3
    assert "following classes 1, 3" in result["status"]  # red and blue from the first frame's segmentation
