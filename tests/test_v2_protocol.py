"""Open Inference Protocol v2 codec (serving/v2.py), a raw ONNX graph as a v2 model (serving/raw_model.py) and RLE
(serving/rle.py): no server."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from serving import rle, v2
from serving.errors import RequestError
from serving.raw_model import RawOnnxModel

MAX = 10_000


def binary_body(arrays: dict[str, np.ndarray], outputs: list[dict] | None = None) -> tuple[bytes, str]:
    inputs = [
        {"name": n, "shape": list(a.shape), "datatype": v2.datatype_of(a), "parameters": {"binary_data_size": a.nbytes}}
        for n, a in arrays.items()
    ]
    doc = {"inputs": inputs} | ({"outputs": outputs} if outputs is not None else {})
    header = json.dumps(doc).encode()
    return header + b"".join(a.tobytes() for a in arrays.values()), str(len(header))


def test_json_and_binary_inputs_round_trip() -> None:
    image = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    flags = np.array([True, False, True])
    body, length = binary_body(
        {"image": image, "flags": flags}, [{"name": "labels", "parameters": {"binary_data": True}}]
    )
    request = v2.parse_request(body, length, MAX)
    assert np.array_equal(request.inputs["image"], image) and np.array_equal(request.inputs["flags"], flags)
    assert request.outputs == ["labels"] and request.binary_outputs == {"labels"}

    doc = {"id": "q1", "inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]}]}
    request = v2.parse_request(json.dumps(doc).encode(), None, MAX)
    assert request.id == "q1" and request.outputs is None and request.inputs["x"].dtype == np.int64
    assert request.inputs["x"].tolist() == [[1, 2], [3, 4]]


def test_response_binary_and_json() -> None:
    labels = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    logits = np.ones((1, 2), dtype=np.float32)
    request = v2.InferRequest(id="r", inputs={}, outputs=None, binary_outputs={"labels"})
    body, length = v2.encode_response("m", "v", request, {"labels": labels, "logits": logits})
    assert length is not None
    header = json.loads(body[:length])
    assert header["id"] == "r" and header["model_name"] == "m"
    assert header["outputs"][0] == {
        "name": "labels",
        "datatype": "UINT8",
        "shape": [2, 2],
        "parameters": {"binary_data_size": 4},
    }
    assert header["outputs"][1]["data"] == [1.0, 1.0]
    assert np.array_equal(np.frombuffer(body[length:], np.uint8).reshape(2, 2), labels)
    plain, none = v2.encode_response("m", "v", v2.InferRequest(None, {}, None), {"logits": logits})
    assert none is None and json.loads(plain)["outputs"][0]["datatype"] == "FP32"


BAD = {
    "empty": (b"", None, "empty body"),
    "not json": (b"\x89PNG....", None, "not valid JSON"),
    "no inputs": (b'{"inputs": []}', None, 'non-empty "inputs"'),
    "bad shape": (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}', None, "shape"),
    "bad dtype": (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP33", "data": [1]}]}', None, "FP33"),
    "count": (b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}', None, "needs 3"),
    "strings": (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": ["a"]}]}', None, "INT32"),
    "no data": (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}', None, "neither"),
    "too big": (b'{"inputs": [{"name": "x", "shape": [100000], "datatype": "FP32", "data": []}]}', None, "limit"),
    "header length": (b'{"inputs": []}', "999", "Inference-Header-Content-Length"),
}


@pytest.mark.parametrize("name", BAD)
def test_malformed_requests_name_the_problem(name: str) -> None:
    body, length, words = BAD[name]
    with pytest.raises(RequestError, match=words) as info:
        v2.parse_request(body, length, MAX)
    assert 400 <= info.value.status < 500


def test_truncated_and_trailing_binary() -> None:
    body, length = binary_body({"image": np.zeros((2, 3), np.float32)})
    with pytest.raises(RequestError, match="truncated"):
        v2.parse_request(body[:-1], length, MAX)
    with pytest.raises(RequestError, match="not claimed"):
        v2.parse_request(body + b"x", length, MAX)
    doc = json.loads(body[: int(length)])
    doc["inputs"][0]["parameters"]["binary_data_size"] = 7
    header = json.dumps(doc).encode()
    with pytest.raises(RequestError, match="binary_data_size 7"):
        v2.parse_request(header + bytes(24), str(len(header)), MAX)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hnp.arrays(
        st.sampled_from([np.float32, np.uint8, np.int64, np.float16, np.bool_]),
        hnp.array_shapes(min_dims=1, max_dims=4, max_side=5),
    ),
    st.booleans(),
)
def test_fuzz_round_trip(array: np.ndarray, binary: bool) -> None:
    """Any tensor survives request parsing and response encoding, binary or JSON."""
    if binary:
        body, length = binary_body({"t": array})
    else:
        doc = {
            "inputs": [
                {
                    "name": "t",
                    "shape": list(array.shape),
                    "datatype": v2.datatype_of(array),
                    "data": array.ravel().tolist(),
                }
            ]
        }
        body, length = json.dumps(doc).encode(), None
    parsed = v2.parse_request(body, length, MAX).inputs["t"]
    assert parsed.dtype == array.dtype and np.array_equal(parsed, array, equal_nan=True)
    request = v2.InferRequest(None, {}, None, binary_default=binary)
    out, out_length = v2.encode_response("m", "1", request, {"t": array})
    header = json.loads(out[:out_length] if binary else out)["outputs"][0]
    back = np.frombuffer(out[out_length:], array.dtype) if binary else np.asarray(header["data"], array.dtype)
    assert np.array_equal(back.reshape(header["shape"]), array, equal_nan=True)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(-5, 400).map(str), st.text(max_size=5)))
def test_fuzz_garbage_is_a_4xx_never_a_crash(body: bytes, length: str | None) -> None:
    try:
        v2.parse_request(body, length, MAX)
    except RequestError as err:
        assert 400 <= err.status < 500 and err.message


def raw_graph(extra_input: bool = False) -> bytes:
    """doubled = 2 * x (FP32 [N, '4*k']), same = ids (INT64 [2]); optionally an input v2 has no datatype for."""
    from onnx import TensorProto, helper, numpy_helper

    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "4*k"]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, [2]),
    ]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("names", TensorProto.STRING, [1]))
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["doubled"]), helper.make_node("Identity", ["ids"], ["same"])],
        "raw",
        inputs,
        [
            helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["N", "4*k"]),
            helper.make_tensor_value_info("same", TensorProto.INT64, [2]),
        ],
        [numpy_helper.from_array(np.array(2, np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_raw_model_metadata_infer_and_mistakes() -> None:
    import onnxruntime as ort

    model = RawOnnxModel("raw", "abc", ort.InferenceSession(raw_graph()), {"graph": "raw"})
    meta = model.metadata()
    assert meta["name"] == "raw" and meta["versions"] == ["abc"] and meta["parameters"] == {"graph": "raw"}
    assert meta["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, -1]},
        {"name": "ids", "datatype": "INT64", "shape": [2]},
    ]
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [("doubled", "FP32"), ("same", "INT64")]

    x, ids = np.arange(8, dtype=np.float32).reshape(1, 8), np.array([3, 4], np.int64)
    out = model.infer({"x": x, "ids": ids}, None)
    assert np.array_equal(out["doubled"], 2 * x) and np.array_equal(out["same"], ids)
    assert list(model.infer({"x": x, "ids": ids}, ["same"])) == ["same"]

    mistakes = [
        ({"x": x}, None, "missing ['ids']"),
        ({"x": x, "ids": ids, "y": x}, None, "unknown ['y']"),
        ({"x": x.astype(np.float64), "ids": ids}, None, "'x' must be FP32, got FP64"),
        ({"x": x[0], "ids": ids}, None, "rank 2"),
        ({"x": x[:, :6], "ids": ids}, None, "'4*k'"),  # 6 is not a multiple of 4
        ({"x": x, "ids": np.arange(3)}, None, "(axis 0)"),
        ({"x": x, "ids": ids}, ["tripled"], "unknown outputs ['tripled']"),
    ]
    for inputs, wanted, words in mistakes:
        with pytest.raises(RequestError, match=re.escape(words)) as info:
            model.infer(inputs, wanted)
        assert info.value.status == 400 and info.value.message.startswith("raw: ")
    with pytest.raises(ValueError, match="'names' is tensor\\(string\\)"):
        RawOnnxModel("raw", "abc", ort.InferenceSession(raw_graph(extra_input=True)))


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.bool_, hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=12)))
def test_rle_round_trip(mask: np.ndarray) -> None:
    encoded = rle.encode(mask)
    assert encoded["size"] == list(mask.shape) and sum(encoded["counts"]) == mask.size
    assert all(c > 0 for c in encoded["counts"][1:])
    assert np.array_equal(rle.decode(encoded), mask)


def test_rle_is_column_major_starting_with_zeros() -> None:
    mask = np.array([[1, 0], [1, 1]], dtype=bool)
    assert rle.encode(mask)["counts"] == [0, 2, 1, 1]
