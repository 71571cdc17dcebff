"""`endoflow serve` stopped by SIGTERM (kill, systemd, a container runtime) leaves nothing running.

Before pipelines/local_ray.py turned SIGTERM into SystemExit, Ray's native handler ended the process mid-cleanup:
the raylet, the GCS, the replica and Serve's HAProxy kept running and kept the port, so the next `endoflow serve`
could not start its HAProxy.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import endoflow_serve

from pipelines.local_ray import free_port_block
from training.export import export_segmenter
from training.models.unet import Segmenter, UNetConfig


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _command(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:  # exited meanwhile (HAProxy replaces its process at every reload)
        return b""


def _running(pid: int) -> bool:
    """Alive and not a zombie (a sandbox's init may never reap the processes it inherits)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_sigterm_stops_ray_and_haproxy(tmp_path: Path) -> None:
    model = export_segmenter(Segmenter(UNetConfig(base_width=4, depth=2)), tmp_path / "model.onnx", input_size=64)
    port = free_port_block(3)  # HAProxy's stats and metrics take port+1, port+2
    with endoflow_serve(
        ["--model", str(model), "--port", str(port), "--threads", "1"], tmp_path / "serve.log"
    ) as server:
        started = _descendants(server.pid)
        commands = {pid: _command(pid) for pid in started}
        assert any(b"raylet" in c for c in commands.values()), "expected the local Ray under the serve process"
        assert any(b"haproxy" in c for c in commands.values()), "expected Serve's HAProxy ingress (the default)"

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30  # processes the driver killed may take a moment to exit
        while (left := [pid for pid in started if _running(pid)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"still running after SIGTERM: {[commands[pid][:120] for pid in left]}"
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still accepts connections"
