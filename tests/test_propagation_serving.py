"""Propagation served over HTTP: clip mode, stream sessions (HTTP and WebSocket), the session store's bound and
idle expiry, the three graphs as raw v2 models (tritonclient), against an untrained network exported by
training/propagate/export.py (torch only in this test). The hot reload of moved graphs: test_propagation_reload.py."""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from conftest import CLIP_SIZE as SIZE
from conftest import b64, clip, png_array, retrained, save_model, serving, to_bytes
from onnx import helper

from serving.errors import RequestError
from serving.propagation import OnnxPropagator, Stream
from serving.propagation_graphs import GRAPHS, resolve_graphs
from serving.sessions import SessionStore


def test_stream_matches_the_reference_loop(graphs_dir: Path) -> None:
    """serving's numpy Stream = training's propagate() over the same ONNX graphs, frame for frame."""
    from training.propagate.export import OnnxBackend, load_graphs
    from training.propagate.inference import MemoryPolicy, propagate

    frames, mask = clip(7)
    expected, _ = propagate(OnnxBackend(load_graphs(graphs_dir)), frames, mask, MemoryPolicy(mem_every=2, max_memory=3))
    model = OnnxPropagator(resolve_graphs(str(graphs_dir)))
    stream = Stream(model, frames[0], mask)
    assert stream.objects == [1, 3]
    got = np.stack([mask, *[stream.step(f) for f in frames[1:]]])
    assert np.array_equal(got, expected)
    assert len(stream.memory) == 3  # key frame + frames 2, 4, 6 capped at max_memory = 3
    assert model.metadata.previous_frame and stream.previous is None  # frame 6 was kept, so no temporary entry
    stream = Stream(model, frames[0], mask)
    stream.step(frames[1])
    assert stream.previous is not None and len(stream.memory) == 1  # frame 1: read by frame 2, not kept
    with pytest.raises(RequestError, match="must match"):
        Stream(model, frames[0], mask[:32])


def test_graphs_exported_before_previous_frame_stream_without_it(graphs_dir: Path, tmp_path: Path) -> None:
    """endoflow.memory without previous_frame (older exports): the stream reads only the kept frames."""
    from training.propagate.export import OnnxBackend, load_graphs
    from training.propagate.inference import MemoryPolicy, propagate

    old = tmp_path / "old"
    old.mkdir()
    for graph in GRAPHS:
        model = onnx.load(str(graphs_dir / f"propagation.{graph}.onnx"))
        props = {p.key: p.value for p in model.metadata_props}
        memory = json.loads(props["endoflow.memory"])
        assert memory.pop("previous_frame") is True
        helper.set_model_props(model, props | {"endoflow.memory": json.dumps(memory)})
        onnx.save_model(model, str(old / f"propagation.{graph}.onnx"))
    frames, mask = clip(7)
    policy = MemoryPolicy(mem_every=2, max_memory=3, previous_frame=False)
    expected, _ = propagate(OnnxBackend(load_graphs(graphs_dir)), frames, mask, policy)
    model = OnnxPropagator(resolve_graphs(str(old)))
    assert model.metadata.previous_frame is False
    stream, got = Stream(model, frames[0], mask), [mask]
    for frame in frames[1:]:
        got.append(stream.step(frame))
        assert stream.previous is None
    assert np.array_equal(np.stack(got), expected)


def test_min_area_in_the_metadata_streams_as_the_reference_loop(graphs_dir: Path, tmp_path: Path) -> None:
    """endoflow.memory's min_area (0 when absent, as in older exports): serving drops the objects under it exactly
    as training's propagate() does."""
    from training.propagate.export import OnnxBackend, load_graphs
    from training.propagate.inference import MemoryPolicy, propagate

    min_area = 0.3  # large enough that this untrained net loses an object somewhere
    for folder, bound in (("old", None), ("bounded", min_area), ("whole_frame", 1.5)):
        (tmp_path / folder).mkdir()
        for graph in GRAPHS:
            model = onnx.load(str(graphs_dir / f"propagation.{graph}.onnx"))
            props = {p.key: p.value for p in model.metadata_props}
            memory = {k: v for k, v in json.loads(props["endoflow.memory"]).items() if k != "min_area"}
            memory |= {} if bound is None else {"min_area": bound}
            helper.set_model_props(model, props | {"endoflow.memory": json.dumps(memory)})
            onnx.save_model(model, str(tmp_path / folder / f"propagation.{graph}.onnx"))
    assert OnnxPropagator(resolve_graphs(str(tmp_path / "old"))).metadata.min_area == 0.0
    with pytest.raises(ValueError, match=r"whole_frame.*min_area 1.5: expected a fraction of the frame in \[0, 1\)"):
        OnnxPropagator(resolve_graphs(str(tmp_path / "whole_frame")))
    frames, mask = clip(7)
    policy = MemoryPolicy(mem_every=2, max_memory=3, min_area=min_area)
    expected, _ = propagate(OnnxBackend(load_graphs(graphs_dir)), frames, mask, policy)
    plain, _ = propagate(OnnxBackend(load_graphs(graphs_dir)), frames, mask, policy.model_copy(update={"min_area": 0}))
    assert not np.array_equal(expected, plain)
    model = OnnxPropagator(resolve_graphs(str(tmp_path / "bounded")))
    assert model.metadata.min_area == min_area
    stream = Stream(model, frames[0], mask)
    assert np.array_equal(np.stack([mask, *[stream.step(f) for f in frames[1:]]]), expected)


