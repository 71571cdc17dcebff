"""One ONNX graph as an Open Inference Protocol v2 model: the graph's own named tensors in and out, nothing more.

No pre- or post-processing: the v2 metadata lists the graph's inputs and outputs (datatype, shape with dynamic
dims as -1), and an inference request feeds raw tensors to onnxruntime. Everything onnxruntime would reject is
checked first, so a client mistake is a RequestError(400) naming the input instead of a 500: the set of input
names, each datatype (no silent casts), rank, fixed dims and dims the graph declares as multiples ("16*h16").
Inputs whose dims are individually valid but do not fit together (two inputs disagreeing on h16) are only found
by onnxruntime while running; those failures are client mistakes too and come back as 400.

One convenience, for graphs that take a normalised float32 `image` (N, 3, H, W) whose normalisation is known
(`pixels`, serving/pixels.py): that input also accepts raw UINT8 RGB pixels (N, H, W, 3) at the same H, W, normalised
here exactly as the export's float32 contract says, so clients send 4x fewer bytes and cannot normalise differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

from serving import v2
from serving.errors import RequestError
from serving.pixels import PixelNormalizer

ONNX_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}
PIXEL_INPUT = "image"
_MULTIPLE = re.compile(r"^(\d+)\*\w+$")  # how torch.export names a dim declared as K * Dim: "16*h16"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # v2 name, e.g. "FP32"
    declared: tuple[int | str | None, ...]  # onnxruntime's shape: ints, symbolic names, None when unnamed

    @classmethod
    def from_node(cls, node: Any, graph: str) -> TensorSpec:
        if node.type not in ONNX_DATATYPES:
            raise ValueError(f"{graph}: tensor {node.name!r} is {node.type}, which v2 cannot carry")
        return cls(node.name, ONNX_DATATYPES[node.type], tuple(node.shape))

    @property
    def shape(self) -> list[int]:
        """The v2 metadata shape: fixed dims as they are, every dynamic one as -1."""
        return [d if isinstance(d, int) else -1 for d in self.declared]

    def check(self, array: np.ndarray, model: str) -> None:
        got = v2.datatype_of(array)
        if got != self.datatype:
            raise RequestError(400, f"{model}: input {self.name!r} must be {self.datatype}, got {got}")
        wanted = [d if isinstance(d, int) else str(d) for d in self.declared]
        if array.ndim != len(self.declared):
            raise RequestError(
                400, f"{model}: input {self.name!r} must be rank {len(wanted)} {wanted}, got shape {list(array.shape)}"
            )
        for axis, (size, declared) in enumerate(zip(array.shape, self.declared, strict=True)):
            match = _MULTIPLE.match(declared) if isinstance(declared, str) else None
            if (isinstance(declared, int) and size != declared) or (match and size % int(match[1])):
                raise RequestError(
                    400,
                    f"{model}: input {self.name!r} must be {wanted}, got shape {list(array.shape)} (axis {axis})",
                )


class RawOnnxModel:
    """A loaded onnxruntime session under a v2 name and version; `infer` is thread-safe (onnxruntime's run is)."""

    def __init__(
        self,
        name: str,
        version: str,
        session: ort.InferenceSession,
        parameters: dict[str, Any] | None = None,
        pixels: PixelNormalizer | None = None,
    ) -> None:
        """`pixels`: the normalisation of a float32 `image` (N, 3, H, W) input, which then also takes UINT8
        (N, H, W, 3) RGB pixels."""
        self.name, self.version, self.session = name, version, session
        self.parameters = dict(parameters or {})
        self.inputs = [TensorSpec.from_node(node, name) for node in session.get_inputs()]
        self.outputs = [TensorSpec.from_node(node, name) for node in session.get_outputs()]
        image = next((s for s in self.inputs if s.name == PIXEL_INPUT), None)
        self.pixels = pixels if image and image.datatype == "FP32" and image.declared[1:2] == (3,) else None
        if self.pixels is not None:
            self.parameters["also_accepts"] = (
                f"{PIXEL_INPUT} as UINT8 [N, H, W, 3] RGB pixels, H and W as for FP32; normalised by the server"
            )

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": [v2.tensor_metadata(s.name, s.datatype, s.shape) for s in self.inputs],
            "outputs": [v2.tensor_metadata(s.name, s.datatype, s.shape) for s in self.outputs],
            "parameters": self.parameters,
        }

    def infer(self, inputs: dict[str, np.ndarray], wanted: list[str] | None) -> dict[str, np.ndarray]:
        """Named input tensors -> the wanted outputs (all of them for None), or RequestError(400)."""
        names = [s.name for s in self.outputs]
        if wanted is not None and (unknown := [o for o in wanted if o not in names]):
            raise RequestError(400, f"{self.name}: unknown outputs {unknown}; this model has {names}")
        expected = [s.name for s in self.inputs]
        if set(inputs) != set(expected):
            problems = [f"missing {[n for n in expected if n not in inputs]}"] if set(expected) - set(inputs) else []
            if unknown := sorted(set(inputs) - set(expected)):
                problems.append(f"unknown {unknown}")
            raise RequestError(400, f"{self.name}: takes inputs {expected}; {', '.join(problems)}")
        inputs = self._normalise_pixels(inputs)
        for spec in self.inputs:
            spec.check(inputs[spec.name], self.name)
        wanted = names if wanted is None else wanted
        try:
            arrays = self.session.run(wanted, {n: inputs[n] for n in expected})
        except (InvalidArgument, Fail) as err:  # the graph is fixed and loaded: what fails now is the inputs
            reason = str(err).split(" : ", 3)[-1].strip()  # drop onnxruntime's "[ONNXRuntimeError] : 1 : FAIL :"
            raise RequestError(400, f"{self.name}: the inputs do not fit together: {reason}") from err
        return dict(zip(wanted, arrays, strict=True))

    def _normalise_pixels(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A UINT8 (N, H, W, 3) `image`, where accepted, as the graph's normalised float32 (N, 3, H, W)."""
        pixels = inputs.get(PIXEL_INPUT)
        if self.pixels is None or pixels is None or pixels.dtype != np.uint8:
            return inputs
        if pixels.ndim != 4 or pixels.shape[3] != 3:
            raise RequestError(
                400, f"{self.name}: UINT8 input {PIXEL_INPUT!r} must be [N, H, W, 3] RGB, got {list(pixels.shape)}"
            )
        return inputs | {PIXEL_INPUT: self.pixels(pixels)}
