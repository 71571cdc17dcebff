"""REST answers for people: per-class areas with RLE masks, and the uncertainty map as a PNG."""

from __future__ import annotations

from typing import Any

import numpy as np

from serving import rle
from serving.codec import encode_png
from serving.loaded import LoadedModel
from serving.onnx_model import entropy_from_logits, labels_from_logits


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
