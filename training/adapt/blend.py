"""IoU-Ranking Blend (IRB): keep the translated images whose content survived translation, mix them with source images.

Our reading of the recipe:
1. A segmenter trained on source (simulator) images predicts every translated image.
2. Each translated image is scored by the IoU between that prediction and its simulator label: the mean over the
   classes present in either map (a class absent from both says nothing about the image and is left out). A high IoU
   means the translation preserved the content the label describes; a low one means the translator hallucinated or
   erased structure, so the label no longer fits the image.
3. Translated images are ranked best-first by IoU and the top fraction `k` is kept.
4. The training mix of `total` picks blends source and kept translated images at ratio `r`: `round(r · total)` picks
   are translated images, the rest source images. When a pool is smaller than its share, it is cycled through
   (every member used equally often, ±1) instead of sampled with replacement, so no kept image is starved.

Shapes: label maps are (N, H, W) integer arrays; `ious` is (N,). Rounding is half-up (`floor(x + 0.5)`).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

Pick = tuple[Literal["source", "translated"], int]


def per_image_iou(
    pred_nhw: np.ndarray, truth_nhw: np.ndarray, num_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """(N,) mean IoU per image over the classes present in prediction or truth; NaN if an image has no such class."""
    if pred_nhw.shape != truth_nhw.shape or pred_nhw.ndim != 3:
        raise ValueError(
            f"pred_nhw and truth_nhw must share an (N, H, W) shape, got {pred_nhw.shape}, {truth_nhw.shape}"
        )
    pred = pred_nhw.reshape(len(pred_nhw), -1).astype(np.int64)
    truth = truth_nhw.reshape(len(truth_nhw), -1).astype(np.int64)
    keep = np.ones_like(truth, dtype=bool) if ignore_index is None else truth != ignore_index
    if np.any((pred[keep] < 0) | (pred[keep] >= num_classes) | (truth[keep] < 0) | (truth[keep] >= num_classes)):
        raise ValueError(f"label maps hold values outside 0..{num_classes - 1}")
    # One confusion matrix per image, from a single bincount over (image, truth, prediction) triples.
    image = np.broadcast_to(np.arange(len(pred))[:, None], pred.shape)
    flat = (image[keep] * num_classes + truth[keep]) * num_classes + pred[keep]
    confusion = np.bincount(flat, minlength=len(pred) * num_classes**2).reshape(len(pred), num_classes, num_classes)
    intersection = np.diagonal(confusion, axis1=1, axis2=2)
    union = confusion.sum(axis=1) + confusion.sum(axis=2) - intersection
    present = union > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, intersection / np.maximum(union, 1), 0.0).sum(axis=1) / present.sum(axis=1)


def rank_by_iou(ious: np.ndarray) -> np.ndarray:
    """Indices best-first; equal IoUs keep their original order; NaNs (nothing to score) go last."""
    ious = np.asarray(ious, dtype=np.float64)
    return np.argsort(-ious, kind="stable")  # numpy sorts NaN after every number


def _half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _cycled_draws(pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` members of `pool`: whole shuffled passes over it, then a partial one, so each is used equally (±1)."""
    passes = [rng.permutation(pool) for _ in range(-(-count // len(pool)))] if count else []
    return np.concatenate(passes)[:count] if passes else np.empty(0, dtype=np.int64)


def irb_mix(
    num_source: int,
    ious: np.ndarray,
    top_fraction: float,
    translated_ratio: float,
    total: int,
    rng: np.random.Generator,
) -> list[Pick]:
    """`total` shuffled picks: ("translated", i) from the top `top_fraction` of `ious`, ("source", j) otherwise."""
    ious = np.asarray(ious, dtype=np.float64)
    if ious.ndim != 1:
        raise ValueError(f"ious must be a 1-D array (one IoU per translated image), got shape {ious.shape}")
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must lie in (0, 1], got {top_fraction}")
    if not 0.0 <= translated_ratio <= 1.0:
        raise ValueError(f"translated_ratio must lie in [0, 1], got {translated_ratio}")
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    if num_source < 0:
        raise ValueError(f"num_source must be >= 0, got {num_source}")
    num_translated = _half_up(translated_ratio * total)
    if num_translated > 0 and len(ious) == 0:
        raise ValueError(f"translated_ratio={translated_ratio} asks for translated images but ious is empty")
    if num_translated < total and num_source == 0:
        raise ValueError(f"translated_ratio={translated_ratio} asks for source images but num_source is 0")

    kept = rank_by_iou(ious)[: max(1, _half_up(top_fraction * len(ious)))]
    picks: list[Pick] = [("translated", int(i)) for i in _cycled_draws(kept, num_translated, rng)]
    picks += [("source", int(i)) for i in _cycled_draws(np.arange(num_source), total - num_translated, rng)]
    return [picks[i] for i in rng.permutation(total)]
