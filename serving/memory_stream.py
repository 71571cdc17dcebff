"""The propagation stream step of the graphs' contract (training/propagate/export.py's docstring), written once
over numpy: serving's onnxruntime streams use it, and training's torch and onnxruntime backends can (it imports
neither torch nor training).

Shapes, as in the contract: image (1, 3, H, W) normalised float32; masks_n1hw (N, 1, H, W) in [0, 1]; probs
(1, N + 1, H, W) with background in channel 0; key (1, Dk, h, w), value (N, Dv, h, w), h, w = H/16, W/16.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Graphs(Protocol):
    """The three graphs as numpy in, numpy out (onnxruntime sessions, or a torch model behind the same calls)."""

    def encode_key(self, image: np.ndarray) -> Sequence[np.ndarray]: ...  # key, f16, f8, f4

    def encode_value(self, image: np.ndarray, f16: np.ndarray, masks_n1hw: np.ndarray) -> np.ndarray: ...

    def segment(
        self,
        key: np.ndarray,
        f16: np.ndarray,
        f8: np.ndarray,
        f4: np.ndarray,
        memory_keys: np.ndarray,
        memory_values: np.ndarray,
    ) -> np.ndarray: ...


class MemoryRules(Protocol):
    """What decides which frames the memory holds: the contract's `endoflow.memory` (or training's MemoryPolicy)."""

    mem_every: int
    max_memory: int
    previous_frame: bool


def one_hot(labels_hw: np.ndarray, objects: Sequence[int]) -> np.ndarray:
    """(N, 1, H, W) float32 masks of `objects` in a label map."""
    return np.stack([(labels_hw == o) for o in objects])[:, None].astype(np.float32)


def winning_channels(probs_nhw: np.ndarray, min_area: float = 0.0) -> np.ndarray:
    """(H, W) channel index of one frame's probabilities (N + 1, H, W): each pixel's most probable of background
    and the objects. An object winning fewer than `min_area` of the frame's pixels is taken as absent from the frame
    and its pixels get their next most probable label: J and F score an object painted on a frame without it 0,
    and a speck is more often such a ghost than the object itself. Background is never dropped. One pass: an
    object that shrinks under the bound only because another was dropped stays."""
    winners = probs_nhw.argmax(0)
    if min_area > 0:
        counts = np.bincount(winners.ravel(), minlength=len(probs_nhw))
        absent = np.flatnonzero((counts > 0) & (counts < min_area * winners.size))
        absent = absent[absent > 0]
        if absent.size:
            kept = probs_nhw.copy()
            kept[absent] = -1.0
            winners = kept.argmax(0)
    return winners


class MemoryStream:
    """One view's bounded memory over a stream: frames go in (mirrored when `mirrored`), probabilities come out in
    the frames' own orientation, and `remember` stores a frame with the probabilities finally chosen for it.
    Not thread-safe: the caller serialises the frames of one stream."""

    def __init__(self, graphs: Graphs, rules: MemoryRules, mirrored: bool = False) -> None:
        self.graphs, self.rules, self.mirrored = graphs, rules, mirrored
        self.memory: list[tuple[np.ndarray, np.ndarray]] = []
        self.previous: tuple[np.ndarray, np.ndarray] | None = None  # the last frame when it is not in `memory`
        self.query: tuple[np.ndarray, ...] = ()

    def _view(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array[..., ::-1]) if self.mirrored else array

    def start(self, image: np.ndarray, masks_n1hw: np.ndarray) -> None:
        """The key frame (t = 0) with its objects' masks: the memory's first entry, which always stays."""
        image = self._view(image)
        key, f16, _, _ = self.graphs.encode_key(image)
        self.memory = [(key, self.graphs.encode_value(image, f16, self._view(masks_n1hw)))]

    def read(self, image: np.ndarray) -> np.ndarray:
        """Probabilities (1, N + 1, H, W) of a new frame from the memory (and the previous frame)."""
        image = self._view(image)
        key, f16, f8, f4 = self.graphs.encode_key(image)
        read = self.memory if self.previous is None else [*self.memory, self.previous]
        memory_keys = np.concatenate([k for k, _ in read], axis=0)
        memory_values = np.stack([v for _, v in read], axis=1)
        self.query = (image, key, f16)
        return self._view(self.graphs.segment(key, f16, f8, f4, memory_keys, memory_values))

    def remember(self, t: int, probs: np.ndarray) -> None:
        """After frame t was read: keep it (every mem_every-th frame) or hold it as the temporary previous entry."""
        (image, key, f16), self.query = self.query, ()  # held from read to here only, not for the stream's life
        self.previous, keep = None, t % self.rules.mem_every == 0
        if keep or self.rules.previous_frame:
            masks = np.ascontiguousarray(self._view(probs)[0, 1:, None])
            entry = (key, self.graphs.encode_value(image, f16, masks))
            if keep:
                self.memory.append(entry)
                if len(self.memory) > self.rules.max_memory:
                    del self.memory[1]  # the key frame stays
            else:
                self.previous = entry
