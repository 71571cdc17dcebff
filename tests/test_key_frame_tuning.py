"""Key-frame tuning: a copy of the network learns the key frame's deformed views, the trained model stays untouched,
and each key frame is tuned once. What it buys on real sequences is measured by `make bench-propagate`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data.normalize import normalize
from training.data.simulator import simulate_sequences
from training.loop import recalibrate_batch_norm
from training.models.propagation.network import PropagationConfig, PropagationNet
from training.propagate.inference import MemoryPolicy, TorchBackend, propagate, propagate_both_ways
from training.propagate.key_frame_tuning import KeyFrameTuner, KeyFrameTuning, tune_on_key_frame
from training.propagate.losses import clip_loss, first_masks
from training.propagate.sequences import random_deform

SMALL = PropagationConfig(key_dim=8, value_dim=16, c4=8, c8=16, c16=24, decoder_width=16)


@pytest.fixture(scope="module")
def sequence() -> tuple[np.ndarray, np.ndarray]:
    frames, labels = simulate_sequences(1, 8, seed=11, style="real-like", size=64)
    return frames[0], labels[0]


def _model(frames: np.ndarray) -> PropagationNet:
    """An untrained network whose batch-norm statistics are those of the sequence (as a trained one's are sane)."""
    torch.manual_seed(0)
    model = PropagationNet(SMALL)
    clip = normalize(torch.from_numpy(frames[:3]).permute(0, 3, 1, 2).float().div(255))[None]
    recalibrate_batch_norm(model, lambda: model(clip, torch.rand(1, 2, *frames.shape[1:3])), 2)
    return model.eval()


def _key_frame_loss(model: PropagationNet, frame: np.ndarray, labels: np.ndarray, objects: list[int]) -> float:
    """The clip loss on a fixed batch of two 3-view clips of the key frame."""
    table = np.zeros(256, np.int64)
    table[objects] = np.arange(1, len(objects) + 1)
    image = torch.from_numpy(frame).permute(2, 0, 1).float().div(255).expand(6, 3, 64, 64)
    views, view_labels = random_deform(
        image, torch.from_numpy(table[labels]).expand(6, 64, 64), KeyFrameTuning().deform, torch.ones(6),
        np.random.default_rng(99),
    )  # fmt: skip
    clip_labels = view_labels.reshape(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(normalize(views).reshape(2, 3, 3, 64, 64), first_masks(clip_labels, len(objects)))
        return clip_loss(logits, clip_labels[:, 1:]).item()


def test_tuning_lowers_the_key_frame_loss_of_a_copy(sequence):
    frames, labels = sequence
    objects = [int(o) for o in np.unique(labels[0]) if o]
    model = _model(frames)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    steps = []
    cfg = KeyFrameTuning(steps=30, learning_rate=3e-3)
    tuned = tune_on_key_frame(model, frames[0], labels[0], objects, cfg, report=lambda step, _: steps.append(step))
    assert steps == [10, 20, 30]
    assert not tuned.training and not any(p.requires_grad for p in tuned.parameters())
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())  # the model is untouched
    assert _key_frame_loss(tuned, frames[0], labels[0], objects) < 0.6 * _key_frame_loss(
        model, frames[0], labels[0], objects
    )
    with pytest.raises(ValueError, match="at least one object"):
        tune_on_key_frame(model, frames[0], np.zeros_like(labels[0]), [], KeyFrameTuning(steps=1))


def test_one_key_frame_is_tuned_once_for_both_directions(sequence):
    frames, labels = sequence
    model, policy = _model(frames), MemoryPolicy()
    finished = []
    tuner = KeyFrameTuner(
        model, KeyFrameTuning(steps=2, learning_rate=1e-2), policy.top_k, lambda s, _: finished.append(s)
    )
    _, confidence = propagate_both_ways(tuner, frames, labels[4], 4, policy)
    assert finished == [2]  # forward and backward both start from frame 4: one tuning
    _, untuned = propagate_both_ways(TorchBackend(model, policy.top_k), frames, labels[4], 4, policy)
    assert not np.allclose(confidence, untuned)
    propagate(tuner, frames, labels[0], policy)  # another key frame: tuned again
    assert finished == [2, 2]
