"""An unmodified Triton HTTP client (tritonclient.http) against the app's Open Inference Protocol v2 routes."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from conftest import CLASS_NAMES, COLOURS, normalised, save_model, serving, solid

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_url(ray_session, tmp_path_factory: pytest.TempPathFactory):
    with serving(save_model(tmp_path_factory.mktemp("v2") / "colours.onnx")) as url:
        yield url


def two_colours() -> np.ndarray:
    image = solid("red", 32, 64)
    image[:, 32:] = COLOURS["blue"]
    return image


def test_tritonclient_health_metadata_and_infer(base_url: str) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(base_url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("colours")
    meta = client.get_model_metadata("colours")
    assert meta["name"] == "colours" and meta["inputs"][0]["name"] == "image"
    version = meta["versions"][0]
    assert client.is_model_ready("colours", version)

    image = np.concatenate([normalised(two_colours()), normalised(solid("green", 32, 64))])
    for binary in (True, False):
        tensor = triton.InferInput("image", list(image.shape), "FP32")
        tensor.set_data_from_numpy(image, binary_data=binary)
        outputs = [triton.InferRequestedOutput("labels", binary_data=binary), triton.InferRequestedOutput("logits")]
        result = client.infer("colours", [tensor], model_version=version, outputs=outputs, request_id="r7")
        labels = result.as_numpy("labels")
        assert labels.dtype == np.uint8 and labels.shape == (2, 32, 64)
        assert (labels[0, :, :32] == 1).all() and (labels[0, :, 32:] == 3).all() and (labels[1] == 2).all()
        assert result.as_numpy("logits").shape == (2, len(CLASS_NAMES), 32, 64)
        assert result.get_response()["id"] == "r7"

    # Raw pixels (UINT8 NHWC) at any size; outputs come back at that size. No outputs named: all of them.
    pixels = triton.InferInput("image", [1, 20, 30, 3], "UINT8")
    pixels.set_data_from_numpy(solid("yellow", 20, 30)[None])
    result = client.infer("colours", [pixels])
    assert (result.as_numpy("labels") == 6).all() and result.as_numpy("entropy").shape == (1, 20, 30)

    with pytest.raises(triton.InferenceServerException, match="unknown model"):
        client.infer("absent", [tensor])
    wrong = triton.InferInput("image", [1, 3, 32, 64], "FP64")
    wrong.set_data_from_numpy(image[:1].astype(np.float64))
    with pytest.raises(triton.InferenceServerException, match="FP64"):
        client.infer("colours", [wrong])
    assert client.infer("colours", [tensor]).as_numpy("labels").shape == (2, 32, 64)


def test_uint8_pixels_and_fp32_give_the_same_labels(base_url: str) -> None:
    """Raw UINT8 RGB (normalised by the server) and the FP32 a client normalised itself: the same labels."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(base_url.removeprefix("http://"))
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (2, 32, 64, 3), dtype=np.uint8)  # at the model's input size: no resize
    fp32 = triton.InferInput("image", [2, 3, 32, 64], "FP32")
    fp32.set_data_from_numpy(np.concatenate([normalised(p) for p in pixels]))
    raw = triton.InferInput("image", [2, 32, 64, 3], "UINT8")
    raw.set_data_from_numpy(pixels)
    wanted = [triton.InferRequestedOutput("labels")]
    from_fp32 = client.infer("colours", [fp32], outputs=wanted).as_numpy("labels")
    from_uint8 = client.infer("colours", [raw], outputs=wanted).as_numpy("labels")
    assert len(np.unique(from_fp32)) > 3 and np.array_equal(from_uint8, from_fp32)
    assert "UINT8" in client.get_model_metadata("colours")["parameters"]["also_accepts"]


def test_v2_routes_over_plain_http(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        assert http.get("/v2/health/live").json() == {"live": True}
        assert http.get("/v2").json()["name"] == "endoflow"
        version = http.get("/v2/models/colours").json()["versions"][0]
        assert len(version) == 12 and version in http.get("/healthz").json()["model"]["sha256"]
        assert http.get(f"/v2/models/colours/versions/{version}/ready").status_code == 200
        missing = http.get("/v2/models/colours/versions/1")
        assert missing.status_code == 404 and "no version '1'" in missing.json()["error"]
        assert http.get("/v2/models/nope/ready").status_code == 404

        doc = {"inputs": [{"name": "image", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [0, 255, 0] * 4}]}
        doc["outputs"] = [{"name": "labels"}]
        answer = http.post("/v2/models/colours/infer", content=json.dumps(doc))
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
        assert answer.json()["outputs"] == [
            {"name": "labels", "datatype": "UINT8", "shape": [1, 2, 2], "data": [2] * 4}
        ]
