"""Serving without torch: a hand-built ONNX model whose answer is known (tests/conftest.py), from codec to HTTP.

The model is a 1x1 Conv 3->7 with fixed weights: with mean = std = 0.5 a saturated colour normalises to +-1
per channel, and each class's weight row is the +-1 pattern of "its" colour, so that colour scores 3 there
and at most 1 anywhere else. Mid grey normalises to ~0 and falls to the bias of class 0 (void).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from conftest import (
    BAD_BODIES,
    CLASS_NAMES,
    COLOURS,
    INPUT_SIZE,
    make_model,
    metadata_props,
    save_model,
    solid,
    to_bytes,
)
from PIL import Image

from pipelines.local_ray import free_port
from serving.codec import decode_image, encode_png, make_palette, overlay
from serving.errors import RequestError
from serving.onnx_model import OnnxSegmenter, argmax_classes
from serving.resolve import model_sha256, resolve_model

# ---- codec ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_BODIES)
def test_decode_rejects_bad_bodies(name: str) -> None:
    body, status = BAD_BODIES[name]
    with pytest.raises(RequestError) as info:
        decode_image(body)
    assert info.value.status == status and info.value.message


def test_decode_limits() -> None:
    with pytest.raises(RequestError, match="limit") as info:
        decode_image(to_bytes(solid("red")), max_bytes=10)
    assert info.value.status == 413
    with pytest.raises(RequestError, match="70x50") as info:
        decode_image(to_bytes(solid("red")), max_side=64)
    assert info.value.status == 413


def test_decode_png_jpeg_and_odd_modes() -> None:
    image = solid("yellow")
    assert np.array_equal(decode_image(to_bytes(image)), image)
    jpeg = decode_image(to_bytes(image, "JPEG"))
    assert jpeg.shape == (50, 70, 3) and np.abs(jpeg.astype(int) - image).max() < 8
    grey = decode_image(to_bytes(np.full((5, 6), 9, dtype=np.uint8)))
    assert grey.shape == (5, 6, 3) and grey.dtype == np.uint8
    rgba = decode_image(to_bytes(np.zeros((5, 6, 4), dtype=np.uint8)))
    assert rgba.shape == (5, 6, 3)


def test_encode_png_and_overlay() -> None:
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4) % 7
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(labels)))), labels)
    palette = make_palette(7)
    assert palette.shape == (7, 3) and len({tuple(c) for c in palette}) == 7
    image = solid("white", 3, 4)
    assert np.array_equal(overlay(image, labels, palette, alpha=0.0), image)
    assert np.array_equal(overlay(image, labels, palette, alpha=1.0), palette[labels])
    with pytest.raises(ValueError, match="palette"):
        overlay(image, labels, palette[:3])


# ---- model ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["endoflow.task", "endoflow.class_names", "endoflow.input_size", "endoflow.normalization"]
)
def test_missing_metadata_names_file_and_key(tmp_path: Path, key: str) -> None:
    props = metadata_props()
    del props[key]
    path = save_model(tmp_path / "model.onnx", props)
    with pytest.raises(ValueError, match=f"{tmp_path}.*'{key}' is missing"):
        OnnxSegmenter(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("endoflow.task", "classification"),
        ("endoflow.class_names", "not json"),
        ("endoflow.input_size", "[32]"),
        ("endoflow.normalization", '{"mean": [0.5, 0.5, 0.5], "std": [0.5, 0, 0.5]}'),
        ("endoflow.size_multiple", "48"),  # does not divide the input size
    ],
)
def test_invalid_metadata_names_key(tmp_path: Path, key: str, value: str) -> None:
    path = save_model(tmp_path / "model.onnx", metadata_props() | {key: value})
    with pytest.raises(ValueError, match=f"'{key}'.*invalid"):
        OnnxSegmenter(path)


def test_class_count_must_match_graph(tmp_path: Path) -> None:
    path = save_model(tmp_path / "model.onnx", metadata_props() | {"endoflow.class_names": '["a", "b"]'})
    with pytest.raises(ValueError, match="output classes is 7"):
        OnnxSegmenter(path)


def test_predicts_known_labels_at_original_size(model_path: Path) -> None:
    model = OnnxSegmenter(model_path, intra_op_threads=1)
    assert model.class_names == tuple(CLASS_NAMES) and model.input_size == (32, 64)
    images = np.stack([solid(name) for name in CLASS_NAMES])
    labels = model.predict(images)
    assert labels.shape == (7, 50, 70) and labels.dtype == np.uint8
    for index, name in enumerate(CLASS_NAMES):
        assert (labels[index] == index).all(), name

    half = solid("red", 45, 90)
    half[:, 45:] = COLOURS["blue"]
    labels = model.predict(half[None])[0]
    assert labels.shape == (45, 90)
    assert (labels[:, :40] == 1).all() and (labels[:, 50:] == 3).all()

    logits = model.logits(model.preprocess(half[None]))
    assert logits.shape == (1, 7, 32, 64) and logits.dtype == np.float32
    with pytest.raises(ValueError, match="multiples of 32"):
        model.logits(np.zeros((1, 3, 40, 64), dtype=np.float32))


def test_argmax_classes_matches_numpy_including_ties() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 7, 16, 24)).astype(np.float32)
    logits[:, 4] = logits[:, 2]  # exact ties: the first class wins, as with argmax
    logits[0, :, 0, 0] = 1.0  # all equal -> class 0
    expected = logits.argmax(axis=1)
    got = argmax_classes(logits)
    assert got.dtype == np.uint8 and got.shape == (2, 16, 24)
    assert np.array_equal(got, expected) and got[0, 0, 0] == 0 and (got != 4).all()


def test_unavailable_provider_raises(model_path: Path) -> None:
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        OnnxSegmenter(model_path, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))


# ---- resolve ----------------------------------------------------------------------------------------------


def test_resolve_path_dir_and_missing(tmp_path: Path, model_path: Path) -> None:
    by_file = resolve_model(model_path)
    assert by_file.path == model_path.resolve() and by_file.name == "model"
    assert by_file.sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()
    by_dir = resolve_model(tmp_path)
    assert (by_dir.path, by_dir.sha256, by_dir.ref) == (by_file.path, by_file.sha256, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_model(tmp_path / "nowhere.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        resolve_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.bin"):
        resolve_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="models:/seg"):
        resolve_model("models:/seg")


def test_sha256_covers_external_data(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save_model(make_model(), str(path), save_as_external_data=True, size_threshold=0, location="w.data")
    before = model_sha256(path)
    assert before != hashlib.sha256(path.read_bytes()).hexdigest()
    assert OnnxSegmenter(path).predict(solid("green")[None])[0][0, 0] == 2
    data = bytearray((tmp_path / "w.data").read_bytes())
    data[0] ^= 1
    (tmp_path / "w.data").write_bytes(bytes(data))
    assert model_sha256(path) != before


def test_resolve_registry_alias_and_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    import mlflow
    from mlflow import MlflowClient

    experiment = mlflow.create_experiment("serving-test", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.onnx.log_model(make_model(), name="model", registered_model_name="colours")
    MlflowClient().set_registered_model_alias("colours", "champion", info.registered_model_version)

    resolved = resolve_model("models:/colours@champion", cache_dir=tmp_path / "cache")
    assert resolved.name == "colours" and resolved.path.name == "model.onnx"
    assert resolved.path.is_relative_to(tmp_path / "cache")
    assert OnnxSegmenter(resolved.path).predict(solid("blue")[None])[0][0, 0] == 3
    assert resolve_model(f"models:/colours/{info.registered_model_version}").sha256 == resolved.sha256

    with pytest.raises(ValueError, match="models:/colours@nope"):
        resolve_model("models:/colours@nope")
    with pytest.raises(FileNotFoundError, match="models:/absent@champion"):
        resolve_model("models:/absent@champion")
    with pytest.raises(FileNotFoundError, match="models:/colours/9"):
        resolve_model("models:/colours/9")


# ---- HTTP through Ray Serve -------------------------------------------------------------------------------


MAX_HTTP_BODY = 1_000_000


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory: pytest.TempPathFactory):
    from ray import serve

    from serving.app import run_app

    path = save_model(tmp_path_factory.mktemp("served") / "model.onnx")
    port = free_port()
    run_app(str(path), port=port, host="127.0.0.1", max_body_bytes=MAX_HTTP_BODY)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        yield client
    serve.shutdown()


@pytest.mark.slow
def test_http_health_and_model(server: httpx.Client) -> None:
    health = server.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert len(health.json()["model"]["sha256"]) == 64
    info = server.get("/v1/model").json()
    assert info["class_names"] == CLASS_NAMES and info["input_size"] == INPUT_SIZE
    assert info["providers"] == ["CPUExecutionProvider"]


@pytest.mark.slow
def test_http_segment_png_json_and_overlay(server: httpx.Client) -> None:
    image = solid("green", 37, 53)
    image[:, 30:] = COLOURS["yellow"]
    response = server.post("/v1/segment", content=to_bytes(image))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    labels = np.asarray(Image.open(io.BytesIO(response.content)))
    assert labels.shape == (37, 53) and labels.dtype == np.uint8
    assert (labels[:, :25] == 2).all() and (labels[:, 35:] == 6).all()

    areas = server.post("/v1/segment", params={"format": "json"}, content=to_bytes(image, "JPEG")).json()
    assert (areas["height"], areas["width"]) == (37, 53)
    assert sum(a["pixels"] for a in areas["areas"]) == 37 * 53
    assert areas["areas"][2]["name"] == "green" and areas["areas"][2]["pixels"] > 25 * 37

    blend = server.post("/v1/overlay", params={"alpha": 0.25}, content=to_bytes(image))
    assert blend.status_code == 200
    assert np.asarray(Image.open(io.BytesIO(blend.content))).shape == (37, 53, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD_BODIES)
def test_http_bad_body_is_4xx_json_then_serves(server: httpx.Client, name: str) -> None:
    body, status = BAD_BODIES[name]
    for route in ("/v1/segment", "/v1/overlay"):
        response = server.post(route, content=body)
        assert response.status_code == status, response.text
        assert response.json()["error"]
    assert server.post("/v1/segment", content=to_bytes(solid("red"))).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "route", "params", "status"),
    [
        ("POST", "/v1/segment", {"format": "xml"}, 400),
        ("POST", "/v1/overlay", {"alpha": "2"}, 422),
        ("POST", "/v1/overlay", {"alpha": "half"}, 422),
        ("GET", "/v1/segment", {}, 405),
        ("GET", "/v2/nothing", {}, 404),
    ],
)
def test_http_bad_request_is_4xx_json(server: httpx.Client, method: str, route: str, params: dict, status: int):
    response = server.request(method, route, params=params, content=to_bytes(solid("red")))
    assert response.status_code == status and response.json()["error"]
    assert server.get("/healthz").status_code == 200


@pytest.mark.slow
def test_http_oversized_body_is_413(server: httpx.Client) -> None:
    response = server.post("/v1/segment", content=b"\x89PNG\r\n\x1a\n" + bytes(MAX_HTTP_BODY))
    assert response.status_code == 413 and "limit" in response.json()["error"]
    # Chunked upload: no Content-Length to refuse up front, so the streaming cap has to catch it.
    chunked = server.post("/v1/segment", content=iter([b"\x89PNG\r\n\x1a\n", bytes(MAX_HTTP_BODY)]))
    assert chunked.status_code == 413 and "limit" in chunked.json()["error"]
    assert server.post("/v1/segment", content=to_bytes(solid("red"))).status_code == 200
