"""Run-length encoding of binary masks, COCO's uncompressed layout, so pycocotools and friends read it as is.

A mask (H, W) is read column by column (Fortran order); `counts` alternates runs of 0 and 1 and always starts with
a run of 0 (possibly empty). `{"size": [H, W], "counts": [...]}`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def encode(mask: np.ndarray) -> dict[str, Any]:
    """bool/0-1 (H, W) -> {"size": [H, W], "counts": [int, ...]}."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def decode(rle: dict[str, Any]) -> np.ndarray:
    """The inverse of encode: -> bool (H, W)."""
    height, width = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    flat = np.repeat(values, rle["counts"])
    if flat.size != height * width:
        raise ValueError(f"counts sum to {flat.size}, size {height}x{width} needs {height * width}")
    return flat.reshape((height, width), order="F")
