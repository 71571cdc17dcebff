"""`endoflow serve` as a user starts it: with a propagation model, side by side with a second service on one host,
and refusing a taken port within seconds, naming it.

Each server is its own process with its own local Ray and HAProxy, as two users' services on one machine would be.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ENDOFLOW, b64, clip, endoflow_serve, png_array, save_model, to_bytes

from pipelines.ingress import METRICS_OFFSET, STATS_OFFSET
from pipelines.local_ray import free_port_block


def listening_addresses(port: int) -> set[str]:
    """Hex local addresses (as /proc/net/tcp writes them) of the sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def drive_session(base_url: str) -> None:
    """A session over HTTP and one over the WebSocket answer the same masks for the same clip."""
    from websockets.sync.client import connect

    frames, mask = clip(4)
    pngs = [to_bytes(f) for f in frames]
    opening = {"frame": b64(pngs[0]), "mask": b64(to_bytes(mask))}
    with httpx.Client(base_url=base_url, timeout=60) as http:
        opened = http.post("/v1/propagate/sessions", json=opening)
        assert opened.status_code == 201, opened.text
        session, route = opened.json()["session"], opened.json()["headers"]
        over_http = []
        for t in range(1, 4):
            step = http.post(f"/v1/propagate/sessions/{session}/frames", content=pngs[t], headers=route)
            assert step.status_code == 200, step.text
            over_http.append(png_array(step.content))
        assert http.delete(f"/v1/propagate/sessions/{session}").status_code == 200
    assert all(m.shape == mask.shape for m in over_http)
    with connect(base_url.replace("http", "ws") + "/v1/propagate/stream", open_timeout=30) as stream:
        stream.send(json.dumps(opening))
        assert json.loads(stream.recv(timeout=30))["objects"] == [1, 3]
        for t in range(1, 4):
            stream.send(pngs[t])
            assert np.array_equal(png_array(stream.recv(timeout=30)), over_http[t - 1]), t


def test_taken_port_fails_fast_naming_it(tmp_path: Path) -> None:
    model = save_model(tmp_path / "colours.onnx")
    port = free_port_block(3)
    for taken in (port, port + STATS_OFFSET):  # the HTTP port, then the HAProxy stats port derived from it
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", taken))
            holder.listen()
            started = time.monotonic()
            answer = subprocess.run(
                [str(ENDOFLOW), "serve", "--model", str(model), "--port", str(port)],
                capture_output=True,
                text=True,
                timeout=60,
                env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
            )
            took = time.monotonic() - started
        said = " ".join((answer.stdout + answer.stderr).split())  # rich wraps long lines
        assert answer.returncode == 2 and f"port {taken}" in said and "already in use" in said, said
        assert took < 20, f"took {took:.1f} s to refuse a taken port"  # the CLI's imports are most of it


@pytest.mark.slow
def test_two_servers_on_one_host_with_propagation_sessions(graphs_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    model = save_model(tmp_path / "colours.onnx")
    first = free_port_block(3)
    second = free_port_block(3, avoid=(first,))
    common = ["--model", str(model), "--propagation-model", str(graphs_dir), "--threads", "1"]
    with (
        endoflow_serve([*common, "--port", str(first)], tmp_path / "first.log"),
        endoflow_serve([*common, "--port", str(second)], tmp_path / "second.log"),
    ):
        for port in (first, second):
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()
            assert set(health["propagation"]["graphs"]) == {"encode_key", "encode_value", "segment"}, health
            # HAProxy's stats and metrics listeners: derived from the service's port, on loopback only.
            for extra in (port + STATS_OFFSET, port + METRICS_OFFSET):
                assert listening_addresses(extra) == {"0100007F"}, (extra, listening_addresses(extra))
        drive_session(f"http://127.0.0.1:{first}")
        drive_session(f"http://127.0.0.1:{second}")
