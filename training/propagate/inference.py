"""Propagation inference in torch: a bounded space-time memory, video forward and bidirectional from a key frame,
and volumes slice by slice in both directions from annotated or key slices.

Frames are uint8 (T, H, W, 3) with H, W multiples of 16; label maps are uint8 (T, H, W) whose non-zero values are
the objects (0 is background). The memory policy and the stream are exactly what training/propagate/export.py's
contract tells an onnxruntime client to do: the stream step itself (MemoryStream, winning_channels) is serving's
torch-free serving/memory_stream.py, so training and serving run one implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field

from serving.memory_stream import MemoryStream, one_hot, winning_channels
from training.config import StrictModel
from training.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from training.models.propagation.network import KEY_STRIDE, PropagationNet

_MEAN = np.array(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
_STD = np.array(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)


class MemoryPolicy(StrictModel):
    """Which frames enter the memory: the key frame always, then every `mem_every`-th frame, at most `max_memory`
    frames (the oldest non-key frame leaves first). previous_frame: the frame just segmented is also read, as a
    temporary entry replaced at the next step (as in STM); training clips always have it in memory, so inference
    without it reads a memory unlike the one the network learnt from. top_k: each query position reads its k best
    memory positions. mem_every 2 rather than 5: on vocalfolds seq1–3 J&F 0.766 against 0.716 (bench model), 0.750
    against 0.724 (a wider one), at about the same speed, as the memory stays bounded. flip_average: a second stream
    with its own memory runs on the mirrored frames, and every frame takes the mean of both streams' probabilities
    (test-time augmentation at twice the cost; an offline option, not part of the graphs' streaming contract).
    min_area: an object winning less than this fraction of a frame is taken as absent from that frame
    (winning_channels); it changes the labels only, the memory still gets the probabilities. 0.005 was chosen on
    vocalfolds seq1–3 and simulator sequences, and kept by a rule fixed beforehand: held-out seq4 gained 0.031, 0.026
    and 0.032 on three 30-epoch bench seeds (docs/experiments/007-min-area.md). max_memory 16, with the 45-epoch
    bench: by a rule fixed before its training, a fresh seed scored held-out seq4 (66 frames, which outgrow a memory
    of 8) 0.767 against 0.735 with 8, and the first 45-epoch seed 0.751 against 0.729
    (docs/experiments/014-45-epochs-memory-16-seed-1.md and 009-longer-memory.md); the short
    sequences of seq1–3 and the simulator hardly change. It costs 0–20 % of the frames/s (40–67 on 2 cores; one
    slower machine fell to 26.5–27.6, where max_memory 8 keeps the stream near 30)."""

    mem_every: int = Field(2, ge=1)
    max_memory: int = Field(16, ge=1)
    previous_frame: bool = True
    top_k: int | None = Field(20, ge=1)
    flip_average: bool = False
    min_area: float = Field(0.005, ge=0, lt=1)


class TorchBackend:
    """The model's three graphs on numpy arrays with the contract's shapes (see export.py)."""

    def __init__(self, model: PropagationNet, top_k: int | None) -> None:
        self.model = model.eval()
        self.top_k = top_k

    @torch.no_grad()
    def encode_key(self, image: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(t.numpy() for t in self.model.encode_key(torch.from_numpy(image)))

    @torch.no_grad()
    def encode_value(self, image: np.ndarray, f16: np.ndarray, masks_n1hw: np.ndarray) -> np.ndarray:
        masks = torch.from_numpy(masks_n1hw)[:, 0].unsqueeze(0)
        return self.model.encode_value(torch.from_numpy(image), torch.from_numpy(f16), masks)[0].numpy()

    @torch.no_grad()
    def segment(self, key, f16, f8, f4, memory_keys_tdhw, memory_values_ntdhw) -> np.ndarray:
        t, dk = memory_keys_tdhw.shape[:2]
        n, _, dv = memory_values_ntdhw.shape[:3]
        keys = torch.from_numpy(memory_keys_tdhw).permute(1, 0, 2, 3).reshape(1, dk, -1)
        values = torch.from_numpy(memory_values_ntdhw).permute(0, 2, 1, 3, 4).reshape(1, n, dv, -1)
        tensors = [torch.from_numpy(a) for a in (key, f16, f8, f4)]
        return self.model.segment_probs(*tensors, keys, values, self.top_k).numpy()


def prepare_frame(frame_hw3: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) → normalised float32 (1, 3, H, W)."""
    height, width = frame_hw3.shape[:2]
    if height % KEY_STRIDE or width % KEY_STRIDE:
        raise ValueError(f"frames are {width}x{height}; expected sides that are multiples of {KEY_STRIDE}")
    unit = frame_hw3.astype(np.float32).transpose(2, 0, 1)[None] / 255.0
    return ((unit - _MEAN) / _STD).astype(np.float32)  # numpy: no torch thread pool competing with onnxruntime


@dataclass(frozen=True)
class SegmenterGuide:
    """A semantic segmenter's class probabilities (T, C, H, W) for the frames being propagated, mixed into each
    propagated frame with `weight` before the frame is labelled and remembered. The memory forgets a region that
    leaves the view, and the key frame may show it only at its edge; the segmenter recognises it by class when it
    comes back. Object o is class o: propagation here runs on class label maps. It helps only as far as the
    segmenter is right: one trained on vocalfolds seq1-3 lowered held-out seq4 at weight 0.5
    (docs/experiments/001-key-frame-tuning-and-segmenter-guide.md)."""

    probs_tchw: np.ndarray
    weight: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.weight <= 1:
            raise ValueError(f"segmenter guide weight {self.weight}: expected a value in [0, 1]")

    def frames(self, selection: slice) -> SegmenterGuide:
        """The guide of a run of the frames (a slice, reversed for backward propagation)."""
        return SegmenterGuide(self.probs_tchw[selection], self.weight)

    def mix(self, t: int, probs_1nhw: np.ndarray, objects: Sequence[int]) -> np.ndarray:
        classes = self.probs_tchw[t]
        if classes.shape[-2:] != probs_1nhw.shape[-2:] or max(objects) >= len(classes):
            raise ValueError(
                f"segmenter guide: probabilities {classes.shape[-2:]} of {len(classes)} classes, but the frames are "
                f"{probs_1nhw.shape[-2:]} and the objects {list(objects)}; expected the frames' size and every "
                "object label among the classes"
            )
        of_objects = classes[list(objects)]
        background = np.clip(1 - of_objects.sum(0, keepdims=True), 0, 1)
        guide = np.concatenate([background, of_objects])[None]
        return ((1 - self.weight) * probs_1nhw + self.weight * guide).astype(np.float32)


def propagate(
    backend,
    frames_thw3: np.ndarray,
    key_labels_hw: np.ndarray,
    policy: MemoryPolicy,
    objects: Sequence[int] | None = None,
    guide: SegmenterGuide | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stream frames[0] (with its given labels) → frames[-1]: label maps (T, H, W) uint8 and the winning class's
    probability (T, H, W) float32 (1 on the key frame). `backend` may be a list of backends (an ensemble): each runs
    its own streams, and every frame takes the mean of all the streams' probabilities. A member with a `tuned_for`
    method (key_frame_tuning.KeyFrameTuner) is asked for the backend to use from this key frame. `guide`: a
    segmenter's probabilities of these frames, mixed into every propagated frame (SegmenterGuide)."""
    objects = [int(o) for o in (objects if objects is not None else np.unique(key_labels_hw)) if o != 0]
    if guide is not None and len(guide.probs_tchw) != len(frames_thw3):
        given, expected = len(guide.probs_tchw), len(frames_thw3)
        raise ValueError(f"segmenter guide: {given} frames of probabilities for {expected} frames")
    labels = np.zeros(frames_thw3.shape[:3], np.uint8)
    confidence = np.ones(frames_thw3.shape[:3], np.float32)
    labels[0] = np.where(np.isin(key_labels_hw, objects), key_labels_hw, 0)
    if not objects:
        return labels, confidence
    lookup = np.array([0, *objects], np.uint8)
    backends = [
        member.tuned_for(frames_thw3[0], labels[0], objects) if hasattr(member, "tuned_for") else member
        for member in (backend if isinstance(backend, list | tuple) else [backend])
    ]
    views = [False, True] if policy.flip_average else [False]
    streams = [MemoryStream(member, policy, mirrored) for member in backends for mirrored in views]
    for stream in streams:
        stream.start(prepare_frame(frames_thw3[0]), one_hot(labels[0], objects))
    for t in range(1, len(frames_thw3)):
        image = prepare_frame(frames_thw3[t])
        probs = sum(stream.read(image) for stream in streams) / len(streams)
        if guide is not None:
            probs = guide.mix(t, probs, objects)
        winners = winning_channels(probs[0], policy.min_area)
        labels[t] = lookup[winners]
        confidence[t] = np.take_along_axis(probs[0], winners[None], 0)[0]
        for stream in streams:
            stream.remember(t, probs)
    return labels, confidence


def propagate_both_ways(
    backend,
    frames_thw3: np.ndarray,
    key_labels_hw: np.ndarray,
    key_index: int,
    policy: MemoryPolicy,
    guide: SegmenterGuide | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """From a key frame in the middle: forward to the last frame and backward to the first."""
    if not 0 <= key_index < len(frames_thw3):
        raise ValueError(f"key frame {key_index} is outside the {len(frames_thw3)} frames")
    forward_guide = backward_guide = None
    if guide is not None:
        forward_guide, backward_guide = guide.frames(slice(key_index, None)), guide.frames(slice(key_index, None, -1))
    forward = propagate(backend, frames_thw3[key_index:], key_labels_hw, policy, guide=forward_guide)
    backward = propagate(backend, frames_thw3[: key_index + 1][::-1], key_labels_hw, policy, guide=backward_guide)
    labels = np.concatenate([backward[0][::-1][:-1], forward[0]])
    confidence = np.concatenate([backward[1][::-1][:-1], forward[1]])
    return labels, confidence


def propagate_from_keys(
    backend,
    frames_thw3: np.ndarray,
    key_labels: dict[int, np.ndarray],
    policy: MemoryPolicy,
    guide: SegmenterGuide | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Several key frames (index → labels): every frame takes the result propagated from its nearest key frame,
    each key propagating both ways up to its neighbours. This is how annotated slices fill a volume."""
    if not key_labels:
        raise ValueError("at least one key frame (or slice) with labels is needed")
    keys = sorted(key_labels)
    labels = np.zeros(frames_thw3.shape[:3], np.uint8)
    confidence = np.zeros(frames_thw3.shape[:3], np.float32)
    for position, key in enumerate(keys):
        # This key owns the frames closer to it than to its neighbours.
        start = 0 if position == 0 else (keys[position - 1] + key) // 2 + 1
        stop = len(frames_thw3) if position == len(keys) - 1 else (key + keys[position + 1]) // 2 + 1
        span_guide = guide.frames(slice(start, stop)) if guide is not None else None
        span_labels, span_confidence = propagate_both_ways(
            backend, frames_thw3[start:stop], key_labels[key], key - start, policy, span_guide
        )
        labels[start:stop], confidence[start:stop] = span_labels, span_confidence
    return labels, confidence


def resize_frames(frames_thw3: np.ndarray, size: int) -> np.ndarray:
    """uint8 (T, H, W, 3) → (T, size, size, 3), bilinear."""
    tensor = torch.from_numpy(np.ascontiguousarray(frames_thw3)).permute(0, 3, 1, 2).float()
    resized = torch.nn.functional.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def resize_labels(labels_thw: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 label maps (T, h, w) → (T, height, width), nearest."""
    tensor = torch.from_numpy(np.ascontiguousarray(labels_thw))[:, None].float()
    return torch.nn.functional.interpolate(tensor, size=(height, width), mode="nearest")[:, 0].to(torch.uint8).numpy()


def propagate_volume(
    backend, hu_xyz: np.ndarray, key_slices: dict[int, np.ndarray], policy: MemoryPolicy, size: int = 256
) -> np.ndarray:
    """Labels (X, Y, Z) uint8 of a CT volume from annotated (or key) axial slices z → (X, Y) labels: slices are
    windowed, resized to size×size, propagated both ways from each key slice, and resized back."""
    x, y, _ = hu_xyz.shape
    frames, keys = volume_frames(hu_xyz, key_slices, size)
    labels, _ = propagate_from_keys(backend, frames, keys, policy)
    return np.moveaxis(resize_labels(labels, x, y), 0, 2)


def volume_frames(
    hu_xyz: np.ndarray, key_slices: dict[int, np.ndarray], size: int
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """A CT volume as propagation sees it: its axial slices as (Z, size, size, 3) uint8 frames (windowed, grey) and
    the key slices' (X, Y) labels resized to size×size; ValueError for a key slice outside the volume."""
    from training.data.volumes import slices_as_frames

    bad = [k for k in key_slices if not 0 <= k < hu_xyz.shape[2]]
    if bad:
        raise ValueError(f"key slice(s) {bad} outside the volume's {hu_xyz.shape[2]} slices")
    frames = resize_frames(slices_as_frames(hu_xyz), size)
    return frames, {k: resize_labels(labels[None], size, size)[0] for k, labels in key_slices.items()}
