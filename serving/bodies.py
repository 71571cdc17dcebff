"""Reading request bodies within the replica's limits: an oversized upload is refused (413) before it is buffered."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from serving.errors import RequestError


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
    """An image sent as the raw body; a form upload is a 415 saying how to send it instead."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/", "application/x-www-form-urlencoded")):
        raise RequestError(415, f"send the image as the raw body (image/png or image/jpeg), not {content_type}")
    return await read_body(request, max_bytes)


async def read_json(request: Request, max_bytes: int) -> Any:
    body = await read_body(request, max_bytes)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"body is not valid JSON: {err}") from err
