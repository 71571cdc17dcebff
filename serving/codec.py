"""Image bytes <-> numpy arrays for the HTTP layer, plus a colour overlay.

Arrays: images are uint8 (H, W, 3) RGB; label maps are uint8 (H, W) class indices.
Decoding is defensive because the bytes come from the network: the format is sniffed from the magic bytes
(Content-Type headers are not trusted), only the PNG or JPEG parser is ever run, and the declared size is
checked from the header before any pixel is decompressed, so a tiny file claiming 100k x 100k pixels
costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import colorsys
import io

import numpy as np
from PIL import Image

from serving.errors import RequestError

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_SIDE = 4096

_SIGNATURES = {  # magic prefix -> Pillow format name
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
}
_UNSUPPORTED_SIGNATURES = {  # recognised, so the error can say what was sent
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"RIFF": "WEBP/RIFF",
    b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
}


def sniff_format(data: bytes) -> str:
    """'PNG' or 'JPEG', else RequestError 415 naming what was sent when we can tell."""
    for magic, name in _SIGNATURES.items():
        if data.startswith(magic):
            return name
    for magic, name in _UNSUPPORTED_SIGNATURES.items():
        if data.startswith(magic):
            raise RequestError(415, f"{name} images are not supported; send PNG or JPEG")
    raise RequestError(415, f"body is not a PNG or JPEG image (starts with {data[:8]!r})")


def decode_image(data: bytes, *, max_bytes: int = MAX_BODY_BYTES, max_side: int = MAX_SIDE) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (H, W, 3) RGB, or RequestError 400/413/415.

    EXIF orientation is deliberately ignored: the label map must line up with the stored pixel grid the
    client sent, not with how a viewer would rotate it.
    """
    if not data:
        raise RequestError(400, "empty body: send PNG or JPEG bytes")
    if len(data) > max_bytes:
        raise RequestError(413, f"body is {len(data)} bytes; the limit is {max_bytes}")
    fmt = sniff_format(data)
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])  # parses the header only
    except Image.DecompressionBombError as err:  # Pillow's own pixel cap, hit before ours for absurd sizes
        raise RequestError(413, f"image is too large: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise RequestError(400, f"cannot read {fmt} header: {err}") from err
    width, height = image.size
    if width > max_side or height > max_side:
        raise RequestError(413, f"image is {width}x{height}; the limit is {max_side} pixels per side")
    if width == 0 or height == 0:
        raise RequestError(400, f"image has no pixels ({width}x{height})")
    try:
        image.load()
        rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # truncated or corrupt pixel data
        raise RequestError(400, f"corrupt or truncated {fmt}: {err}") from err
    return np.asarray(rgb, dtype=np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """uint8 (H, W) label map or (H, W, 3) RGB image -> PNG bytes."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected uint8 (H, W) or (H, W, 3), got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    # Label maps are mostly flat regions: fast compression loses little size and keeps the hot path cheap.
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def make_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 of well-separated hues; class 0 (conventionally background) is black."""
    golden = 0.618033988749895  # stepping hue by the golden ratio keeps neighbouring classes far apart
    colours = [colorsys.hsv_to_rgb((i * golden) % 1.0, 0.85, 1.0) for i in range(num_classes)]
    palette = (np.array(colours).reshape(num_classes, 3) * 255).round().astype(np.uint8)
    palette[:1] = 0
    return palette


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend palette[labels] over the image: uint8 (H, W, 3), (H, W), (C, 3) -> uint8 (H, W, 3)."""
    if image.shape[:2] != labels.shape or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {image.shape} and labels {labels.shape} do not match")
    if labels.size and int(labels.max()) >= len(palette):
        raise ValueError(f"label {int(labels.max())} has no colour in a palette of {len(palette)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    blended = image.astype(np.float32) * (1.0 - alpha) + palette[labels].astype(np.float32) * alpha
    return blended.round().astype(np.uint8)


def decode_mask(data: bytes, *, max_bytes: int = MAX_BODY_BYTES, max_side: int = MAX_SIDE) -> np.ndarray:
    """A single-channel PNG label map (mode L or P: pixel value = class index) -> uint8 (H, W), or 4xx.

    PNG only: JPEG's lossy compression would invent labels at every boundary."""
    if not data:
        raise RequestError(400, "empty mask: send a single-channel PNG label map")
    if len(data) > max_bytes:
        raise RequestError(413, f"mask is {len(data)} bytes; the limit is {max_bytes}")
    if sniff_format(data) != "PNG":
        raise RequestError(415, "masks must be PNG label maps (JPEG would blur the labels)")
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        if max(image.size) > max_side:
            raise RequestError(413, f"mask is {image.size[0]}x{image.size[1]}; the limit is {max_side} per side")
        if image.mode not in ("L", "P"):
            raise RequestError(400, f"mask has mode {image.mode}; expected a single-channel (L or P) label PNG")
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise RequestError(400, f"corrupt or truncated mask PNG: {err}") from err
    return np.asarray(image, dtype=np.uint8)


def decode_base64(text: str, what: str) -> bytes:
    """A base64 field of a JSON body -> bytes, or RequestError 400 naming the field."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f"{what} is not valid base64: {err}") from err
