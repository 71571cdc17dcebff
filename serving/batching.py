"""Dynamic batching: segmentation requests from every route meet in one `@serve.batch` queue in front of onnxruntime.

The queue collects (model, normalised batch) items from concurrent requests; `run_grouped` groups them by model (a
reload may have swapped it between two requests) and by image size, runs one call per group and hands each request
its own slice back.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

if TYPE_CHECKING:
    from serving.loaded import LoadedModel
    from serving.metrics import ServiceMetrics
    from serving.timing import Stages


def run_grouped(items: list[tuple[LoadedModel, np.ndarray]]) -> list[tuple[np.ndarray, float]]:
    """One onnxruntime call per (model, image size) group; (logits, seconds of its group's call) come back in the
    items' order."""
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for index, (loaded, batch) in enumerate(items):
        groups.setdefault((id(loaded), batch.shape[1:]), []).append(index)
    results: list[tuple[np.ndarray, float] | None] = [None] * len(items)
    for indices in groups.values():
        loaded = items[indices[0]][0]
        batches = [items[i][1] for i in indices]
        began = time.perf_counter()
        logits = loaded.model.logits(batches[0] if len(batches) == 1 else np.concatenate(batches))
        seconds = time.perf_counter() - began
        start = 0
        for i, batch in zip(indices, batches, strict=True):
            results[i], start = (logits[start : start + len(batch)], seconds), start + len(batch)
    return results  # type: ignore[return-value]


class Batcher:
    """The replica's one batch queue (Serve keeps it per process: one replica per Ray actor process)."""

    def __init__(self, metrics: ServiceMetrics, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.metrics = metrics
        # 0 s wait: a lone request runs at once; under load, requests that queued during a run go together.
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.settings: dict[str, Any] = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}

    async def logits(self, loaded: LoadedModel, batch_nchw: np.ndarray, stages: Stages | None = None) -> np.ndarray:
        """The batch's logits; with `stages`, the wait is marked as "queue" and onnxruntime's call as "onnx"."""
        logits, onnx_seconds = await self._batched((loaded, batch_nchw))
        if stages is not None:
            stages.mark("queue")
            stages.split("queue", "onnx", onnx_seconds)
        return logits

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _batched(self, items: list[tuple[LoadedModel, np.ndarray]]) -> list[tuple[np.ndarray, float]]:
        self.metrics.batch_size.observe(len(items))
        # On this replica's user-code loop, not a worker thread: two thread hops cost more than they overlap
        # (onnxruntime already keeps the cores busy): in a paired run, -0.4 ms p50 and +10% throughput at c=8.
        # Other requests wait at most one batch's inference; their bodies keep arriving on Serve's HTTP loop.
        return run_grouped(items)
