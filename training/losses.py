"""The loss every segmenting job shares (segment, adapt, style's semantic term, propagate): cross-entropy that skips
IGNORE_INDEX pixels, the label of what a pseudo-label set's keep/ masks leave out."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.data.classes import IGNORE_INDEX


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the pixels not labelled IGNORE_INDEX; 0 for a batch without any, where
    cross_entropy's own mean would be NaN (0/0) and poison the weights."""
    kept = (labels != IGNORE_INDEX).sum().clamp_min(1)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / kept
