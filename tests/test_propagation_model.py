"""The propagation network: shapes, multi-object aggregation, the memory read (L2 affinity, top-k), the memory
policy's bound, and bidirectional propagation from a key frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.memory_stream import winning_channels
from training.models.propagation.memory import affinity, read, readout
from training.models.propagation.network import PropagationConfig, PropagationNet, flatten_memory
from training.propagate.inference import MemoryPolicy, TorchBackend, propagate, propagate_both_ways

SMALL = PropagationConfig(key_dim=8, value_dim=16, c4=8, c8=16, c16=24, decoder_width=16)


@pytest.fixture(scope="module")
def model() -> PropagationNet:
    torch.manual_seed(0)
    return PropagationNet(SMALL).eval()


def test_shapes_and_multi_object_probabilities(model):
    frames = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        key, f16, f8, f4 = model.encode_key(frames)
        assert key.shape == (2, 8, 4, 6) and f16.shape == (2, 24, 4, 6)
        assert f8.shape == (2, 16, 8, 12) and f4.shape == (2, 8, 16, 24)
        values = model.encode_value(frames, f16, torch.rand(2, 3, 64, 96))
        assert values.shape == (2, 3, 16, 4, 6)  # (B, N, Dv, h, w)
        memory_keys, memory_values = flatten_memory(torch.stack([key, key], 1), torch.stack([values, values], 2))
        assert memory_keys.shape == (2, 8, 48) and memory_values.shape == (2, 3, 16, 48)
        logits = model.segment(key, f16, f8, f4, memory_keys, memory_values, top_k=5)
    assert logits.shape == (2, 4, 64, 96)  # background + 3 objects
    probs = logits.softmax(1)
    assert torch.allclose(probs.sum(1), torch.ones(2, 64, 96), atol=1e-5)


def test_training_forward_has_gradients(model):
    model.train()
    frames = torch.randn(2, 3, 3, 32, 32)
    logits = model(frames, torch.rand(2, 2, 32, 32))
    assert logits.shape == (2, 2, 3, 32, 32)  # (B, K − 1, N + 1, H, W)
    logits.mean().backward()
    assert model.value_encoder.fuse[0][0].weight.grad is not None
    model.zero_grad()
    model.eval()


def test_decoder_shares_the_query_skips_across_objects_and_batch_items(model):
    """The skip convs run once per frame and are broadcast over objects: the result must be the per-object decoder,
    each object of batch item b fused with item b's features (a wrong broadcast order mixes the two items)."""
    torch.manual_seed(3)
    decoder = model.decoder
    b, n = 2, 3
    readout = torch.randn(b * n, 16, 4, 6)
    f16, f8, f4 = torch.randn(b, 24, 4, 6), torch.randn(b, 16, 8, 12), torch.randn(b, 8, 16, 24)

    def per_object_block(block, skip, coarse):
        up = torch.nn.functional.interpolate(coarse, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return block.out(block.skip(skip) + up)

    def repeat(x):
        return x.repeat_interleave(n, dim=0)

    with torch.no_grad():
        x = decoder.compress(torch.cat([readout, repeat(f16)], dim=1))
        x = per_object_block(decoder.up4, repeat(f4), per_object_block(decoder.up8, repeat(f8), x))
        expected = decoder.head(x)
        assert torch.allclose(decoder(readout, f16, f8, f4), expected, atol=1e-5)


def test_affinity_is_softmax_of_negative_squared_distance():
    torch.manual_seed(1)
    memory, query = torch.randn(1, 4, 10), torch.randn(1, 4, 3)
    expected = (-((memory[0, :, None, :] - query[0, :, :, None]) ** 2).sum(0) / 2).softmax(1)  # (Q, M); sqrt(Dk) = 2
    assert torch.allclose(affinity(memory, query)[0], expected, atol=1e-6)


def test_top_k_read_averages_the_k_nearest_memory_positions_per_query():
    torch.manual_seed(2)
    memory, query, values = torch.randn(2, 4, 50), torch.randn(2, 4, 7), torch.randn(2, 3, 6, 50)  # B, N, Dv, M
    weights = affinity(memory, query)  # (B, Q, M); softmax is monotone, so its top 5 are the similarity's
    best = weights.topk(5, dim=2).indices
    kept = torch.zeros_like(weights).scatter(2, best, 1.0)
    expected = readout(weights * kept / (weights * kept).sum(2, keepdim=True), values)
    got = read(memory, query, values, top_k=5)
    assert got.shape == (2, 3, 6, 7)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(read(memory, query, values, top_k=500), readout(weights, values), atol=1e-5)  # k ≥ M
    assert torch.allclose(read(memory, query, values, top_k=None), readout(weights, values))
    # Each batch item reads its own memory only.
    assert torch.allclose(read(memory[1:], query[1:], values[1:], top_k=5), got[1:], atol=1e-6)


class CountingBackend(TorchBackend):
    """Records how many memory frames each segment call reads, the keys it reads and the query's key."""

    def __init__(self, model, top_k):
        super().__init__(model, top_k)
        self.memory_sizes, self.memory_keys, self.query_keys = [], [], []

    def segment(self, key, f16, f8, f4, memory_keys, memory_values):
        self.memory_sizes.append(memory_keys.shape[0])
        self.memory_keys.append(memory_keys)
        self.query_keys.append(key)
        assert memory_values.shape[1] == memory_keys.shape[0]
        return super().segment(key, f16, f8, f4, memory_keys, memory_values)


def test_memory_policy_is_bounded(model):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[4:12, 4:12], mask[20:30, 18:28] = 1, 4
    backend = CountingBackend(model, top_k=10)
    policy = MemoryPolicy(mem_every=2, max_memory=3, previous_frame=False)
    labels, confidence = propagate(backend, frames, mask, policy)
    assert labels.shape == (20, 32, 32) and set(np.unique(labels)) <= {0, 1, 4}
    assert (labels[0] == mask).all() and (confidence[0] == 1).all()
    # frame t reads 1 + (t − 1) // 2 frames until the bound of 3 is reached
    assert backend.memory_sizes[:5] == [1, 1, 2, 2, 3] and max(backend.memory_sizes) == 3


def test_previous_frame_is_a_temporary_entry(model):
    """With previous_frame, frame t also reads frame t − 1 (last, after the memory) unless t − 1 is kept anyway."""
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[4:12, 4:12] = 2
    backend = CountingBackend(model, top_k=10)
    propagate(backend, frames, mask, MemoryPolicy(mem_every=2, max_memory=3, previous_frame=True))
    # t = 1..6 (kept: 2, 4, ...): key | key+1 | key+2 | key+2+3 | key+2+4 | key+2+4+5 ... never over max_memory + 1
    assert backend.memory_sizes[:6] == [1, 2, 2, 3, 3, 4] and max(backend.memory_sizes) == 4
    for t in (2, 4, 6, 11):  # frame t − 1 was not kept: its key is the last one read
        assert np.array_equal(backend.memory_keys[t - 1][-1], backend.query_keys[t - 2][0])


def test_flip_average_is_mirror_symmetric(model):
    """Two streams (frames and mirrored frames, each with its own memory) averaged: mirroring the input mirrors the
    output, which the network alone does not do; a probability flipped back the wrong way would break it. (Up to
    rounding: the same values at another address may take another SIMD path, and this untrained net's object
    probabilities nearly tie, so the winning probabilities are compared rather than the labels.)"""
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 255, (7, 32, 48, 3), dtype=np.uint8)
    mask = np.zeros((32, 48), np.uint8)
    mask[4:14, 2:20], mask[18:30, 30:44] = 1, 2
    mirrored_frames, mirrored_mask = np.ascontiguousarray(frames[:, :, ::-1]), np.ascontiguousarray(mask[:, ::-1])
    backend = TorchBackend(model, None)
    for flip_average in (True, False):
        policy = MemoryPolicy(mem_every=2, max_memory=3, flip_average=flip_average)
        labels, confidence = propagate(backend, frames, mask, policy)
        mirrored, mirrored_confidence = propagate(backend, mirrored_frames, mirrored_mask, policy)
        asymmetry = np.abs(mirrored_confidence - confidence[:, :, ::-1]).max()
        if flip_average:
            assert asymmetry < 1e-5 and (labels[0] == mask).all() and (mirrored[0] == mirrored_mask).all()
        else:
            assert asymmetry > 1e-3


