"""Dynamic batching's inner step: requests that queued together run as few onnxruntime calls as possible.

`@serve.batch` in the app collects (model, normalised batch) items from concurrent requests; this groups them by
model (a reload may have swapped it between two requests) and by image size, runs one call per group and hands
each request its own slice back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from serving.loaded import LoadedModel


def run_grouped(items: list[tuple[LoadedModel, np.ndarray]]) -> list[np.ndarray]:
    """One onnxruntime call per (model, image size) group; results come back in the items' order."""
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for index, (loaded, batch) in enumerate(items):
        groups.setdefault((id(loaded), batch.shape[1:]), []).append(index)
    results: list[np.ndarray | None] = [None] * len(items)
    for indices in groups.values():
        loaded = items[indices[0]][0]
        batches = [items[i][1] for i in indices]
        logits = loaded.model.logits(batches[0] if len(batches) == 1 else np.concatenate(batches))
        start = 0
        for i, batch in zip(indices, batches, strict=True):
            results[i], start = logits[start : start + len(batch)], start + len(batch)
    return results  # type: ignore[return-value]
