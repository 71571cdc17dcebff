"""Open Inference Protocol v2 requests (KServe / Triton clients): which model a name and version mean, its metadata,
and inference, over the tensor codec in serving/v2.py.

Models: the segmentation model ("image" in; "labels", "logits", "entropy" out), and with a propagation model its
three graphs as raw models (serving/raw_model.py), all three carrying the propagation version.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from serving import v2
from serving.batching import Batcher
from serving.bodies import read_body
from serving.errors import RequestError
from serving.limits import Limits
from serving.loaded import LoadedModel
from serving.onnx_model import entropy_from_logits, labels_from_logits
from serving.raw_model import RawOnnxModel
from serving.served_models import ServedModels
from serving.timing import Stages

INLINE_BYTES = 4 * 3 * 512 * 512  # up to one 512x512 FP32 image: cheap enough for the event loop
OUTPUTS = ("labels", "logits", "entropy")


def v2_response(payload: bytes, json_length: int | None, stages: Stages) -> Response:
    stages.mark("respond")
    headers = stages.header()
    if json_length is None:
        return Response(payload, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(json_length)
    return Response(payload, media_type="application/octet-stream", headers=headers)


class V2Handler:
    def __init__(self, models: ServedModels, limits: Limits, batcher: Batcher) -> None:
        self.models, self.limits, self.batcher = models, limits, batcher

    def model(self, name: str, version: str | None) -> LoadedModel | RawOnnxModel:
        """The segmentation model, or one of the propagation graphs; each read of models.loaded / .propagator is
        one snapshot, so a reload between lookup and inference cannot change the model under a request."""
        loaded, propagator = self.models.loaded, self.models.propagator
        models: dict[str, LoadedModel | RawOnnxModel] = dict(propagator.v2_models) if propagator else {}
        models[loaded.resolved.name] = loaded  # the segmentation model keeps its name if a graph's collides
        if name not in models:
            raise RequestError(404, f"unknown model {name!r}; this server has {sorted(models)}")
        model = models[name]
        if version is not None and version != model.version:
            raise RequestError(404, f"model {name!r} has no version {version!r}; it serves {model.version!r}")
        return model

    def metadata(self, name: str, version: str | None) -> dict[str, Any]:
        loaded = self.model(name, version)
        if isinstance(loaded, RawOnnxModel):
            return loaded.metadata()
        classes = len(loaded.model.class_names)
        return {
            "name": loaded.resolved.name,
            "versions": [loaded.version],
            "platform": "onnxruntime_onnx",
            "inputs": [v2.tensor_metadata("image", "FP32", [-1, 3, -1, -1])],
            "outputs": [
                v2.tensor_metadata("labels", "UINT8", [-1, -1, -1]),
                v2.tensor_metadata("logits", "FP32", [-1, classes, -1, -1]),
                v2.tensor_metadata("entropy", "FP32", [-1, -1, -1]),
            ],
            "parameters": {"also_accepts": "image as UINT8 [N, H, W, 3] RGB pixels", **loaded.identity},
        }

    def ready(self, name: str, version: str | None) -> dict[str, Any]:
        self.model(name, version)
        return {"name": name, "ready": True}

    async def infer(self, name: str, version: str | None, request: Request) -> Response:
        stages = Stages()  # the Server-Timing header (serving/timing.py)
        model = self.model(name, version)
        body = await read_body(request, self.limits.max_body_bytes)
        stages.mark("read")
        header_length = request.headers.get(v2.HEADER_LENGTH)
        if header_length is None:  # all-JSON tensors can be megabytes of text: parse off the event loop
            parsed = await run_in_threadpool(v2.parse_request, body, None, self.limits.max_tensor_elements)
        else:  # binary tensors are views of the body: parsing is only the small JSON header
            parsed = v2.parse_request(body, header_length, self.limits.max_tensor_elements)
        stages.mark("parse")
        if isinstance(model, LoadedModel):
            return v2_response(*await self._segment(model, parsed, stages), stages)

        def run_raw() -> tuple[bytes, int | None]:
            # Not batched: raw graphs take whole tensors of any leading size the graph allows, and the propagation
            # graphs fix their batch axis at 1, so there is nothing to stack.
            outputs = model.infer(parsed.inputs, parsed.outputs)
            return v2.encode_response(model.name, model.version, parsed, outputs)

        payload, json_length = await run_in_threadpool(run_raw)
        stages.mark("run")
        return v2_response(payload, json_length, stages)

    async def _segment(self, loaded: LoadedModel, parsed: v2.InferRequest, stages: Stages) -> tuple[bytes, int | None]:
        wanted = parsed.outputs if parsed.outputs is not None else list(OUTPUTS)
        if unknown := [o for o in wanted if o not in OUTPUTS]:
            raise RequestError(400, f"unknown outputs {unknown}; this model has {list(OUTPUTS)}")
        # Each thread-pool hop costs a context switch (~0.1-1 ms on a busy 2-core box): FP32 tensors only need
        # checking, UINT8 images already at the model's size only a table lookup (serving/pixels.py), and small label
        # answers only an argmax, so those run on the event loop; UINT8 images to resize and logits/entropy answers
        # (softmax, megabytes) go to a thread.
        image = parsed.inputs.get("image")
        if image is not None and image.nbytes <= INLINE_BYTES and self._cheap_to_prepare(loaded, image):
            batch, size = self._batch(loaded, parsed.inputs)
        else:
            batch, size = await run_in_threadpool(self._batch, loaded, parsed.inputs)
        stages.mark("prepare")
        logits = await self.batcher.logits(loaded, batch, stages)

        def respond() -> tuple[bytes, int | None]:
            tensors = {"labels": lambda: labels_from_logits(logits, size), "logits": lambda: logits}
            tensors["entropy"] = lambda: entropy_from_logits(logits, size)
            outputs = {name: tensors[name]() for name in wanted}
            return v2.encode_response(loaded.resolved.name, loaded.version, parsed, outputs)

        if wanted == ["labels"] and logits.nbytes <= 2 * INLINE_BYTES:
            return respond()
        return await run_in_threadpool(respond)

    @staticmethod
    def _cheap_to_prepare(loaded: LoadedModel, image: np.ndarray) -> bool:
        """FP32 (checked, not transformed), or UINT8 [N, H, W, 3] at the model's input size (no resize)."""
        if image.dtype == np.float32:
            return True
        return image.dtype == np.uint8 and image.ndim == 4 and tuple(image.shape[1:3]) == tuple(loaded.model.input_size)

    def _batch(self, loaded: LoadedModel, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, tuple[int, int]]:
        """The v2 "image" input -> (normalised model batch, (H, W) the outputs come back at)."""
        if set(inputs) != {"image"}:
            raise RequestError(400, f"expected exactly one input named 'image', got {sorted(inputs)}")
        image = inputs["image"]
        model, limits = loaded.model, self.limits
        if image.ndim != 4 or not 1 <= image.shape[0] <= limits.max_batch:
            raise RequestError(
                400, f"input 'image' must be rank 4 with 1..{limits.max_batch} images, got shape {list(image.shape)}"
            )
        if image.dtype == np.uint8:
            if image.shape[3] != 3 or 0 in image.shape[1:3]:
                raise RequestError(400, f"UINT8 input 'image' must be [N, H, W, 3] RGB, got {list(image.shape)}")
            self._check_sides(image.shape[1:3])
            return model.preprocess(image), image.shape[1:3]
        if image.dtype != np.float32:
            raise RequestError(
                400, f"input 'image' must be FP32 [N, 3, H, W] or UINT8 [N, H, W, 3], got {v2.datatype_of(image)}"
            )
        multiple = model.metadata.size_multiple
        if image.shape[1] != 3 or 0 in image.shape[2:] or image.shape[2] % multiple or image.shape[3] % multiple:
            raise RequestError(
                400,
                f"FP32 input 'image' must be [N, 3, H, W] with H, W multiples of {multiple}, got {list(image.shape)}",
            )
        self._check_sides(image.shape[2:])
        if not np.isfinite(image).all():
            raise RequestError(400, "input 'image' contains NaN or infinite values")
        return np.ascontiguousarray(image), image.shape[2:]

    def _check_sides(self, size: tuple[int, ...]) -> None:
        if max(size) > self.limits.max_side:
            raise RequestError(
                413, f"image is {size[1]}x{size[0]}; the limit is {self.limits.max_side} pixels per side"
            )