def test_an_ensemble_averages_its_members_streams(model):
    """A list of backends: each keeps its own memory and the frame takes the mean; a model twice is that model."""
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[6:20, 4:18] = 1
    torch.manual_seed(1)
    other = TorchBackend(PropagationNet(SMALL).eval(), None)
    single, single_confidence = propagate(TorchBackend(model, None), frames, mask, MemoryPolicy())
    twice, twice_confidence = propagate([TorchBackend(model, None)] * 2, frames, mask, MemoryPolicy())
    assert np.array_equal(twice, single) and np.array_equal(twice_confidence, single_confidence)
    counting = CountingBackend(model, top_k=None)
    _, mixed_confidence = propagate([counting, other], frames, mask, MemoryPolicy())
    _, other_confidence = propagate(other, frames, mask, MemoryPolicy())
    assert len(counting.memory_sizes) == 5  # every later frame read once from this member's own memory
    assert not np.allclose(mixed_confidence, single_confidence) and not np.allclose(mixed_confidence, other_confidence)


def test_min_area_gives_a_speck_its_next_most_probable_label():
    """A hand-made frame, 10×10 = 100 pixels: object 2 wins 3 pixels (object 1 second there), background wins 2."""
    probs = np.zeros((4, 10, 10), np.float32)
    probs[1] = 0.6  # object 1 everywhere...
    probs[0, 0, :2] = 0.9  # ...but background takes 2 pixels,
    probs[2, 5, 5:8], probs[1, 5, 5:8] = 0.5, 0.4  # object 2 takes 3,
    probs[3, 9, :5] = 0.7  # and object 3 takes 5
    plain = winning_channels(probs)
    assert np.bincount(plain.ravel(), minlength=4).tolist() == [2, 90, 3, 5]
    assert np.array_equal(winning_channels(probs, 0.0), plain)
    dropped = winning_channels(probs, 0.04)  # under 4 pixels: object 2 only (background never drops out)
    assert np.bincount(dropped.ravel(), minlength=4).tolist() == [2, 93, 0, 5]
    assert (dropped[5, 5:8] == 1).all()
    assert np.bincount(winning_channels(probs, 0.05).ravel(), minlength=4).tolist() == [2, 93, 0, 5]  # 5 stays
    assert np.bincount(winning_channels(probs, 0.06).ravel(), minlength=4).tolist() == [2, 98, 0, 0]