def test_graphs_of_two_exports_are_refused(graphs_dir: Path, tmp_path: Path) -> None:
    """What a reload sees while a registry's three aliases move one by one: it must not serve that mix."""
    mixed = retrained(graphs_dir, tmp_path / "mixed", "run-2")
    for graph in ("encode_value", "segment"):
        shutil.copy(graphs_dir / f"propagation.{graph}.onnx", mixed)
    with pytest.raises(ValueError, match=r"not graphs of one export.*endoflow.source_run_id"):
        OnnxPropagator(resolve_graphs(str(mixed)))
    first = OnnxPropagator(resolve_graphs(str(graphs_dir)))
    second = OnnxPropagator(resolve_graphs(str(retrained(graphs_dir, tmp_path / "next", "run-2"))))
    assert first.name == second.name == "propagation" and first.version != second.version
    assert set(first.v2_models) == {"propagation-encode_key", "propagation-encode_value", "propagation-segment"}


def test_session_store_bound_and_expiry() -> None:
    now = [0.0]
    store = SessionStore(max_sessions=2, idle_timeout_s=10, clock=lambda: now[0])
    first, _ = store.add("a"), store.add("b")
    with pytest.raises(RequestError, match="limit is 2") as info:
        store.add("c")
    assert info.value.status == 429
    now[0] = 8.0
    assert store.get(first.id).stream == "a"  # touching it keeps it alive
    now[0] = 15.0
    assert store.expire() == 1 and len(store) == 1  # "b" idled out
    store.add("c")
    store.close(first.id)
    with pytest.raises(RequestError, match="no open session") as info:
        store.get(first.id)
    assert info.value.status == 404


