"""The FastAPI app every route hangs on: client mistakes mapped to `{"error": ...}`, and bearer-token auth plus
latency/status metrics around every HTTP request.

serve.ingress freezes a copy of `api` (and pickles the deployment class) when it decorates the class, so handlers
and middleware must be added here, at import, before serving/app.py declares its routes.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from serving import auth
from serving.errors import RequestError
from serving.metrics import ServiceMetrics

api = FastAPI(
    title="EndoFlow segmentation",
    version="1",
    description="Segmentation of endoscopic images: REST for people, Open Inference Protocol v2 for machines.",
)


class Replica:
    """Per-process state the middleware needs (one replica per Ray actor process): token and metrics."""

    token: str | None = None
    metrics: ServiceMetrics | None = None


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


class AuthAndMetrics:
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
            auth.check(Replica.token, scope["path"], Headers(scope=scope).get("authorization"))
        except RequestError as err:
            await JSONResponse({"error": err.message}, status_code=err.status)(scope, receive, send_and_note)
        else:
            await self.app(scope, receive, send_and_note)
        finally:
            if Replica.metrics is not None:
                route = scope.get("route")
                Replica.metrics.observe(getattr(route, "path", "unmatched"), status, time.perf_counter() - start)


api.add_middleware(AuthAndMetrics)
