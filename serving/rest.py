"""REST for people: POST /v1/segment (label PNG, per-class areas with RLE masks, or the uncertainty map),
POST /v1/overlay, and GET /v1/model.

Decoding, rendering and inference are CPU-bound: they run in worker threads or the batcher, keeping the replica's
event loop responsive.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serving import rle
from serving.batching import Batcher
from serving.bodies import read_image_body
from serving.codec import decode_image, encode_png, overlay
from serving.errors import RequestError
from serving.limits import Limits
from serving.loaded import LoadedModel
from serving.onnx_model import entropy_from_logits, labels_from_logits
from serving.served_models import ServedModels
from serving.timing import Stages

FORMATS = ("png", "json", "uncertainty")


def areas_and_masks(loaded: LoadedModel, logits: np.ndarray, size: tuple[int, int]) -> dict[str, Any]:
    labels = labels_from_logits(logits, size)[0]
    entropy = entropy_from_logits(logits, size)[0]
    counts = np.bincount(labels.ravel(), minlength=len(loaded.model.class_names))
    return {
        "height": labels.shape[0],
        "width": labels.shape[1],
        "model": loaded.identity,
        "mean_uncertainty": float(entropy.mean()),
        "areas": [
            {
                "index": i,
                "name": name,
                "pixels": int(n),
                "fraction": float(n) / labels.size,
                "mask": rle.encode(labels == i) if n else None,  # COCO uncompressed RLE, column-major
            }
            for i, (name, n) in enumerate(zip(loaded.model.class_names, counts, strict=True))
        ],
    }


def entropy_png(logits: np.ndarray, size: tuple[int, int]) -> bytes:
    return encode_png((entropy_from_logits(logits, size)[0] * 255).round().astype(np.uint8))


class RestHandler:
    def __init__(self, models: ServedModels, limits: Limits, batcher: Batcher) -> None:
        self.models, self.limits, self.batcher = models, limits, batcher

    def describe(self) -> dict[str, Any]:
        loaded = self.models.loaded
        return {
            **loaded.identity,
            **loaded.model.metadata.as_dict(),
            "providers": loaded.model.providers,
            "limits": self.limits.as_dict(),
            "batching": self.batcher.settings,
        }

    async def segment(self, request: Request, output_format: str) -> Response:
        if output_format not in FORMATS:
            raise RequestError(400, f"format must be 'png', 'json' or 'uncertainty', got {output_format!r}")
        stages = Stages()  # the Server-Timing header (serving/timing.py)
        loaded, image, logits = await self._infer(request, stages)
        size = image.shape[:2]
        if output_format == "json":
            answer = await run_in_threadpool(areas_and_masks, loaded, logits, size)
            stages.mark("respond")
            return JSONResponse(answer, headers=stages.header())
        if output_format == "uncertainty":
            png = await run_in_threadpool(entropy_png, logits, size)
        else:
            png = await run_in_threadpool(lambda: encode_png(labels_from_logits(logits, size)[0]))
        stages.mark("respond")
        return Response(png, media_type="image/png", headers=stages.header())

    async def overlay(self, request: Request, alpha: float) -> Response:
        stages = Stages()
        loaded, image, logits = await self._infer(request, stages)

        def render() -> bytes:
            return encode_png(overlay(image, labels_from_logits(logits, image.shape[:2])[0], loaded.palette, alpha))

        png = await run_in_threadpool(render)
        stages.mark("respond")
        return Response(png, media_type="image/png", headers=stages.header())

    async def _infer(self, request: Request, stages: Stages) -> tuple[LoadedModel, np.ndarray, np.ndarray]:
        """The body's image -> (the model it ran on, the image, its logits); stages read, decode, queue, onnx."""
        body = await read_image_body(request, self.limits.max_body_bytes)
        stages.mark("read")
        loaded = self.models.loaded  # one snapshot: a reload cannot change the model under this request

        def prepare() -> tuple[np.ndarray, np.ndarray]:
            image = decode_image(body, max_bytes=self.limits.max_body_bytes, max_side=self.limits.max_side)
            return image, loaded.model.preprocess(image[None])

        image, batch = await run_in_threadpool(prepare)
        stages.mark("decode")
        return loaded, image, await self.batcher.logits(loaded, batch, stages)
