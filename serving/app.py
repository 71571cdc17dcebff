"""Ray Serve application: HTTP in, ONNX segmentation out.

People (REST):
  GET  /                  a page to drop an image and see the overlay (serving/web/index.html)
  GET  /healthz           {"status": "ok", "model": {name, ref, sha256, version}[, "propagation": {..., graphs}]}
  GET  /v1/model          the model's metadata, providers and request limits
  POST /v1/segment        body = PNG/JPEG bytes -> image/png uint8 label map at the input's size
                          ?format=json -> per-class areas + COCO RLE masks + mean uncertainty
                          ?format=uncertainty -> image/png grey map of per-pixel entropy (0 certain .. 255 uniform)
  POST /v1/overlay        body = PNG/JPEG bytes -> image/png colour overlay (?alpha=0.5)
Machines (Open Inference Protocol v2, what KServe and Triton clients speak; tensors in serving/v2.py):
  GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/{v}][/ready]
  POST /v2/models/{name}[/versions/{v}]/infer
       input  "image": FP32 [N, 3, H, W] normalised (the ONNX contract), or UINT8 [N, H, W, 3] raw RGB pixels
       output "labels" UINT8 [N, H, W], "logits" FP32 [N, C, h, w], "entropy" FP32 [N, H, W] in [0, 1]
       {v} is the first 12 hex digits of the model's sha256, so a moved alias is a new version.
  {name} = NAME-encode_key | NAME-encode_value | NAME-segment, with a propagation model NAME: its three graphs as
       raw models (serving/raw_model.py) for clients that run propagation and keep the memory themselves; inputs
       and outputs are the graphs' own (training/propagate/export.py's contract), listed in the metadata with
       dynamic dims as -1. The three share one version (over their three sha256s): pin it (`model_version`) for a
       whole stream, so a moved alias answers 404 instead of mixing two trainings' keys and values in one memory.
Propagation (when the replica has a propagation model; images travel as base64 PNG/JPEG inside JSON):
  POST   /v1/propagate/clip              {"frames": [...], "mask": PNG label map of frames[0]} -> {"masks": [...]}
  POST   /v1/propagate/sessions          {"frame", "mask"} -> 201 {"session": id, ...}: a stream opens
  POST   /v1/propagate/sessions/{id}/frames   body = the next frame's PNG/JPEG -> PNG label map
  DELETE /v1/propagate/sessions/{id}
  WS     /v1/propagate/stream            first a text {"frame", "mask"}, then binary frames -> binary PNG masks
  A session's requests may reach any replica (no affinity is needed, behind HAProxy or Ray's proxy): its stream
  lives in the session host (a Ray actor, serving/session_host.py) of the replica that opened it, and the id names
  that host, so whichever replica receives a request forwards it there. 404: no such session (closed, expired);
  410: the replica that opened it stopped, and the stream's memory with it.
Operations: GET /metrics (Prometheus), /openapi.json, /docs.

Every client mistake is a 4xx with JSON {"error": "..."}; the replica keeps serving. The model is resolved, its
sha256 taken and its metadata parsed once per replica; a background thread re-resolves the reference every
`reload_interval_s` and swaps in a new model when the sha256 changed, without dropping a request. The propagation
model's reference is re-resolved the same way and its three graphs swapped together (only when they are one export;
see `_reload_propagator` for what open streams do). Segmentation requests from all routes meet in one dynamic
batcher (`@serve.batch`) in front of onnxruntime.
"""

# No `from __future__ import annotations` here: serve.ingress rebuilds the routes from the endpoints'
# signatures and leaves string annotations unresolved (`request: Request` then fails every call with 422).
import base64
import contextlib
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from serving import auth, batching, rest, v2
from serving.codec import decode_base64 as _b64
from serving.codec import decode_image, decode_mask, encode_png, make_palette, overlay
from serving.errors import RequestError
from serving.limits import Limits
from serving.loaded import LoadedModel
from serving.metrics import CONTENT_TYPE, ServiceMetrics
from serving.onnx_model import OnnxSegmenter, Provider, choose_providers, entropy_from_logits, labels_from_logits
from serving.propagation import OnnxPropagator, Stream, resolve_graphs
from serving.raw_model import RawOnnxModel
from serving.resolve import ResolvedModel, resolve_model
from serving.session_host import HostDirectory, HostGone, call_sync, invoke, start_host

