"""The propagation losses: what a predicted clip is scored by, and the first frame's object masks it starts from.

Cross-entropy over (background, objects) plus a soft Dice over the objects present, so that small objects
(pathology, tools) weigh as much as large ones; both skip IGNORE_INDEX pixels (real frames from a pseudo-label set's
keep/ masks). Shared by the training job and the key-frame tuning at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.data.classes import IGNORE_INDEX
from training.losses import masked_cross_entropy


def clip_loss(logits_bknhw: torch.Tensor, labels_bkhw: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice of the objects present in the truth, over every predicted frame and every pixel
    not labelled IGNORE_INDEX."""
    classes = logits_bknhw.shape[2]
    logits = logits_bknhw.flatten(0, 1)
    labels = labels_bkhw.flatten(0, 1)
    ce = masked_cross_entropy(logits, labels)
    valid = (labels != IGNORE_INDEX).unsqueeze(1)  # (B·K, 1, H, W): ignored pixels leave both Dice sums
    probs = logits.softmax(1)[:, 1:] * valid
    truth = F.one_hot(labels.masked_fill(~valid[:, 0], 0), classes).permute(0, 3, 1, 2)[:, 1:].float() * valid
    present = truth.flatten(2).sum(2) > 0
    overlap = (probs * truth).flatten(2).sum(2)
    total = (probs + truth).flatten(2).sum(2)
    soft_dice = (2 * overlap + 1) / (total + 1)
    dice_loss = (1 - soft_dice)[present].mean() if present.any() else logits.sum() * 0
    return ce + dice_loss


def first_masks(labels_bkhw: torch.Tensor, objects: int) -> torch.Tensor:
    """(B, N, H, W) float one-hot of objects 1..N in each clip's first frame (IGNORE_INDEX pixels: no object)."""
    first = labels_bkhw[:, 0]
    return F.one_hot(first.masked_fill(first == IGNORE_INDEX, 0), objects + 1).permute(0, 3, 1, 2)[:, 1:].float()