def test_the_cli_defaults_are_the_policy_defaults():
    from pipelines.propagate_cli import DEFAULT_MAX_MEMORY, DEFAULT_MIN_AREA

    assert DEFAULT_MIN_AREA == MemoryPolicy().min_area > 0
    assert MemoryPolicy().max_memory == DEFAULT_MAX_MEMORY


def test_min_area_changes_the_labels_not_the_memory(model):
    """Only the pixels of objects under the bound change, frame by frame: what was remembered is the same."""
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[2:20, 2:20], mask[22:26, 22:26], mask[26:30, 2:6] = 1, 2, 5
    plain, plain_confidence = propagate(TorchBackend(model, None), frames, mask, MemoryPolicy())
    min_area = 0.05
    bounded, confidence = propagate(TorchBackend(model, None), frames, mask, MemoryPolicy(min_area=min_area))
    assert np.array_equal(bounded[0], mask)  # the given frame is never touched
    dropped_somewhere = False
    for t in range(1, len(frames)):
        counts = np.bincount(plain[t].ravel(), minlength=6)
        small = [o for o in (1, 2, 5) if 0 < counts[o] < min_area * plain[t].size]
        specks = np.isin(plain[t], small)
        assert np.array_equal(bounded[t][~specks], plain[t][~specks])
        assert not np.isin(bounded[t], small).any()
        assert np.array_equal(confidence[t][~specks], plain_confidence[t][~specks])
        assert (confidence[t][specks] <= plain_confidence[t][specks]).all()  # the next label's, not the speck's
        dropped_somewhere |= bool(specks.any())
    assert dropped_somewhere  # the bound mattered here, so the comparison above tested something


def test_bidirectional_from_a_middle_key_frame(model):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 3
    labels, _ = propagate_both_ways(TorchBackend(model, None), frames, mask, 4, MemoryPolicy())
    assert labels.shape == (9, 32, 32) and (labels[4] == mask).all()
    with pytest.raises(ValueError, match="outside"):
        propagate_both_ways(TorchBackend(model, None), frames, mask, 9, MemoryPolicy())
    with pytest.raises(ValueError, match="multiples of 16"):
        propagate(TorchBackend(model, None), frames[:, :30], mask[:30], MemoryPolicy())


def test_batch_norm_recalibration_is_the_plain_average_of_the_batches():
    from training.loop import recalibrate_batch_norm

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.BatchNorm2d(1))
    torch.nn.init.ones_(net[0].weight)
    shifts = iter([1.0, 2.0, 6.0])
    net.eval()  # restored afterwards

    def run_batch():
        net(torch.randn(4, 1, 8, 8) + next(shifts))

    recalibrate_batch_norm(net, run_batch, batches=3)
    # The momentum (0.1) estimate from zero would be about 0.86; the plain average of the three means is 3.
    assert abs(net[1].running_mean.item() - 3.0) < 0.15
    assert net[1].momentum == 0.1 and not net.training


def test_a_run_is_not_resumed_with_another_model(tmp_path):
    from training.config import ConfigError, load_config
    from training.loop import STATE_FILE, check_resumable
    from training.propagate.config import PropagateJobConfig

    cfg = load_config(PropagateJobConfig, None, ["name=run", f"runs_dir={tmp_path}"])
    check_resumable(cfg)  # no checkpoint yet
    saved = tmp_path / "ray" / "run" / "checkpoint_2026-12-02_00-00-00.000000"
    saved.mkdir(parents=True)
    torch.save({"config": cfg.model_dump(mode="json")}, saved / STATE_FILE)
    check_resumable(cfg)  # same model: resumes
    wider = load_config(PropagateJobConfig, None, ["name=run", f"runs_dir={tmp_path}", "model.c16=256"])
    with pytest.raises(ConfigError, match=r"run 'run' .* --fresh"):
        check_resumable(wider)
