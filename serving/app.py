"""Ray Serve application: HTTP in, ONNX segmentation out.

  GET  /healthz       {"status": "ok", "model": {name, ref, sha256}}
  GET  /v1/model      the model's metadata and the request limits
  POST /v1/segment    body = PNG/JPEG bytes -> image/png uint8 label map at the input's size
                      ?format=json -> per-class pixel areas instead
  POST /v1/overlay    body = PNG/JPEG bytes -> image/png colour overlay (?alpha=0.5)
Every client mistake is a 4xx with JSON {"error": "..."}; the replica keeps serving.
The model is resolved, loaded and its metadata parsed once per replica, never per request.
"""

# No `from __future__ import annotations` here: serve.ingress rebuilds the routes from the endpoints'
# signatures and leaves string annotations unresolved (`request: Request` then fails every call with 422).
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from serving.codec import MAX_BODY_BYTES, MAX_SIDE, decode_image, encode_png, make_palette, overlay
from serving.errors import RequestError
from serving.onnx_model import OnnxSegmenter, Provider
from serving.resolve import resolve_model

APP_NAME = "segmentation"
api = FastAPI(title="EndoFlow segmentation")


# serve.ingress freezes a copy of `api` when it decorates the class, so the handlers must be registered first.
@api.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status)


@api.exception_handler(RequestValidationError)  # a malformed query parameter
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    return JSONResponse({"error": problems}, status_code=422)


@api.exception_handler(HTTPException)  # unknown route, wrong method
async def _http_error(_: Request, err: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing early (413) instead of buffering an oversized upload."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"body is {declared} bytes; the limit is {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment
@serve.ingress(api)
class SegmentationService:
    def __init__(
        self,
        model_ref: str,
        *,
        threads: int | None = None,
        providers: Sequence[Provider] = ("CPUExecutionProvider",),
        max_body_bytes: int = MAX_BODY_BYTES,
        max_side: int = MAX_SIDE,
        cache_dir: str | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        self.resolved = resolve_model(model_ref, cache_dir, tracking_uri)
        self.model = OnnxSegmenter(self.resolved.path, providers, threads)
        self.palette = make_palette(len(self.model.class_names))
        self.max_body_bytes, self.max_side = max_body_bytes, max_side
        identity = {"name": self.resolved.name, "ref": self.resolved.ref, "sha256": self.resolved.sha256}
        self.health = {"status": "ok", "model": identity}
        self.model_info = {
            **identity,
            **self.model.metadata.as_dict(),
            "providers": self.model.providers,
            "limits": {"max_body_bytes": max_body_bytes, "max_side": max_side},
        }

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return self.health

    @api.get("/v1/model")
    def describe_model(self) -> dict[str, Any]:
        return self.model_info

    @api.post("/v1/segment")
    async def segment(self, request: Request, output_format: str = Query("png", alias="format")) -> Response:
        if output_format not in ("png", "json"):
            raise RequestError(400, f"format must be 'png' or 'json', got {output_format!r}")
        body = await read_body(request, self.max_body_bytes)
        # Decoding and inference are CPU-bound; a worker thread keeps this replica's event loop responsive.
        if output_format == "json":
            return JSONResponse(await run_in_threadpool(self._areas, body))
        return Response(await run_in_threadpool(self._label_png, body), media_type="image/png")

    @api.post("/v1/overlay")
    async def colour_overlay(self, request: Request, alpha: float = Query(0.5, ge=0.0, le=1.0)) -> Response:
        body = await read_body(request, self.max_body_bytes)
        return Response(await run_in_threadpool(self._overlay_png, body, alpha), media_type="image/png")

    def _segment(self, body: bytes) -> tuple[np.ndarray, np.ndarray]:
        image = decode_image(body, max_bytes=self.max_body_bytes, max_side=self.max_side)
        return image, self.model.predict(image[None])[0]

    def _label_png(self, body: bytes) -> bytes:
        return encode_png(self._segment(body)[1])

    def _overlay_png(self, body: bytes, alpha: float) -> bytes:
        image, labels = self._segment(body)
        return encode_png(overlay(image, labels, self.palette, alpha))

    def _areas(self, body: bytes) -> dict[str, Any]:
        labels = self._segment(body)[1]
        counts = np.bincount(labels.ravel(), minlength=len(self.model.class_names))
        return {
            "height": labels.shape[0],
            "width": labels.shape[1],
            "areas": [
                {"index": i, "name": name, "pixels": int(n), "fraction": float(n) / labels.size}
                for i, (name, n) in enumerate(zip(self.model.class_names, counts, strict=True))
            ],
        }


def build_app(model_ref: str, *, num_replicas: int = 1, threads: int | None = None, **options: Any) -> Application:
    """The bound application. Each replica reserves as many Ray CPUs as onnxruntime threads it runs, so
    replicas packed on one node do not oversubscribe it. `options` go to SegmentationService."""
    threads = threads or 1
    deployment = SegmentationService.options(num_replicas=num_replicas, ray_actor_options={"num_cpus": threads})
    return deployment.bind(model_ref, threads=threads, **options)


def run_app(
    model_ref: str,
    *,
    port: int = 8000,
    host: str = "127.0.0.1",
    blocking: bool = False,
    route_prefix: str = "/",
    timeout_s: float = 120.0,
    **build_options: Any,
) -> DeploymentHandle:
    """Start Serve's HTTP proxy on host:port, deploy the app and return once /healthz answers 200.

    Serve keeps the HTTP options of the first serve.start in a cluster and only logs a warning for new ones,
    so if Serve already runs elsewhere the health wait below fails and says so rather than serving silently
    on another port."""
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(model_ref, **build_options), name=APP_NAME, route_prefix=route_prefix)
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{probe_host}:{port}{route_prefix.rstrip('/')}/healthz"
    _wait_healthy(url, timeout_s)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handle


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as err:  # proxy not listening or route not yet published
            last_error = err
        time.sleep(0.2)
    raise TimeoutError(
        f"{url} not healthy after {timeout_s:.0f}s ({last_error}); if Serve was already running with other "
        "http_options they were ignored: serve.shutdown() first"
    )
