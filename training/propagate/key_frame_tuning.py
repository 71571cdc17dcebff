"""Key-frame tuning: before a sequence is propagated from a labelled key frame, a copy of the network trains for a
few steps on pseudo-clips made of that frame alone (random affine + elastic deformations of the frame and its labels,
as stage 1 of training makes them), so that it learns what this patient's tissue, glottis and instruments look
like. This is the online fine-tuning of one-shot video segmentation (OSVOS, Caelles et al. 2017; Lucid Data
Dreaming, Khoreva et al. 2019) applied to the memory network: the trained weights never change, every key frame gets
its own tuned copy, and nothing but the key frame's given labels is used.

It runs in torch (gradients), so it is an offline option of evaluate / run / pseudo-label, not part of the ONNX
graphs' streaming contract. Batch norm keeps the trained statistics while tuning: batches of one image's
deformations would replace them with that image's. On the 2026-12-05 bench checkpoint it lowered J&F on all four
vocalfolds sequences (docs/experiments/001-key-frame-tuning-and-segmenter-guide.md), so it is off unless asked for.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from pydantic import Field

from training.config import StrictModel
from training.data.normalize import normalize
from training.models.propagation.network import PropagationNet
from training.propagate.config import DeformConfig
from training.propagate.inference import TorchBackend
from training.propagate.losses import clip_loss, first_masks
from training.propagate.sequences import random_deform


class KeyFrameTuning(StrictModel):
    """How the copy trains: `steps` AdamW steps of `batch_size` clips of `clip_frames` deformed views each."""

    steps: int = Field(60, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    clip_frames: int = Field(3, ge=2, description="the first view is given, the others are predicted")
    deform: DeformConfig = DeformConfig()
    seed: int = 0


def tune_on_key_frame(
    model: PropagationNet,
    frame_hw3: np.ndarray,
    labels_hw: np.ndarray,
    objects: Sequence[int],
    cfg: KeyFrameTuning,
    report: Callable[[int, float], None] | None = None,
) -> PropagationNet:
    """A copy of `model` tuned on one labelled frame (uint8 (H, W, 3), labels (H, W)) whose classes `objects` are
    the objects 1..N, in that order, as propagation numbers them. report(step, loss) is called every 10 steps."""
    if not objects:
        raise ValueError("key-frame tuning needs at least one object in the key frame's labels")
    tuned = copy.deepcopy(model).eval()
    for parameter in tuned.parameters():
        parameter.requires_grad_(True)
    table = np.zeros(256, np.int64)
    table[list(objects)] = np.arange(1, len(objects) + 1)
    labels = torch.from_numpy(table[labels_hw])
    image = torch.from_numpy(np.ascontiguousarray(frame_hw3)).permute(2, 0, 1).float().div_(255)
    height, width = labels.shape
    views = cfg.batch_size * cfg.clip_frames
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    for step in range(cfg.steps):
        images, view_labels = image.expand(views, 3, height, width), labels.expand(views, height, width)
        mirrored = torch.from_numpy(np.repeat(rng.random(cfg.batch_size) < 0.5, cfg.clip_frames))
        images = torch.where(mirrored.view(-1, 1, 1, 1), images.flip(-1), images)
        view_labels = torch.where(mirrored.view(-1, 1, 1), view_labels.flip(-1), view_labels)
        warped, warped_labels = random_deform(images, view_labels, cfg.deform, torch.ones(views), rng)
        frames = normalize(warped).reshape(cfg.batch_size, cfg.clip_frames, 3, height, width)
        clip_labels = warped_labels.reshape(cfg.batch_size, cfg.clip_frames, height, width)
        loss = clip_loss(tuned(frames, first_masks(clip_labels, len(objects))), clip_labels[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if report is not None and ((step + 1) % 10 == 0 or step + 1 == cfg.steps):
            report(step + 1, loss.item())
    for parameter in tuned.parameters():
        parameter.requires_grad_(False)
    return tuned.eval()


class KeyFrameTuner:
    """A backend factory for `inference.propagate`: for each key frame it streams from, a TorchBackend of the model
    tuned on that frame. The last tuned copy is kept, so propagating both ways from one key frame tunes once."""

    def __init__(
        self,
        model: PropagationNet,
        cfg: KeyFrameTuning,
        top_k: int | None,
        report: Callable[[int, float], None] | None = None,
    ) -> None:
        self.model, self.cfg, self.top_k, self.report = model.eval(), cfg, top_k, report
        self._last: tuple[str, TorchBackend] | None = None

    def tuned_for(self, frame_hw3: np.ndarray, labels_hw: np.ndarray, objects: Sequence[int]) -> TorchBackend:
        digest = hashlib.blake2b(digest_size=16)
        for part in (np.ascontiguousarray(frame_hw3), np.ascontiguousarray(labels_hw), np.asarray(objects)):
            digest.update(part.tobytes())
        key = digest.hexdigest()
        if self._last is None or self._last[0] != key:
            tuned = tune_on_key_frame(self.model, frame_hw3, labels_hw, objects, self.cfg, self.report)
            self._last = (key, TorchBackend(tuned, self.top_k))
        return self._last[1]
