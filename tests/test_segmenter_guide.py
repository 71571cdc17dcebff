"""The segmenter guide: a semantic segmenter's class probabilities mixed into every propagated frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.models.propagation.network import PropagationConfig, PropagationNet
from training.propagate.inference import (
    MemoryPolicy,
    SegmenterGuide,
    TorchBackend,
    propagate,
    propagate_both_ways,
    propagate_from_keys,
)

SMALL = PropagationConfig(key_dim=8, value_dim=16, c4=8, c8=16, c16=24, decoder_width=16)
CLASSES = 7


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    torch.manual_seed(0)
    return TorchBackend(PropagationNet(SMALL).eval(), None)


def frame_dependent_guide(length: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (T, 7, H, W) whose winner in the left half is class 1 on even frames and class 3 on odd
    ones (background on the right), and the label maps they mean."""
    probs = np.full((length, CLASSES, size, size), 0.02, np.float32)
    expected = np.zeros((length, size, size), np.uint8)
    for t in range(length):
        winner = 1 if t % 2 == 0 else 3
        probs[t, winner, :, : size // 2] = 0.88
        probs[t, 0, :, size // 2 :] = 0.88
        expected[t, :, : size // 2] = winner
    return probs, expected


def test_mix_takes_background_as_what_the_objects_leave():
    probs = np.zeros((2, CLASSES, 1, 2), np.float32)
    probs[0, 0] = 0.5  # frame 0: half background, the rest on class 2 and class 5 (not an object)
    probs[0, 2] = 0.3
    probs[0, 5] = 0.2
    propagated = np.array([[[[0.2, 0.6]], [[0.8, 0.4]]]], np.float32)  # (1, background + 1 object, 1, 2)
    mixed = SegmenterGuide(probs, weight=0.25).mix(0, propagated, objects=[2])
    guide = np.array([[[[0.7, 0.7]], [[0.3, 0.3]]]], np.float32)  # background = 1 - P(class 2)
    np.testing.assert_allclose(mixed, 0.75 * propagated + 0.25 * guide, atol=1e-6)
    np.testing.assert_allclose(SegmenterGuide(probs, weight=0).mix(0, propagated, [2]), propagated)


def test_full_weight_labels_every_frame_by_the_segmenter_in_both_directions(backend):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (7, 32, 32, 3), dtype=np.uint8)
    probs, expected = frame_dependent_guide(7)
    key = np.zeros((32, 32), np.uint8)
    key[4:12, 4:12], key[20:28, 20:28] = 1, 3
    guide = SegmenterGuide(probs, weight=1.0)
    forward, _ = propagate(backend, frames, key, MemoryPolicy(), guide=guide)
    assert (forward[0] == key).all() and (forward[1:] == expected[1:]).all()
    both, _ = propagate_both_ways(backend, frames, key, 3, MemoryPolicy(), guide=guide)
    assert (both[3] == key).all()
    assert all((both[t] == expected[t]).all() for t in range(7) if t != 3)  # the backward run is not misaligned
    keys = {1: key, 5: key}
    spans, _ = propagate_from_keys(backend, frames, keys, MemoryPolicy(), guide=guide)
    assert all((spans[t] == (key if t in keys else expected[t])).all() for t in range(7))


def test_memory_remembers_the_guided_masks(backend):
    """What a frame writes into memory is its mixed probabilities, so later frames read the segmenter's view too."""
    remembered = []

    class Recording(TorchBackend):
        def encode_value(self, image, f16, masks):
            remembered.append(masks.copy())
            return super().encode_value(image, f16, masks)

    recording = Recording(backend.model, None)
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    key = np.zeros((32, 32), np.uint8)
    key[8:24, 8:24] = 1
    probs, _ = frame_dependent_guide(3)
    propagate(recording, frames, key, MemoryPolicy(mem_every=1), guide=SegmenterGuide(probs, 1.0))
    assert len(remembered) == 3  # the key frame, then frames 1 and 2
    np.testing.assert_allclose(remembered[1][:, 0], probs[1, [1]], atol=1e-6)  # object 1 = class 1 of frame 1
    np.testing.assert_allclose(remembered[2][:, 0], probs[2, [1]], atol=1e-6)


def test_a_guide_that_does_not_fit_is_refused(backend):
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    key = np.zeros((32, 32), np.uint8)
    key[:8] = 6
    with pytest.raises(ValueError, match="classes"):
        propagate(backend, frames, key, MemoryPolicy(), guide=SegmenterGuide(np.zeros((3, 4, 32, 32), np.float32)))
    with pytest.raises(ValueError, match="frames"):
        propagate(backend, frames, key, MemoryPolicy(), guide=SegmenterGuide(np.zeros((3, 7, 16, 16), np.float32)))
    with pytest.raises(ValueError, match="2 frames of probabilities for 3"):
        propagate(backend, frames, key, MemoryPolicy(), guide=SegmenterGuide(np.zeros((2, 7, 32, 32), np.float32)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SegmenterGuide(np.zeros((3, 7, 32, 32), np.float32), weight=1.5)
