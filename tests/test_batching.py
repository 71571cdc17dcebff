"""serving/batching.py outside a Serve replica: concurrent requests are batched, every one gets its own logits back;
with `overlap` two batches run at once off the event loop and a lone request skips the queue."""

import asyncio
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from serving.batching import Batcher
from serving.metrics import ServiceMetrics
from serving.timing import Stages


class SlowModel:
    """Doubles its input after a short sleep (the GIL is released, as in onnxruntime), counting runs at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.most_at_once = 0
        self.batch_sizes: list[int] = []

    def logits(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.batch_sizes.append(len(batch))
        time.sleep(0.02)
        with self.lock:
            self.running -= 1
        return batch * 2


@pytest.fixture(autouse=True)
def replica_context(monkeypatch):
    # `@serve.batch` reads the replica's max_ongoing_requests when its queue is made; the service sets 64.
    from ray import serve

    config = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: config)


def run_requests(overlap: bool, count: int) -> tuple[SlowModel, list[np.ndarray], list[np.ndarray], list[Stages]]:
    """`count` concurrent requests through a fresh Batcher, in a forked process: Serve keeps one batch queue per
    decorated method and process, bound to the event loop it first ran on (the replica's, in a service)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(_requests_in_this_process, overlap, count).result(timeout=60)


def _requests_in_this_process(overlap: bool, count: int):
    model = SlowModel()
    loaded = SimpleNamespace(model=model)
    batches = [np.full((1, 3, 4, 4), i, np.float32) for i in range(count)]
    stages = [Stages() for _ in batches]

    async def main() -> list[np.ndarray]:
        batcher = Batcher(ServiceMetrics(), max_batch_size=8, batch_wait_timeout_s=0.0, overlap=overlap)
        return await asyncio.gather(*(batcher.logits(loaded, b, s) for b, s in zip(batches, stages, strict=True)))

    results = asyncio.run(main())
    model.lock = None  # a lock does not pickle back to the test's process
    return model, batches, results, stages


@pytest.mark.parametrize("overlap", [False, True])
def test_every_request_gets_its_own_logits(overlap):
    _, batches, results, stages = run_requests(overlap, count=9)
    for batch, logits in zip(batches, results, strict=True):
        np.testing.assert_array_equal(logits, batch * 2)
    assert all({"queue", "onnx"} <= set(s.durations) for s in stages)


def test_without_overlap_runs_hold_the_loop_and_requests_meet_in_the_queue():
    model, _, _, _ = run_requests(overlap=False, count=9)
    assert model.most_at_once == 1
    assert sorted(model.batch_sizes) == [1, 8]  # at most max_batch_size per run


def test_with_overlap_a_lone_request_skips_the_queue_and_two_batches_run_at_once():
    lone, _, _, _ = run_requests(overlap=True, count=1)
    assert lone.batch_sizes == [1]
    model, _, _, _ = run_requests(overlap=True, count=9)
    assert model.most_at_once == 2
    assert sorted(model.batch_sizes) == [1, 8]  # the first skips the queue; the rest meet there while it runs
