"""Hostile and careless clients: every bad request is a 4xx JSON naming the problem and the next good one succeeds.

Also the operational surface: bearer auth, Prometheus metrics, the OpenAPI document, execution-provider checks and
the hot swap of a model whose reference moved. One server (loopback, free port) for the module.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import BAD_BODIES, BIAS, normalised, save_model, serving, solid, to_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.onnx_model import OnnxSegmenter, choose_providers
from serving.timing import HEADER, parse_server_timing

TOKEN = "s3cret-token"
MAX_BODY = 2_000_000
MAX_SIDE = 256


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("hard") / "colours.onnx")


@pytest.fixture(scope="module")
def http(ray_session, model_file: Path):
    options = {"max_body_bytes": MAX_BODY, "max_side": MAX_SIDE, "api_token": TOKEN, "reload_interval_s": 1.0}
    with serving(model_file, **options) as url:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
            yield client


def v2_binary(array: np.ndarray, datatype: str = "FP32", cut: int = 0) -> tuple[bytes, dict[str, str]]:
    spec = {"name": "image", "shape": list(array.shape), "datatype": datatype}
    spec["parameters"] = {"binary_data_size": array.nbytes}
    header = json.dumps({"inputs": [spec], "outputs": [{"name": "labels"}]}).encode()
    body = header + array.tobytes()
    return body[: len(body) - cut], {"Inference-Header-Content-Length": str(len(header))}


def good_v2(http: httpx.Client) -> None:
    body, headers = v2_binary(normalised(solid("red", 32, 32)))
    response = http.post("/v2/models/colours/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert http.post("/v1/segment", content=to_bytes(solid("red"))).status_code == 200


def v2_json(spec: dict) -> bytes:
    return json.dumps({"inputs": [{"name": "image"} | spec]}).encode()


RED = normalised(solid("red", 32, 32))
NAN = RED.copy()
NAN[0, 0, 0, 0] = np.nan
V2_BAD = {
    "malformed json": (b'{"inputs": [', {}, 400, "JSON"),
    "empty body": (b"", {}, 400, "empty"),
    "wrong dtype": (*v2_binary(RED.astype(np.float64), "FP64"), 400, "FP64"),
    "wrong shape": (*v2_binary(normalised(solid("red", 32, 32))[:, :2]), 400, "[N, 3, H, W]"),
    "not a multiple": (*v2_binary(normalised(solid("red", 30, 32))), 400, "multiples of 32"),
    "truncated binary": (*v2_binary(RED, cut=5), 400, "truncated"),
    "huge image": (v2_json({"shape": [1, 3, 4096, 4096], "datatype": "FP32", "data": []}), {}, 413, "limit"),
    "nan": (*v2_binary(NAN), 400, "NaN"),
    "wrong input": (
        json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}).encode(),
        {},
        400,
        "'image'",
    ),
    "image bytes": (to_bytes(solid("red")), {}, 400, "JSON"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", V2_BAD)
def test_v2_bad_requests(http: httpx.Client, name: str) -> None:
    body, headers, status, words = V2_BAD[name]
    response = http.post("/v2/models/colours/infer", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    good_v2(http)


@pytest.mark.slow
def test_rest_bad_requests(http: httpx.Client) -> None:
    cases = {name: (body, {}, status) for name, (body, status) in BAD_BODIES.items()}
    cases["too wide for this server"] = (to_bytes(solid("red", 10, MAX_SIDE + 1)), {}, 413)
    cases["multipart"] = (b"--x\r\n", {"Content-Type": "multipart/form-data; boundary=x"}, 415)
    cases["unknown model"] = (b"", {}, 404)
    for name, (body, headers, status) in cases.items():
        route = "/v2/models/nope/infer" if name == "unknown model" else "/v1/segment"
        response = http.post(route, content=body, headers=headers)
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"], name
        good_v2(http)


@pytest.mark.slow
def test_auth(http: httpx.Client) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        response = http.post("/v1/segment", content=to_bytes(solid("red")), headers=headers)
        assert response.status_code == 401 and "token" in response.json()["error"]
        assert http.get("/v2/models/colours", headers=headers).status_code == 401
    for probe in ("/healthz", "/v2/health/live", "/v2/health/ready", "/"):
        assert http.get(probe, headers={"Authorization": ""}).status_code == 200, probe


@pytest.mark.slow
def test_answers_say_where_their_time_went(http: httpx.Client) -> None:
    """Server-Timing on v2 (FP32 and UINT8) and REST answers: every stage of the request, each a duration that
    fits inside what the client waited; `bench serve` builds its overhead profile from these."""
    pixels = np.zeros((1, 32, 32, 3), np.uint8)
    for body, headers in (v2_binary(RED), v2_binary(pixels, "UINT8")):
        began = time.perf_counter()
        response = http.post("/v2/models/colours/infer", content=body, headers=headers)
        waited_ms = (time.perf_counter() - began) * 1000
        assert response.status_code == 200, response.text
        stages = parse_server_timing(response.headers[HEADER])
        assert list(stages) == ["read", "parse", "prepare", "queue", "onnx", "respond"], stages
        assert all(ms >= 0 for ms in stages.values()) and stages["onnx"] > 0
        assert sum(stages.values()) <= waited_ms
    response = http.post("/v1/segment", content=to_bytes(solid("red")))
    assert list(parse_server_timing(response.headers[HEADER])) == ["read", "decode", "queue", "onnx", "respond"]


def test_server_timing_header_parses_as_the_w3c_grammar_allows() -> None:
    value = 'read;dur=0.041, cache;desc="hit", parse;desc="v2";dur=1.5,onnx;dur=7'
    assert parse_server_timing(value) == {"read": 0.041, "parse": 1.5, "onnx": 7.0}


def test_metrics_and_openapi(http: httpx.Client) -> None:
    http.post("/v1/segment", content=b"")
    good_v2(http)
    text = http.get("/metrics").text
    assert 'endoflow_request_seconds_count{route="/v1/segment",status="200"}' in text
    assert 'endoflow_request_errors_total{route="/v1/segment",status="400"}' in text
    assert "endoflow_batch_size_count" in text
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/segment", "/v1/overlay", "/v2/models/{name}/infer", "/healthz"} <= set(paths)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=200).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
        st.binary(max_size=200).map(lambda b: b"\xff\xd8\xff" + b),
    )
)
def test_fuzz_rest(http: httpx.Client, body: bytes) -> None:
    response = http.post("/v1/segment", content=body)
    assert response.status_code < 500 and (response.status_code == 200 or response.json()["error"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 70) | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["image", "x"]),
            "shape": st.one_of(st.lists(st.integers(0, 64), max_size=5), json_values),
            "datatype": st.sampled_from(["FP32", "UINT8", "INT8", "BYTES", "xx"]),
            "data": json_values,
        }
    )
)
def test_fuzz_v2(http: httpx.Client, spec: dict) -> None:
    response = http.post("/v2/models/colours/infer", content=json.dumps({"inputs": [spec]}))
    assert response.status_code < 500 and (response.status_code == 200 or response.json()["error"]), response.text


def test_provider_checks(model_file: Path) -> None:
    assert choose_providers("auto")[-1] == "CPUExecutionProvider"
    assert choose_providers("CPUExecutionProvider, CUDAExecutionProvider") == (
        "CPUExecutionProvider",
        "CUDAExecutionProvider",
    )
    with pytest.raises(RuntimeError, match="TensorrtExecutionProvider"):
        OnnxSegmenter(model_file, choose_providers("TensorrtExecutionProvider"))


@pytest.mark.slow
def test_moved_model_is_swapped_without_downtime(http: httpx.Client, model_file: Path) -> None:
    """Runs last in the module: replace the served file atomically; the replica's reload loop picks it up."""
    before = http.get("/healthz").json()["model"]["sha256"]
    replacement = save_model(
        model_file.with_name("next.onnx"), bias=BIAS + np.array([10, 0, 0, 0, 0, 0, 0], np.float32)
    )
    os.replace(replacement, model_file)
    deadline, seen_failures = time.monotonic() + 30, 0
    while http.get("/healthz").json()["model"]["sha256"] == before:
        seen_failures += http.post("/v1/segment", content=to_bytes(solid("red"))).status_code != 200
        assert time.monotonic() < deadline, "the moved model was not picked up within 30 s"
        time.sleep(0.2)
    assert seen_failures == 0
    labels = http.post("/v1/segment", params={"format": "json"}, content=to_bytes(solid("red"))).json()
    assert labels["areas"][0]["fraction"] == 1.0  # the new bias makes everything class 0
    assert "endoflow_model_reloads_total 1.0" in http.get("/metrics").text
