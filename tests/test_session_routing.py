"""Propagation sessions across replicas: with two replicas behind the HAProxy ingress (which balances every request
on its own, ignoring any affinity header) every frame of every session is answered 200 with the masks of an
in-process stream, whichever replica receives it; the session hosts go away with their replicas.

The served part runs in a subprocess with its own local Ray: RAY_SERVE_ENABLE_HA_PROXY is read by Serve's processes
when they start, so it must be set before Ray is (the session's shared Ray, if any, runs Ray's default proxy).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import b64, clip, png_array, save_model, to_bytes

from serving.errors import RequestError
from serving.propagation import OnnxPropagator, Stream
from serving.propagation_graphs import resolve_graphs
from serving.session_host import PREFIX, HostDirectory, SessionHost

ROOT = Path(__file__).resolve().parents[1]
SESSIONS, FRAMES = 4, 9  # 4 streams of 1 key frame + 8 frames each


def session_clip(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Each session its own video: the drifting disc clip, shifted down by a few pixels per session."""
    frames, mask = clip(FRAMES)
    return np.roll(frames, 4 * index, axis=1), np.roll(mask, 4 * index, axis=0)


def test_session_host_in_process(request: pytest.FixtureRequest) -> None:
    """The host's methods without Ray: ids name the host, steps match a Stream, closed ids are 404."""
    graphs = resolve_graphs(str(request.getfixturevalue("graphs_dir")))
    host = SessionHost(f"{PREFIX}test", graphs, ["CPUExecutionProvider"], 1, max_sessions=1, idle_timeout_s=60)
    frames, mask = session_clip(1)
    opened = host.open(frames[0], mask)
    assert opened["objects"] == [1, 3] and HostDirectory.host_name(opened["session"]) == f"{PREFIX}test"
    with pytest.raises(RequestError, match="limit is 1"):
        host.open(frames[0], mask)
    reference = Stream(OnnxPropagator(graphs, threads=1), frames[0], mask)
    for frame in frames[1:4]:
        assert np.array_equal(host.step(opened["session"], frame), reference.step(frame))
    assert host.count() == 1
    host.close(opened["session"])
    with pytest.raises(RequestError, match="no open session") as info:
        host.step(opened["session"], frames[1])
    assert info.value.status == 404 and host.count() == 0
    for malformed in ("abc", f"{PREFIX}x.", "other-host.token"):
        with pytest.raises(RequestError, match="no open session"):
            HostDirectory.host_name(malformed)
    copied = pickle.loads(pickle.dumps(RequestError(410, "gone")))  # how a host's errors reach the replica
    assert (copied.status, copied.message) == (410, "gone")


@pytest.mark.slow
def test_sessions_are_served_by_any_replica_behind_haproxy(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    exported: Path = request.getfixturevalue("graphs_dir")  # one export per test session, shared
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    command = [sys.executable, __file__, str(save_model(tmp_path / "colours.onnx")), str(exported), str(out)]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0 and out.exists(), f"{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    result = json.loads(out.read_text())

    assert result["statuses"] == [[200] * (FRAMES - 1)] * SESSIONS, result["statuses"]
    model = OnnxPropagator(resolve_graphs(str(exported)), threads=1)  # as the replicas run it (threads=1)
    for index, masks in enumerate(result["masks"]):
        frames, mask = session_clip(index)
        stream = Stream(model, frames[0], mask)
        for t, encoded in enumerate(masks, start=1):
            assert np.array_equal(png_array(base64.b64decode(encoded)), stream.step(frames[t])), (index, t)
    assert result["after_close"] == [404] * SESSIONS and result["malformed"] == 404
    assert result["host_killed"] == [[410, True]] * 2, result["host_killed"]
    assert result["after_kill_opens"] == [201] * 4 and result["after_kill_frames"] == [200] * 4
    assert result["hosts_left"] == []


def scenario(segmenter: str, graphs: str, out: Path) -> None:
    """Run in a subprocess: serve with 2 replicas behind HAProxy, drive the sessions, write what came back."""
    import resource

    import httpx
    import ray
    from ray import serve

    from pipelines.local_ray import free_port, local_ray
    from serving.app import run_app
    from serving.session_host import NAMESPACE

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # HAProxy holds a descriptor per connection
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 16384), hard), hard))
    port, result = free_port(), {}

    def hosts() -> list[str]:
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(PREFIX)]

    with local_ray(num_cpus=2):
        options = {"propagation_model": graphs, "num_replicas": 2, "threads": 1, "reload_interval_s": 0}
        try:
            run_app(segmenter, port=port, **options)
            base = f"http://127.0.0.1:{port}"

            def drive(index: int) -> tuple[str, list[int], list[str]]:
                frames, mask = session_clip(index)
                with httpx.Client(base_url=base, timeout=60) as http:
                    opening = {"frame": b64(to_bytes(frames[0])), "mask": b64(to_bytes(mask))}
                    opened = http.post("/v1/propagate/sessions", json=opening)
                    assert opened.status_code == 201, opened.text
                    session, statuses, masks = opened.json()["session"], [], []
                    for frame in frames[1:]:
                        step = http.post(f"/v1/propagate/sessions/{session}/frames", content=to_bytes(frame))
                        statuses.append(step.status_code)
                        masks.append(base64.b64encode(step.content).decode() if step.status_code == 200 else step.text)
                return session, statuses, masks

            with ThreadPoolExecutor(SESSIONS) as pool:  # the four streams at once
                driven = list(pool.map(drive, range(SESSIONS)))
            sessions, result["statuses"], result["masks"] = (list(column) for column in zip(*driven, strict=True))
            result["hosts_used"] = sorted({s.rpartition(".")[0] for s in sessions})

            frames, mask = session_clip(0)
            frame, opening = to_bytes(frames[1]), {"frame": b64(to_bytes(frames[0])), "mask": b64(to_bytes(mask))}
            with httpx.Client(base_url=base, timeout=60) as http:
                result["after_close"] = []
                for session in sessions:
                    assert http.delete(f"/v1/propagate/sessions/{session}").status_code == 200
                    result["after_close"].append(http.post(f"/v1/propagate/sessions/{session}/frames", content=frame))
                result["after_close"] = [r.status_code for r in result["after_close"]]
                result["malformed"] = http.post("/v1/propagate/sessions/nonsense/frames", content=frame).status_code

                # A host that dies (its replica crashed, say): its sessions answer 410, and its replica starts a new
                # host for the sessions it opens next.
                doomed = http.post("/v1/propagate/sessions", json=opening).json()["session"]
                ray.kill(ray.get_actor(doomed.rpartition(".")[0], namespace=NAMESPACE), no_restart=True)
                answers = [http.post(f"/v1/propagate/sessions/{doomed}/frames", content=frame) for _ in range(2)]
                result["host_killed"] = [(a.status_code, doomed in a.json()["error"]) for a in answers]
                opened = [http.post("/v1/propagate/sessions", json=opening) for _ in range(4)]
                result["after_kill_opens"] = [o.status_code for o in opened]
                result["after_kill_frames"] = [
                    http.post(f"/v1/propagate/sessions/{o.json()['session']}/frames", content=frame).status_code
                    for o in opened
                ]
        finally:
            serve.shutdown()
        # The hosts are owned by their replicas (not detached), so they go with them.
        deadline = time.monotonic() + 30
        while (left := hosts()) and time.monotonic() < deadline:
            time.sleep(0.5)
        result["hosts_left"] = left
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    scenario(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
