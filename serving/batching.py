"""Dynamic batching: segmentation requests from every route meet in one `@serve.batch` queue in front of onnxruntime.

The queue collects (model, normalised batch) items from concurrent requests; `run_grouped` groups them by model (a
reload may have swapped it between two requests) and by image size, runs one call per group and hands each request
its own slice back.

With `overlap`, onnxruntime runs in a worker thread, so the replica's loop reads the next requests meanwhile and
up to two batches run at once, as concurrent `session.run` calls do in bare onnxruntime; and a request that finds
nothing in flight skips the queue, whose hand-over to its own task costs about 0.5 ms at concurrency 1 (the
Server-Timing "queue" stage in runs/bench/serve.json). Without `overlap` every run holds the loop, so the requests
that arrive meanwhile can only meet in the queue: all go through it. Off by default: experiment 023 measured no v2
gain at c = 8 on 2 cores (the thread hand-off costs what the queue's does), +27 % for REST PNG at c = 8.
"""

from __future__ import annotations

import asyncio
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

    def __init__(
        self, metrics: ServiceMetrics, max_batch_size: int, batch_wait_timeout_s: float, overlap: bool = False
    ) -> None:
        self.metrics = metrics
        self.overlap = overlap
        self._in_flight = 0  # requests between entering logits() and getting their logits back
        # 0 s wait: a lone request runs at once; under load, requests that queued during a run go together.
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.settings: dict[str, Any] = {
            "max_batch_size": max_batch_size,
            "batch_wait_timeout_s": batch_wait_timeout_s,
            "overlap": overlap,
        }

    async def logits(self, loaded: LoadedModel, batch_nchw: np.ndarray, stages: Stages | None = None) -> np.ndarray:
        """The batch's logits; with `stages`, the wait is marked as "queue" and onnxruntime's call as "onnx"."""
        lone = self.overlap and self._in_flight == 0  # see the module docstring
        self._in_flight += 1
        try:
            if lone:
                logits, onnx_seconds = (await self._run([(loaded, batch_nchw)]))[0]
            else:
                logits, onnx_seconds = await self._batched((loaded, batch_nchw))
        finally:
            self._in_flight -= 1
        if stages is not None:
            stages.mark("queue")
            stages.split("queue", "onnx", onnx_seconds)
        return logits

    # Two batches at most: with `overlap` one can fill the cores while the other's requests are read and answered.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0, max_concurrent_batches=2)
    async def _batched(self, items: list[tuple[LoadedModel, np.ndarray]]) -> list[tuple[np.ndarray, float]]:
        return await self._run(items)

    async def _run(self, items: list[tuple[LoadedModel, np.ndarray]]) -> list[tuple[np.ndarray, float]]:
        self.metrics.batch_size.observe(len(items))
        if self.overlap:
            return await asyncio.to_thread(run_grouped, items)
        # On this replica's user-code loop: a thread hop costs a context switch, and without overlap nothing else
        # would use the freed loop (measured: -0.4 ms p50 and +10% throughput at c=8 against one thread per run).
        # Other requests wait at most one batch's inference; their bodies keep arriving on Serve's HTTP loop.
        return run_grouped(items)
