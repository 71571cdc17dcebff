"""Propagation over HTTP: a whole clip in one request (stateless, in this replica), or a stream of frames in a
session (POST/DELETE routes, or one WebSocket) whose memory lives in a session host (serving/session_host.py).

Images travel as base64 PNG/JPEG inside JSON, except a session's later frames: the raw body, or a binary message.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from serving import auth
from serving.bodies import read_image_body, read_json
from serving.codec import decode_base64, decode_image, decode_mask, encode_png
from serving.errors import RequestError
from serving.limits import Limits
from serving.propagation import Stream
from serving.served_models import ServedModels

STREAM_PATH = "/v1/propagate/stream"


class PropagationHandler:
    def __init__(self, models: ServedModels, limits: Limits, token: str | None) -> None:
        self.models, self.limits, self.token = models, limits, token
        self.host = models.host
        self.directory = models.host.directory  # session id -> the host holding it, on any replica

    def _decode_opening(self, doc: Any) -> tuple[np.ndarray, np.ndarray]:
        """{"frame": base64 image, "mask": base64 label PNG} -> (frame, mask) arrays (CPU-bound: run in a thread)."""
        self.models.require_propagator()
        if not isinstance(doc, dict) or not isinstance(doc.get("frame"), str) or not isinstance(doc.get("mask"), str):
            raise RequestError(400, 'expected a JSON object {"frame": base64 PNG/JPEG, "mask": base64 label PNG}')
        frame = decode_image(decode_base64(doc["frame"], "frame"), max_side=self.limits.max_side)
        return frame, decode_mask(decode_base64(doc["mask"], "mask"), max_side=self.limits.max_side)

    async def _open_session(self, frame: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
        return await self.host.open(frame, mask, lambda: self.models.require_propagator().graphs)

    async def clip(self, request: Request) -> dict[str, Any]:
        doc = await read_json(request, self.limits.max_body_bytes)
        frames = doc.get("frames") if isinstance(doc, dict) else None
        if not isinstance(frames, list) or not frames or not all(isinstance(f, str) for f in frames):
            raise RequestError(400, 'expected {"frames": [base64 PNG/JPEG, ...], "mask": base64 label PNG}')
        if len(frames) > self.limits.max_frames:
            raise RequestError(413, f"{len(frames)} frames; the limit is {self.limits.max_frames} per clip")

        def run() -> dict[str, Any]:
            opening = self._decode_opening({"frame": frames[0], "mask": doc.get("mask")})
            stream = Stream(self.models.require_propagator(), *opening)  # in this replica: one request, no session
            masks = [np.where(np.isin(m := decode_mask(decode_base64(doc["mask"], "mask")), stream.objects), m, 0)]
            for index, frame in enumerate(frames[1:], start=1):
                image = decode_image(decode_base64(frame, f"frames[{index}]"), max_side=self.limits.max_side)
                masks.append(stream.step(image))
            encoded = [base64.b64encode(encode_png(m.astype(np.uint8))).decode() for m in masks]
            return {"objects": stream.objects, "masks": encoded}

        return await run_in_threadpool(run)

    async def open(self, request: Request) -> dict[str, Any]:
        doc = await read_json(request, self.limits.max_body_bytes)
        opened = await self._open_session(*await run_in_threadpool(self._decode_opening, doc))
        # "headers": nothing to send any more (any replica serves any session); kept for clients that send them.
        return opened | {"headers": {}}

    async def frame(self, session_id: str, request: Request) -> Response:
        self.directory.host_name(session_id)  # a malformed id is a 404 before reading the body
        body = await read_image_body(request, self.limits.max_body_bytes)
        frame = await run_in_threadpool(decode_image, body, max_side=self.limits.max_side)
        labels = await self.directory.call(session_id, "step", frame)  # in order, in the session's host
        return Response(await run_in_threadpool(encode_png, labels), media_type="image/png")

    async def close(self, session_id: str) -> dict[str, str]:
        await self.directory.call(session_id, "close")
        return {"closed": session_id}

    async def stream(self, socket: WebSocket) -> None:
        """A stream over one WebSocket (pinned to this replica), in this replica's session host like any session,
        so it counts against the same bound; it closes with the socket, or ends when idle-expired."""
        if self.token is not None:  # the HTTP middleware does not see WebSockets
            try:
                auth.check(self.token, STREAM_PATH, socket.headers.get("authorization"))
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
                    labels = await self.directory.call(session_id, "step", image)
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
                    await self.directory.call(session_id, "close")