@pytest.fixture(scope="module")
def base_url(ray_session, graphs_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    segmenter = save_model(tmp_path_factory.mktemp("seg") / "colours.onnx")
    options = {"propagation_model": str(graphs_dir), "limits": {"max_sessions": 2, "max_frames": 8}}
    with serving(segmenter, session_idle_timeout_s=3.0, **options) as url:
        yield url


@pytest.mark.slow
def test_clip_http_stream_and_websocket_agree(base_url: str) -> None:
    from websockets.sync.client import connect

    frames, mask = clip(5)
    pngs = [to_bytes(f) for f in frames]
    with httpx.Client(base_url=base_url, timeout=60) as http:
        answer = http.post("/v1/propagate/clip", json={"frames": [b64(p) for p in pngs], "mask": b64(to_bytes(mask))})
        assert answer.status_code == 200, answer.text
        from_clip = [png_array(base64.b64decode(m)) for m in answer.json()["masks"]]
        assert len(from_clip) == 5 and np.array_equal(from_clip[0], mask) and from_clip[1].shape == (SIZE, SIZE)

        opened = http.post("/v1/propagate/sessions", json={"frame": b64(pngs[0]), "mask": b64(to_bytes(mask))})
        assert opened.status_code == 201 and opened.json()["objects"] == [1, 3]
        session, route = opened.json()["session"], opened.json()["headers"]
        for t in range(1, 5):
            step = http.post(f"/v1/propagate/sessions/{session}/frames", content=pngs[t], headers=route)
            assert step.status_code == 200 and np.array_equal(png_array(step.content), from_clip[t]), t
        assert http.delete(f"/v1/propagate/sessions/{session}").status_code == 200
        gone = http.post(f"/v1/propagate/sessions/{session}/frames", content=pngs[1])
        assert gone.status_code == 404 and "no open session" in gone.json()["error"]

    with connect(base_url.replace("http", "ws") + "/v1/propagate/stream", open_timeout=30) as socket:
        socket.send(json.dumps({"frame": b64(pngs[0]), "mask": b64(to_bytes(mask))}))
        assert json.loads(socket.recv(timeout=30))["objects"] == [1, 3]
        socket.send(b"not an image")
        assert "not a PNG or JPEG" in json.loads(socket.recv(timeout=30))["error"]
        for t in range(1, 5):
            socket.send(pngs[t])
            assert np.array_equal(png_array(socket.recv(timeout=30)), from_clip[t]), t


@pytest.mark.slow
def test_sessions_are_bounded_and_expire(base_url: str) -> None:
    frames, mask = clip(2)
    opening = {"frame": b64(to_bytes(frames[0])), "mask": b64(to_bytes(mask))}
    with httpx.Client(base_url=base_url, timeout=60) as http:
        ids = [http.post("/v1/propagate/sessions", json=opening).json()["session"] for _ in range(2)]
        full = http.post("/v1/propagate/sessions", json=opening)
        assert full.status_code == 429 and "limit is 2" in full.json()["error"]
        time.sleep(3.5)  # idle timeout 3 s
        assert http.post(f"/v1/propagate/sessions/{ids[0]}/frames", content=to_bytes(frames[1])).status_code == 404
        assert http.post("/v1/propagate/sessions", json=opening).status_code == 201


@pytest.mark.slow
def test_propagation_bad_requests(base_url: str) -> None:
    frames, mask = clip(2)
    frame = b64(to_bytes(frames[0]))
    rgb_mask = b64(to_bytes(np.stack([mask] * 3, axis=-1)))
    bad_label = mask.copy()
    bad_label[0, 0] = 200
    cases = [
        ({"frame": frame}, 400, "mask"),
        ({"frame": frame, "mask": rgb_mask}, 400, "single-channel"),
        ({"frame": frame, "mask": b64(to_bytes(bad_label))}, 400, "label 200"),
        ({"frame": frame, "mask": "%%%"}, 400, "base64"),
        ({"frame": frame, "mask": b64(to_bytes(mask[:10]))}, 400, "must match"),
    ]
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for doc, status, words in cases:
            response = http.post("/v1/propagate/sessions", json=doc)
            assert response.status_code == status and words in response.json()["error"], response.text
        too_long = http.post("/v1/propagate/clip", json={"frames": [frame] * 9, "mask": b64(to_bytes(mask))})
        assert too_long.status_code == 413 and "limit is 8" in too_long.json()["error"]
        assert http.post("/v1/propagate/clip", content=b"{").status_code == 400
        ok = http.post("/v1/propagate/clip", json={"frames": [frame] * 2, "mask": b64(to_bytes(mask))})
        assert ok.status_code == 200


@pytest.mark.slow
def test_graphs_as_v2_models_run_a_stream_client_side(base_url: str, graphs_dir: Path) -> None:
    """tritonclient alone runs the contract's loop (key frame, then one frame) on the served graphs, and every
    tensor matches onnxruntime in-process on the same files; metadata is the graphs' own inputs and outputs."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(base_url.removeprefix("http://"))
    local = OnnxPropagator(resolve_graphs(str(graphs_dir)))
    version = httpx.get(f"{base_url}/healthz").json()["propagation"]["version"]
    assert version == local.version
    for graph in GRAPHS:
        meta = client.get_model_metadata(f"propagation-{graph}")
        assert meta["versions"] == [version] and client.is_model_ready(f"propagation-{graph}", version)
        session = local.sessions[graph]
        for listed, nodes in ((meta["inputs"], session.get_inputs()), (meta["outputs"], session.get_outputs())):
            assert [(t["name"], t["datatype"]) for t in listed] == [(n.name, "FP32") for n in nodes]
            assert [t["shape"] for t in listed] == [[d if isinstance(d, int) else -1 for d in n.shape] for n in nodes]

    def infer(graph: str, tensors: dict[str, np.ndarray], binary: bool) -> dict[str, np.ndarray]:
        inputs = []
        for name, array in tensors.items():
            inputs.append(triton.InferInput(name, list(array.shape), "FP32"))
            inputs[-1].set_data_from_numpy(array, binary_data=binary)
        names = [node.name for node in local.sessions[graph].get_outputs()]
        outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in names]
        result = client.infer(f"propagation-{graph}", inputs, model_version=version, outputs=outputs)
        return {name: result.as_numpy(name) for name in names}

    def same(served: dict[str, np.ndarray], expected: list[np.ndarray]) -> None:
        assert [a.shape for a in served.values()] == [e.shape for e in expected]
        for got, want in zip(served.values(), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    frames, mask = clip(2)
    objects = [1, 3]
    masks = np.stack([mask == o for o in objects])[:, None].astype(np.float32)
    first, second = local.prepare(frames[0]), local.prepare(frames[1])
    keyed = infer("encode_key", {"image": first}, binary=False)  # all-JSON request and response
    same(keyed, local.encode_key(first))
    value = infer("encode_value", {"image": first, "f16": keyed["f16"], "masks": masks}, binary=True)
    same(value, [local.encode_value(first, keyed["f16"], masks)])
    query = infer("encode_key", {"image": second}, binary=True)
    same(query, local.encode_key(second))
    memory = {"memory_keys": keyed["key"], "memory_values": value["value"][:, None]}  # T = 1 frame in memory
    probs = infer("segment", query | memory, binary=True)["probs"]
    same({"probs": probs}, [local.segment(*query.values(), *memory.values())])
    labels = np.array([0, *objects], np.uint8)[probs[0].argmax(0)]
    assert (labels == Stream(local, frames[0], mask).step(frames[1])).mean() > 0.99  # the server-side stream


@pytest.mark.slow
def test_graph_image_inputs_take_uint8_pixels(base_url: str, graphs_dir: Path) -> None:
    """encode_key and encode_value take raw UINT8 RGB frames as well, normalised by the server as the contract says."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(base_url.removeprefix("http://"))
    local = OnnxPropagator(resolve_graphs(str(graphs_dir)))
    frames, mask = clip(1)
    names = [node.name for node in local.sessions["encode_key"].get_outputs()]
    pixels = triton.InferInput("image", [1, SIZE, SIZE, 3], "UINT8")
    pixels.set_data_from_numpy(frames[:1])
    result = client.infer("propagation-encode_key", [pixels])
    for name, want in zip(names, local.encode_key(local.prepare(frames[0])), strict=True):
        np.testing.assert_allclose(result.as_numpy(name), want, rtol=1e-4, atol=1e-5)
    for graph, accepts in (("encode_key", True), ("encode_value", True), ("segment", False)):
        parameters = client.get_model_metadata(f"propagation-{graph}")["parameters"]
        assert ("also_accepts" in parameters) == accepts, (graph, parameters)
    wrong = triton.InferInput("image", [1, 3, SIZE, SIZE], "UINT8")
    wrong.set_data_from_numpy(frames[:1].transpose(0, 3, 1, 2).copy())
    with pytest.raises(triton.InferenceServerException, match=r"\[N, H, W, 3\]"):
        client.infer("propagation-encode_key", [wrong])


@pytest.mark.slow
def test_graph_v2_mistakes_are_400_naming_the_input(base_url: str) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(base_url.removeprefix("http://"))
    image = np.zeros((1, 3, SIZE, SIZE), np.float32)
    for name, array, datatype, words in [
        ("img", image, "FP32", "missing ['image'], unknown ['img']"),
        ("image", image.astype(np.float64), "FP64", "input 'image' must be FP32, got FP64"),
    ]:
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        with pytest.raises(triton.InferenceServerException, match=re.escape(words)) as info:
            client.infer("propagation-encode_key", [tensor])
        assert info.value.status() == "400"

    def spec(name: str, shape: list[int]) -> dict:
        return {"name": name, "shape": shape, "datatype": "FP32", "data": [0.0] * int(np.prod(shape))}

    s = SIZE // 16
    cases = [
        ("encode_key", [spec("image", [3, SIZE, SIZE])], None, "rank 4"),
        ("encode_key", [spec("image", [1, 3, 40, SIZE])], None, "'16*h16'"),  # not a multiple of the key stride
        ("encode_key", [spec("image", [1, 4, SIZE, SIZE])], None, "(axis 1)"),
        ("encode_key", [spec("image", [1, 3, SIZE, SIZE])], [{"name": "labels"}], "unknown outputs ['labels']"),
        (  # each input fine alone, but f16 is not the image's size / 16: only onnxruntime finds out
            "encode_value",
            [spec("image", [1, 3, SIZE, SIZE]), spec("f16", [1, 24, s - 1, s]), spec("masks", [1, 1, SIZE, SIZE])],
            None,
            "do not fit",
        ),
    ]
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for graph, inputs, outputs, words in cases:
            doc = {"inputs": inputs} | ({"outputs": outputs} if outputs else {})
            answer = http.post(f"/v2/models/propagation-{graph}/infer", content=json.dumps(doc))
            assert answer.status_code == 400 and words in answer.json()["error"], (words, answer.text)
        old = http.post("/v2/models/propagation-segment/versions/000000000000/infer", content=b"{}")
        assert old.status_code == 404 and "no version" in old.json()["error"]
        absent = http.get("/v2/models/propagation-decode")
        assert absent.status_code == 404 and "propagation-segment" in absent.json()["error"]
        colours = http.get("/v2/models/colours").json()  # the segmentation model's v2 face is unchanged
        assert [t["name"] for t in colours["inputs"]] == ["image"] and len(colours["outputs"]) == 3
        ok = http.post("/v2/models/propagation-encode_key/infer", content=json.dumps({"inputs": cases[3][1]}))
        assert ok.status_code == 200 and [o["name"] for o in ok.json()["outputs"]] == ["key", "f16", "f8", "f4"]
