"""Hot reload of the propagation model: its three registered graphs' alias moves, the replica swaps them together
without a failed request, refuses the half-moved set in between, and a stream opened before keeps its graphs.

Own module: it needs its own server (registry reference, short reload interval) and Serve keeps one HTTP proxy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from conftest import b64, clip, png_array, retrained, save_model, serving, to_bytes

from serving.propagation import OnnxPropagator, Stream
from serving.propagation_graphs import GRAPHS
from serving.resolve import resolve_model

pytestmark = pytest.mark.slow
NAME = "prop"  # registered as prop-encode_key, prop-encode_value, prop-segment (as `--register prop` would)
STAGING = ("staging-1", "staging-2")


def register(client, experiment_id: str, graphs: Path, staging: Path) -> None:
    """One run logging the three graphs (mlflow.onnx layout) and one new version of each registered model.

    Only through this explicit client: no process-wide tracking URI is set, so nothing leaks into other tests."""
    import mlflow

    run_id = client.create_run(experiment_id).info.run_id
    for graph in GRAPHS:
        name = f"{NAME}-{graph}"
        mlflow.onnx.save_model(onnx.load(str(graphs / f"propagation.{graph}.onnx")), str(staging / graph))
        client.log_artifacts(run_id, str(staging / graph), graph)
        if not client.search_registered_models(f"name = '{name}'"):
            client.create_registered_model(name)
        client.create_model_version(name, f"{client.get_run(run_id).info.artifact_uri}/{graph}", run_id)
    client.set_terminated(run_id)


def encode_key(http: httpx.Client, image: np.ndarray, version: str | None = None) -> httpx.Response:
    tensor = {"name": "image", "shape": list(image.shape), "datatype": "FP32", "data": image.ravel().tolist()}
    doc = {"inputs": [tensor]}
    route = f"/v2/models/{NAME}-encode_key" + (f"/versions/{version}" if version else "") + "/infer"
    return http.post(route, content=json.dumps(doc | {"outputs": [{"name": "key"}]}))


def test_moved_alias_swaps_all_three_graphs_without_downtime(
    ray_session, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    import mlflow

    exported: Path = request.getfixturevalue("graphs_dir")  # one export per test session, shared

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("propagation-reload", artifact_location=(tmp_path / "artifacts").as_uri())
    second = retrained(exported, tmp_path / "run-2", "run-2")  # other weights, other source run
    register(client, experiment, exported, tmp_path / STAGING[0])  # versions 1
    register(client, experiment, second, tmp_path / STAGING[1])  # versions 2
    for graph in GRAPHS:
        client.set_registered_model_alias(f"{NAME}-{graph}", "champion", "1")
    # What the registry holds (mlflow.onnx re-serialises the graphs, so these are the bytes the replica hashes).
    old, new = (OnnxPropagator({g: resolve_model(tmp_path / staging / g) for g in GRAPHS}) for staging in STAGING)
    frames, mask = clip(2)
    image = new.prepare(frames[0])  # both exports share the normalisation

    options = {"propagation_model": f"models:/{NAME}@champion", "tracking_uri": uri, "reload_interval_s": 0.5}
    with (
        serving(save_model(tmp_path / "colours.onnx"), cache_dir=str(tmp_path / "cache"), **options) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        before = http.get("/healthz").json()["propagation"]
        assert (before["name"], before["version"], before["graphs"]) == (NAME, old.version, old.sha256)
        opening = {"frame": b64(to_bytes(frames[0])), "mask": b64(to_bytes(mask))}
        opened = http.post("/v1/propagate/sessions", json=opening)
        assert opened.status_code == 201, opened.text

        # One alias moved, two not yet: graphs of two exports, which the replica must not start serving.
        client.set_registered_model_alias(f"{NAME}-encode_key", "champion", "2")
        time.sleep(2.0)  # four reload rounds
        assert http.get("/healthz").json()["propagation"]["version"] == before["version"]
        for graph in ("encode_value", "segment"):
            client.set_registered_model_alias(f"{NAME}-{graph}", "champion", "2")

        deadline, failures = time.monotonic() + 60, 0
        while (now := http.get("/healthz").json()["propagation"])["version"] == before["version"]:
            failures += encode_key(http, image).status_code != 200
            assert time.monotonic() < deadline, "the moved alias was not picked up within 60 s"
            time.sleep(0.1)
        assert failures == 0
        assert (now["version"], now["graphs"]) == (new.version, new.sha256)

        # Right after the swap: the latest version answers from the new weights, the old one is gone for v2 clients.
        answer = encode_key(http, image)
        assert answer.status_code == 200 and answer.json()["model_version"] == new.version
        key = np.array(answer.json()["outputs"][0]["data"], np.float32).reshape(answer.json()["outputs"][0]["shape"])
        np.testing.assert_allclose(key, new.encode_key(image)[0], rtol=1e-4, atol=1e-5)
        pinned = encode_key(http, image, version=before["version"])
        assert pinned.status_code == 404 and "no version" in pinned.json()["error"]

        # The stream opened before the move finishes on the graphs it started with (its memory is theirs).
        session, route = opened.json()["session"], opened.json()["headers"]
        step = http.post(f"/v1/propagate/sessions/{session}/frames", content=to_bytes(frames[1]), headers=route)
        assert step.status_code == 200
        labels = png_array(step.content)
        assert (labels == Stream(old, frames[0], mask).step(frames[1])).mean() > 0.99
        assert (labels == Stream(new, frames[0], mask).step(frames[1])).mean() < 0.9  # the two exports do differ
        assert http.post("/v1/propagate/sessions", json=opening).status_code == 201  # new streams: new graphs
        assert "endoflow_model_reloads_total 1.0" in http.get("/metrics").text
