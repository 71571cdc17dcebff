"""Open Inference Protocol v2 (KServe / Triton HTTP) tensors: request bodies -> numpy, numpy -> response bodies.

Pure numpy, no web framework. A body is either plain JSON, or JSON followed by raw tensor bytes when the
`Inference-Header-Content-Length` header gives the JSON's length; a binary input declares its byte count in
`parameters.binary_data_size`, and inputs' bytes follow the JSON in input order (little-endian, row-major).
Responses mirror this: an output asked for with `parameters.binary_data: true` (or all of them with the
request parameter `binary_data_output: true`) travels as bytes after the JSON.
Every malformed request raises RequestError(400, ...) naming the input and what was expected.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.errors import RequestError

HEADER_LENGTH = "inference-header-content-length"
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # None: every output
    binary_outputs: set[str] = field(default_factory=set)
    binary_default: bool = False


def datatype_of(array: np.ndarray) -> str:
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype not in _NAMES:
        raise ValueError(f"no v2 datatype for numpy {array.dtype}")
    return _NAMES[dtype]


def parse_request(body: bytes, header_length: str | None, max_elements: int) -> InferRequest:
    """Body bytes (+ the Inference-Header-Content-Length header, if any) -> InferRequest, or RequestError 400."""
    if not body:
        raise RequestError(400, "empty body: send a v2 inference request (JSON)")
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise RequestError(
                400,
                f"Inference-Header-Content-Length {header_length!r} is not a length within the {len(body)}-byte body",
            )
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        doc = json.loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"request header is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise RequestError(400, 'expected a JSON object with a non-empty "inputs" list')

    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for position, spec in enumerate(doc["inputs"]):
        name, array, used = _parse_input(spec, position, binary, offset, max_elements)
        if name in inputs:
            raise RequestError(400, f"input {name!r} is given twice")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise RequestError(400, f"{len(binary) - offset} bytes after the binary inputs are not claimed by any input")

    params = _params(doc, "request")
    outputs, binary_outputs = None, set()
    if "outputs" in doc:
        if not isinstance(doc["outputs"], list) or not all(isinstance(o, dict) for o in doc["outputs"]):
            raise RequestError(400, '"outputs" must be a list of objects with a "name"')
        outputs = []
        for spec in doc["outputs"]:
            if not isinstance(spec.get("name"), str):
                raise RequestError(400, 'every entry of "outputs" needs a string "name"')
            outputs.append(spec["name"])
            if _params(spec, f"output {spec['name']!r}").get("binary_data") is True:
                binary_outputs.add(spec["name"])
    request_id = doc.get("id")
    return InferRequest(
        id=request_id if isinstance(request_id, str) else None,
        inputs=inputs,
        outputs=outputs,
        binary_outputs=binary_outputs,
        binary_default=params.get("binary_data_output") is True,
    )


def _params(spec: dict, what: str) -> dict:
    params = spec.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError(400, f"{what}: parameters must be a JSON object")
    return params


def _parse_input(
    spec: Any, position: int, binary: bytes, offset: int, max_elements: int
) -> tuple[str, np.ndarray, int]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise RequestError(400, f"inputs[{position}] needs a string 'name'")
    name = spec["name"]
    shape, datatype = spec.get("shape"), spec.get("datatype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(400, f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    if datatype not in DATATYPES:
        raise RequestError(
            400, f"input {name!r}: datatype {datatype!r} is not supported; use one of {sorted(DATATYPES)}"
        )
    count = math.prod(shape)
    if count > max_elements:
        raise RequestError(413, f"input {name!r} has {count} elements; the limit is {max_elements}")
    dtype = DATATYPES[datatype]
    size = _params(spec, f"input {name!r}").get("binary_data_size")
    if size is not None:
        if "data" in spec:
            raise RequestError(400, f"input {name!r} has both 'data' and binary_data_size")
        expected = count * dtype.itemsize
        if size != expected:
            raise RequestError(
                400, f"input {name!r}: binary_data_size {size} != {expected} bytes for {datatype} {shape}"
            )
        if offset + size > len(binary):
            raise RequestError(
                400, f"input {name!r}: binary data truncated ({len(binary) - offset} of {size} bytes present)"
            )
        array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
        return name, array, size
    if "data" not in spec:
        raise RequestError(400, f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    try:
        array = np.asarray(spec["data"], dtype=dtype)
    except (ValueError, TypeError, OverflowError) as err:
        raise RequestError(400, f"input {name!r}: data is not a {datatype} array: {err}") from err
    if array.size != count:
        raise RequestError(400, f"input {name!r}: {array.size} values in 'data' but shape {shape} needs {count}")
    return name, array.reshape(shape), 0


def encode_response(
    model_name: str, model_version: str, request: InferRequest, outputs: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """-> (body, JSON length for Inference-Header-Content-Length, or None when the body is plain JSON)."""
    described, blobs = [], []
    for name, array in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if request.binary_default or name in request.binary_outputs:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": described}
    if request.id is not None:
        doc["id"] = request.id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def tensor_metadata(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}
