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

Every client mistake is a 4xx with JSON {"error": "..."}; the replica keeps serving.

This module holds the routes, each a line or two calling the concern that answers it, and how to build and run the
application. Elsewhere: the FastAPI app with error mapping, auth and metrics (serving/api.py); the models, their
reload and the session host (serving/served_models.py, serving/session_host.py); the one dynamic batcher every
segmentation request meets (serving/batching.py); per protocol, serving/rest.py, serving/v2_handler.py and
serving/propagation_handler.py.
"""

# No `from __future__ import annotations` here: serve.ingress rebuilds the routes from the endpoints'
# signatures and leaves string annotations unresolved (`request: Request` then fails every call with 422).
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from importlib import resources
from typing import Any

from fastapi import Query, Request, WebSocket
from fastapi.responses import HTMLResponse, Response
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from serving import auth
from serving.api import Replica, api
from serving.batching import Batcher
from serving.limits import Limits
from serving.metrics import CONTENT_TYPE, ServiceMetrics
from serving.onnx_model import Provider, choose_providers
from serving.propagation_handler import PropagationHandler
from serving.rest import RestHandler
from serving.served_models import ServedModels
from serving.session_host import HostDirectory, ReplicaHost
from serving.v2_handler import V2Handler

APP_NAME = "segmentation"


# serve.ingress freezes a copy of `api` (and pickles the class) when it decorates the class: everything the routes
# call lives in modules, and the class only wires them together.
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
        batch_overlap: bool = False,
        reload_interval_s: float = 60.0,
        api_token: str | None = None,
        propagation_model: str | None = None,
        session_idle_timeout_s: float = 300.0,
    ) -> None:
        limits = Limits(**limits) if isinstance(limits, dict) else limits or Limits()
        overrides = {"max_body_bytes": max_body_bytes, "max_side": max_side}
        self.limits = Limits(**(limits.as_dict() | {k: v for k, v in overrides.items() if v is not None}))
        chosen = choose_providers(providers)
        self.metrics = ServiceMetrics()
        Replica.metrics, Replica.token = self.metrics, auth.resolve_token(api_token)
        host = ReplicaHost(HostDirectory(), chosen, threads, self.limits.max_sessions, session_idle_timeout_s)
        self.models = ServedModels(
            model_ref,
            propagation_model,
            host,
            providers=chosen,
            threads=threads,
            cache_dir=cache_dir,
            tracking_uri=tracking_uri,
            metrics=self.metrics,
        )
        batcher = Batcher(self.metrics, max_batch_size, batch_wait_timeout_s, batch_overlap)
        self.rest = RestHandler(self.models, self.limits, batcher)
        self.v2 = V2Handler(self.models, self.limits, batcher)
        self.propagation = PropagationHandler(self.models, self.limits, Replica.token)
        self.page_html = resources.files("serving").joinpath("web/index.html").read_text(encoding="utf-8")
        self.models.follow(reload_interval_s)

    # ---- people and operations ----------------------------------------------------------------------------

    @api.get("/", include_in_schema=False)
    def page(self) -> HTMLResponse:
        return HTMLResponse(self.page_html)

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return self.models.health()

    @api.get("/metrics", include_in_schema=False)
    async def metrics_text(self) -> Response:
        if (host := self.models.host).handle is not None:
            self.metrics.sessions.set(await host.count())
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @api.get("/v1/model")
    def describe_model(self) -> dict[str, Any]:
        return self.rest.describe()

    @api.post("/v1/segment")
    async def segment(self, request: Request, output_format: str = Query("png", alias="format")) -> Response:
        return await self.rest.segment(request, output_format)

    @api.post("/v1/overlay")
    async def colour_overlay(self, request: Request, alpha: float = Query(0.5, ge=0.0, le=1.0)) -> Response:
        return await self.rest.overlay(request, alpha)

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
        return self.v2.metadata(name, None)

    @api.get("/v2/models/{name}/versions/{version}")
    def v2_model_version(self, name: str, version: str) -> dict[str, Any]:
        return self.v2.metadata(name, version)

    @api.get("/v2/models/{name}/ready")
    def v2_model_ready(self, name: str) -> dict[str, Any]:
        return self.v2.ready(name, None)

    @api.get("/v2/models/{name}/versions/{version}/ready")
    def v2_model_version_ready(self, name: str, version: str) -> dict[str, Any]:
        return self.v2.ready(name, version)

    @api.post("/v2/models/{name}/infer")
    async def v2_infer(self, name: str, request: Request) -> Response:
        return await self.v2.infer(name, None, request)

    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer_version(self, name: str, version: str, request: Request) -> Response:
        return await self.v2.infer(name, version, request)

    # ---- propagation: clip and stream ------------------------------------------------------------------------

    @api.post("/v1/propagate/clip")
    async def propagate_clip(self, request: Request) -> dict[str, Any]:
        return await self.propagation.clip(request)

    @api.post("/v1/propagate/sessions", status_code=201)
    async def open_session(self, request: Request) -> dict[str, Any]:
        return await self.propagation.open(request)

    @api.post("/v1/propagate/sessions/{session_id}/frames")
    async def session_frame(self, session_id: str, request: Request) -> Response:
        return await self.propagation.frame(session_id, request)

    @api.delete("/v1/propagate/sessions/{session_id}")
    async def close_session(self, session_id: str) -> dict[str, str]:
        return await self.propagation.close(session_id)

    @api.websocket("/v1/propagate/stream")
    async def stream_socket(self, socket: WebSocket) -> None:
        await self.propagation.stream(socket)


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