APP_NAME = "segmentation"
log = logging.getLogger("ray.serve")
api = FastAPI(
    title="EndoFlow segmentation",
    version="1",
    description="Segmentation of endoscopic images: REST for people, Open Inference Protocol v2 for machines.",
)


class _Replica:
    """Per-process state the middleware needs (one replica per Ray actor process): token and metrics."""

    token: str | None = None
    metrics: ServiceMetrics | None = None


# serve.ingress freezes a copy of `api` (and pickles the class) when it decorates the class, so handlers, middleware
# and every helper the methods call must exist before it: helpers live in modules (batching, rest, v2).
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


class _AuthAndMetrics:
    """Bearer-token check and latency/status metrics for every HTTP request, as plain ASGI: Starlette's
    BaseHTTPMiddleware runs each request through an extra task and memory streams, a cost on every request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # WebSockets check the token themselves
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            auth.check(_Replica.token, scope["path"], Headers(scope=scope).get("authorization"))
        except RequestError as err:
            await JSONResponse({"error": err.message}, status_code=err.status)(scope, receive, send_and_note)
        else:
            await self.app(scope, receive, send_and_note)
        finally:
            if _Replica.metrics is not None:
                route = scope.get("route")
                _Replica.metrics.observe(getattr(route, "path", "unmatched"), status, time.perf_counter() - start)


api.add_middleware(_AuthAndMetrics)


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


async def read_image_body(request: Request, max_bytes: int) -> bytes:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/", "application/x-www-form-urlencoded")):
        raise RequestError(415, f"send the image as the raw body (image/png or image/jpeg), not {content_type}")
    return await read_body(request, max_bytes)


INLINE_BYTES = 4 * 3 * 512 * 512  # up to one 512x512 FP32 image: cheap enough for the event loop
V2_OUTPUTS = ("labels", "logits", "entropy")


def v2_response(payload: bytes, json_length: int | None) -> Response:
    if json_length is None:
        return Response(payload, media_type="application/json")
    return Response(
        payload, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(json_length)}
    )


@serve.deployment
@serve.ingress(api)
class SegmentationService:
    def __init__(
        self,
        model_ref: str,
        *,
        threads: int | None = None,
        providers: str | Sequence[Provider] = ("CPUExecutionProvider",),
        limits: Limits | dict | None = None,
        max_body_bytes: int | None = None,
        max_side: int | None = None,
        cache_dir: str | None = None,
        tracking_uri: str | None = None,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.0,
        reload_interval_s: float = 60.0,
        api_token: str | None = None,
        propagation_model: str | None = None,
        session_idle_timeout_s: float = 300.0,
    ) -> None:
        limits = Limits(**limits) if isinstance(limits, dict) else limits or Limits()
        overrides = {"max_body_bytes": max_body_bytes, "max_side": max_side}
        self.limits = Limits(**(limits.as_dict() | {k: v for k, v in overrides.items() if v is not None}))
        self.model_ref, self.cache_dir, self.tracking_uri = model_ref, cache_dir, tracking_uri
        self.providers, self.threads = choose_providers(providers), threads
        self.metrics = ServiceMetrics()
        _Replica.metrics, _Replica.token = self.metrics, auth.resolve_token(api_token)
        self.loaded = self._load(resolve_model(model_ref, cache_dir, tracking_uri))
        # 0 s wait: a lone request runs at once; under load, requests that queued during a run go together.
        self._logits_batched.set_max_batch_size(max_batch_size)
        self._logits_batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batching = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}
        self.propagation_ref, self.propagator = propagation_model, None
        self.session_idle_timeout_s, self.host_name, self.host = session_idle_timeout_s, None, None
        self.hosts = HostDirectory()  # session id -> the host holding it, on any replica
        self.host_lock = threading.Lock()  # one replacement at a time if the local host died
        if propagation_model:
            graphs = resolve_graphs(propagation_model, cache_dir, tracking_uri)
            self.propagator = OnnxPropagator(graphs, self.providers, threads)
            self._start_host(graphs)
        self.page = resources.files("serving").joinpath("web/index.html").read_text(encoding="utf-8")
        if reload_interval_s > 0:
            threading.Thread(target=self._reload_loop, args=(reload_interval_s,), daemon=True).start()

    def _start_host(self, graphs: dict[str, ResolvedModel]) -> None:
        """This replica's session host, where the streams it opens live (serving/session_host.py)."""
        max_sessions, idle_s = self.limits.max_sessions, self.session_idle_timeout_s
        name, handle = start_host(graphs, self.providers, self.threads, max_sessions, idle_s)
        self.hosts.remember(name, handle)
        self.host_name, self.host = name, handle

    def _load(self, resolved: ResolvedModel) -> LoadedModel:
        model = OnnxSegmenter(resolved.path, self.providers, self.threads)
        return LoadedModel(resolved, model, make_palette(len(model.class_names)))

    def _reload_loop(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            try:
                resolved = resolve_model(self.model_ref, self.cache_dir, self.tracking_uri)
                if resolved.sha256 != self.loaded.resolved.sha256:
                    self.loaded = self._load(resolved)  # one attribute store: requests see old or new, never half
                    self.metrics.reloads.inc()
                    log.warning("model %s moved: now serving sha256 %s", self.model_ref, resolved.sha256)
            except Exception as err:  # a registry hiccup must not take down a replica that serves fine
                log.warning("re-resolving %s failed, still serving the previous model: %s", self.model_ref, err)
            if self.propagation_ref:
                self._reload_propagator(self.propagation_ref)

    def _reload_propagator(self, ref: str) -> None:
        """Swap in the propagation graphs `ref` now names, if any of the three changed.

        The swap is one attribute store, so a request (REST or v2) sees the old three graphs or the new three, never
        a mix; the session host swaps first, so once /healthz names the new version new streams start on it too.
        Open streams keep the propagator they were opened with (Stream.model), deliberately: their memory
        holds keys and values from the old encoders, which the new segment graph cannot read, so they finish on the
        old graphs (freed with the last such stream) and only streams opened afterwards use the new ones. Closing
        them would cut every live video at each alias move for no gain in correctness. v2 clients keep their memory
        themselves and pin the version; theirs answers 404 after a swap. While a registry's three aliases are being
        moved one by one the graphs come from two exports: OnnxPropagator refuses that, and the next round retries.
        """
        try:
            graphs = resolve_graphs(ref, self.cache_dir, self.tracking_uri)
            current = self.propagator
            if current is None or {g: r.sha256 for g, r in graphs.items()} != current.sha256:
                propagator = OnnxPropagator(graphs, self.providers, self.threads)  # refuses a mixed set
                if self.host is not None:
                    try:
                        call_sync(self.host, "swap", graphs)
                    except HostGone:
                        log.warning("the session host died; starting a new one on the moved graphs")
                        with self.host_lock:
                            self.hosts.forget(self.host_name)
                            self._start_host(graphs)
                self.propagator = propagator
                self.metrics.reloads.inc()
                log.warning("propagation model %s moved: now serving version %s", ref, self.propagator.version)
        except Exception as err:  # as above: keep serving what works
            log.warning("re-resolving %s failed, still serving the previous propagation graphs: %s", ref, err)

    # ---- batching: every route's normalised batches meet here ----------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _logits_batched(self, items: list[tuple[LoadedModel, np.ndarray]]) -> list[np.ndarray]:
        self.metrics.batch_size.observe(len(items))
        # On this replica's user-code loop, not a worker thread: two thread hops cost more than they overlap
        # (onnxruntime already keeps the cores busy): in a paired run, -0.4 ms p50 and +10% throughput at c=8.
        # Other requests wait at most one batch's inference; their bodies keep arriving on Serve's HTTP loop.
        return batching.run_grouped(items)

    async def _logits(self, loaded: LoadedModel, batch_nchw: np.ndarray) -> np.ndarray:
        return await self._logits_batched((loaded, batch_nchw))

    # ---- REST ------------------------------------------------------------------------------------------------

    @api.get("/", include_in_schema=False)
    def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        health: dict[str, Any] = {"status": "ok", "model": self.loaded.identity}
        if (propagator := self.propagator) is not None:
            health["propagation"] = {"ref": self.propagation_ref, **propagator.identity}
        return health

    @api.get("/metrics", include_in_schema=False)
    async def metrics_text(self) -> Response:
        if self.host is not None:  # the sessions this replica's host holds (opened here, served from anywhere)
            try:
                self.metrics.sessions.set(await invoke(self.host, "count"))
            except HostGone:
                self.metrics.sessions.set(0)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @api.get("/v1/model")
    def describe_model(self) -> dict[str, Any]:
        loaded = self.loaded
        return {
            **loaded.identity,
            **loaded.model.metadata.as_dict(),
            "providers": loaded.model.providers,
            "limits": self.limits.as_dict(),
            "batching": self.batching,
        }

    @api.post("/v1/segment")
    async def segment(self, request: Request, output_format: str = Query("png", alias="format")) -> Response:
        if output_format not in ("png", "json", "uncertainty"):
            raise RequestError(400, f"format must be 'png', 'json' or 'uncertainty', got {output_format!r}")
        loaded, image, logits = await self._segment(request)
        size = image.shape[:2]
        if output_format == "json":
            return JSONResponse(await run_in_threadpool(rest.areas_and_masks, loaded, logits, size))
        if output_format == "uncertainty":
            png = await run_in_threadpool(rest.entropy_png, logits, size)
        else:
            png = await run_in_threadpool(lambda: encode_png(labels_from_logits(logits, size)[0]))
        return Response(png, media_type="image/png")

    @api.post("/v1/overlay")
    async def colour_overlay(self, request: Request, alpha: float = Query(0.5, ge=0.0, le=1.0)) -> Response:
        loaded, image, logits = await self._segment(request)

        def render() -> bytes:
            return encode_png(overlay(image, labels_from_logits(logits, image.shape[:2])[0], loaded.palette, alpha))

        return Response(await run_in_threadpool(render), media_type="image/png")

    async def _segment(self, request: Request) -> tuple[LoadedModel, np.ndarray, np.ndarray]:
        body = await read_image_body(request, self.limits.max_body_bytes)
        loaded = self.loaded

        def prepare() -> tuple[np.ndarray, np.ndarray]:
            image = decode_image(body, max_bytes=self.limits.max_body_bytes, max_side=self.limits.max_side)
            return image, loaded.model.preprocess(image[None])

        # Decoding and inference are CPU-bound; worker threads keep this replica's event loop responsive.
        image, batch = await run_in_threadpool(prepare)
        return loaded, image, await self._logits(loaded, batch)

    # ---- Open Inference Protocol v2 ------------------------------------------------------------------------

    @api.get("/v2")
    def v2_server(self) -> dict[str, Any]:
        return {"name": "endoflow", "version": "1", "extensions": []}

    @api.get("/v2/health/live")
    def v2_live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready")
    def v2_ready(self) -> dict[str, bool]:
        return {"ready": True}  # a replica only receives traffic once __init__ loaded the model

    @api.get("/v2/models/{name}")
    def v2_model(self, name: str) -> dict[str, Any]:
        return self._v2_metadata(self._v2_model(name, None))

    @api.get("/v2/models/{name}/versions/{version}")
    def v2_model_version(self, name: str, version: str) -> dict[str, Any]:
        return self._v2_metadata(self._v2_model(name, version))

    @api.get("/v2/models/{name}/ready")
    def v2_model_ready(self, name: str) -> dict[str, Any]:
        self._v2_model(name, None)
        return {"name": name, "ready": True}

    @api.get("/v2/models/{name}/versions/{version}/ready")
    def v2_model_version_ready(self, name: str, version: str) -> dict[str, Any]:
        self._v2_model(name, version)
        return {"name": name, "ready": True}

    @api.post("/v2/models/{name}/infer")
    async def v2_infer(self, name: str, request: Request) -> Response:
        return await self._v2_infer(self._v2_model(name, None), request)

    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer_version(self, name: str, version: str, request: Request) -> Response:
        return await self._v2_infer(self._v2_model(name, version), request)

    def _v2_model(self, name: str, version: str | None) -> LoadedModel | RawOnnxModel:
        """The segmentation model, or one of the propagation graphs; each read of self.loaded / self.propagator is
        one snapshot, so a reload between lookup and inference cannot change the model under a request."""
        loaded, propagator = self.loaded, self.propagator
        models: dict[str, LoadedModel | RawOnnxModel] = dict(propagator.v2_models) if propagator else {}
        models[loaded.resolved.name] = loaded  # the segmentation model keeps its name if a graph's collides
        if name not in models:
            raise RequestError(404, f"unknown model {name!r}; this server has {sorted(models)}")
        model = models[name]
        if version is not None and version != model.version:
            raise RequestError(404, f"model {name!r} has no version {version!r}; it serves {model.version!r}")
        return model

    def _v2_metadata(self, loaded: LoadedModel | RawOnnxModel) -> dict[str, Any]:
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

    async def _v2_infer(self, model: LoadedModel | RawOnnxModel, request: Request) -> Response:
        body = await read_body(request, self.limits.max_body_bytes)
        header_length = request.headers.get(v2.HEADER_LENGTH)
        if header_length is None:  # all-JSON tensors can be megabytes of text: parse off the event loop
            parsed = await run_in_threadpool(v2.parse_request, body, None, self.limits.max_tensor_elements)
        else:  # binary tensors are views of the body: parsing is only the small JSON header
            parsed = v2.parse_request(body, header_length, self.limits.max_tensor_elements)
        if isinstance(model, LoadedModel):
            return v2_response(*await self._v2_segment(model, parsed))

        def run_raw() -> tuple[bytes, int | None]:
            # Not batched: raw graphs take whole tensors of any leading size the graph allows, and the propagation
            # graphs fix their batch axis at 1, so there is nothing to stack.
            outputs = model.infer(parsed.inputs, parsed.outputs)
            return v2.encode_response(model.name, model.version, parsed, outputs)

        return v2_response(*await run_in_threadpool(run_raw))

    async def _v2_segment(self, loaded: LoadedModel, parsed: v2.InferRequest) -> tuple[bytes, int | None]:
        wanted = parsed.outputs if parsed.outputs is not None else list(V2_OUTPUTS)
        if unknown := [o for o in wanted if o not in V2_OUTPUTS]:
            raise RequestError(400, f"unknown outputs {unknown}; this model has {list(V2_OUTPUTS)}")
        # Each thread-pool hop costs a context switch (~0.1-1 ms on a busy 2-core box): FP32 tensors only need
        # checking and small label answers only an argmax, so those run on the event loop; UINT8 images (resize and
        # normalise) and logits/entropy answers (softmax, megabytes) go to a thread.
        image = parsed.inputs.get("image")
        if image is not None and image.dtype == np.float32 and image.nbytes <= INLINE_BYTES:
            batch, size = self._v2_batch(loaded, parsed.inputs)
        else:
            batch, size = await run_in_threadpool(self._v2_batch, loaded, parsed.inputs)
        logits = await self._logits(loaded, batch)

        def respond() -> tuple[bytes, int | None]:
            tensors = {"labels": lambda: labels_from_logits(logits, size), "logits": lambda: logits}
            tensors["entropy"] = lambda: entropy_from_logits(logits, size)
            outputs = {name: tensors[name]() for name in wanted}
            return v2.encode_response(loaded.resolved.name, loaded.version, parsed, outputs)

        if wanted == ["labels"] and logits.nbytes <= 2 * INLINE_BYTES:
            return respond()
        return await run_in_threadpool(respond)

    def _v2_batch(self, loaded: LoadedModel, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, tuple[int, int]]:
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

    # ---- propagation: clip and stream ------------------------------------------------------------------------

    def _propagator(self) -> OnnxPropagator:
        if self.propagator is None:
            raise RequestError(404, "this server has no propagation model (start it with propagation_model=...)")
        return self.propagator

    def _decode_opening(self, doc: Any) -> tuple[np.ndarray, np.ndarray]:
        """{"frame": base64 image, "mask": base64 label PNG} -> (frame, mask) arrays (CPU-bound: run in a thread)."""
        self._propagator()
        if not isinstance(doc, dict) or not isinstance(doc.get("frame"), str) or not isinstance(doc.get("mask"), str):
            raise RequestError(400, 'expected a JSON object {"frame": base64 PNG/JPEG, "mask": base64 label PNG}')
        frame = decode_image(_b64(doc["frame"], "frame"), max_side=self.limits.max_side)
        return frame, decode_mask(_b64(doc["mask"], "mask"), max_side=self.limits.max_side)

    def _open_stream(self, doc: Any) -> Stream:
        """A Stream in this replica (clip mode: stateless, one request)."""
        model = self._propagator()
        return Stream(model, *self._decode_opening(doc))

    async def _open_session(self, frame: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
        """Open a stream in this replica's session host; a host that died (crash, OOM) is replaced once."""
        host = self.host
        try:
            return await invoke(host, "open", frame, mask)
        except HostGone:
            log.warning("session host %s died (its sessions are lost); starting a new one", self.host_name)

        def replace() -> None:
            with self.host_lock:
                if self.host is host:  # not already replaced by a concurrent request
                    self.hosts.forget(self.host_name)
                    self._start_host(self._propagator().graphs)

        await run_in_threadpool(replace)
        return await invoke(self.host, "open", frame, mask)

    async def _json_body(self, request: Request) -> Any:
        body = await read_body(request, self.limits.max_body_bytes)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(400, f"body is not valid JSON: {err}") from err

    @api.post("/v1/propagate/clip")
    async def propagate_clip(self, request: Request) -> dict[str, Any]:
        doc = await self._json_body(request)
        frames = doc.get("frames") if isinstance(doc, dict) else None
        if not isinstance(frames, list) or not frames or not all(isinstance(f, str) for f in frames):
            raise RequestError(400, 'expected {"frames": [base64 PNG/JPEG, ...], "mask": base64 label PNG}')
        if len(frames) > self.limits.max_frames:
            raise RequestError(413, f"{len(frames)} frames; the limit is {self.limits.max_frames} per clip")

        def run() -> dict[str, Any]:
            stream = self._open_stream({"frame": frames[0], "mask": doc.get("mask")})
            masks = [np.where(np.isin(m := decode_mask(_b64(doc["mask"], "mask")), stream.objects), m, 0)]
            for index, frame in enumerate(frames[1:], start=1):
                masks.append(stream.step(decode_image(_b64(frame, f"frames[{index}]"), max_side=self.limits.max_side)))
            encoded = [base64.b64encode(encode_png(m.astype(np.uint8))).decode() for m in masks]
            return {"objects": stream.objects, "masks": encoded}

        return await run_in_threadpool(run)

    @api.post("/v1/propagate/sessions", status_code=201)
    async def open_session(self, request: Request) -> dict[str, Any]:
        frame, mask = await run_in_threadpool(self._decode_opening, await self._json_body(request))
        opened = await self._open_session(frame, mask)
        # "headers": nothing to send any more (any replica serves any session); kept for clients that send them.
        return opened | {"headers": {}}

    @api.post("/v1/propagate/sessions/{session_id}/frames")
    async def session_frame(self, session_id: str, request: Request) -> Response:
        self.hosts.host_name(session_id)  # a malformed id is a 404 before reading the body
        body = await read_image_body(request, self.limits.max_body_bytes)
        frame = await run_in_threadpool(decode_image, body, max_side=self.limits.max_side)
        labels = await self.hosts.call(session_id, "step", frame)  # in order, in the session's host
        return Response(await run_in_threadpool(encode_png, labels), media_type="image/png")

    @api.delete("/v1/propagate/sessions/{session_id}")
    async def close_session(self, session_id: str) -> dict[str, str]:
        await self.hosts.call(session_id, "close")
        return {"closed": session_id}

    @api.websocket("/v1/propagate/stream")
    async def stream_socket(self, socket: WebSocket) -> None:
        """A stream over one WebSocket (pinned to this replica), in this replica's session host like any session,
        so it counts against the same bound; it closes with the socket, or ends when idle-expired."""
        if _Replica.token is not None:  # the HTTP middleware does not see WebSockets
            try:
                auth.check(_Replica.token, "/v1/propagate/stream", socket.headers.get("authorization"))
            except RequestError as err:
                await socket.close(code=1008, reason=err.message)
                return
        await socket.accept()
        session_id = None
        try:
            try:
                opening = json.loads(await socket.receive_text())
                opened = await self._open_session(*await run_in_threadpool(self._decode_opening, opening))
            except (RequestError, json.JSONDecodeError) as err:
                await socket.send_json({"error": getattr(err, "message", f"first message is not JSON: {err}")})
                await socket.close(code=1003)
                return
            session_id = opened["session"]
            await socket.send_json({"session": session_id, "objects": opened["objects"]})
            while True:
                frame = await socket.receive_bytes()
                try:
                    image = await run_in_threadpool(decode_image, frame, max_side=self.limits.max_side)
                    labels = await self.hosts.call(session_id, "step", image)
                    await socket.send_bytes(await run_in_threadpool(encode_png, labels))
                except RequestError as err:
                    await socket.send_json({"error": err.message})
                    if err.status in (404, 410):  # the session itself ended (idle-expired, host gone)
                        session_id = None
                        await socket.close(code=1000, reason="session ended")
                        return
        except WebSocketDisconnect:
            pass
        finally:
            if session_id is not None:
                with contextlib.suppress(RequestError):
                    await self.hosts.call(session_id, "close")

    def _check_sides(self, size: tuple[int, ...]) -> None:
        if max(size) > self.limits.max_side:
            raise RequestError(
                413, f"image is {size[1]}x{size[0]}; the limit is {self.limits.max_side} pixels per side"
            )


def build_app(
    model_ref: str,
    *,
    num_replicas: int = 1,
    threads: int | None = None,
    autoscaling: dict[str, Any] | None = None,
    max_ongoing_requests: int = 64,
    access_log: bool = False,
    **options: Any,
) -> Application:
    """The bound application. Each replica reserves as many Ray CPUs as onnxruntime threads it runs, so replicas
    packed on one node do not oversubscribe it. `autoscaling` (Serve's autoscaling_config: min_replicas,
    max_replicas, target_ongoing_requests, ...) replaces the fixed num_replicas. Serve's per-request access log
    is off by default: at a hundred requests a second it fills disks (latency: no difference measured here), and
    /metrics counts requests, latency and errors anyway. `options` go to SegmentationService."""
    threads = threads or 1
    scaling: dict[str, Any] = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": num_replicas}
    deployment = SegmentationService.options(
        **scaling,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": threads},
        logging_config={"enable_access_log": access_log},
    )
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
