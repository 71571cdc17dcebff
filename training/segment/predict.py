"""Batched inference and scoring of a torch segmenter on uint8 frames."""

from __future__ import annotations

import numpy as np
import torch

from training.data.classes import CLASS_NAMES, IGNORE_INDEX
from training.data.normalize import normalize, to_unit_bchw
from training.metrics import SegmentationScores


@torch.no_grad()
def predict_labels(model: torch.nn.Module, images_nhwc: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, H, W) uint8 label maps."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    labels = []
    for start in range(0, len(images_nhwc), batch_size):
        batch = normalize(to_unit_bchw(images_nhwc[start : start + batch_size]).to(device))
        labels.append(model(batch).argmax(1).to(torch.uint8).cpu().numpy())
    model.train(was_training)
    return np.concatenate(labels) if labels else np.zeros((0, *images_nhwc.shape[1:3]), np.uint8)


def score(model: torch.nn.Module, images_nhwc: np.ndarray, masks_nhw: np.ndarray) -> tuple[dict, np.ndarray]:
    """Per-class and mean Dice/IoU over all frames (pixels labelled IGNORE_INDEX left out), and the predictions
    (for overlays)."""
    predictions = predict_labels(model, images_nhwc)
    scores = SegmentationScores(model_class_names(model), ignore_index=IGNORE_INDEX)
    scores.update(masks_nhw, predictions)
    return scores.summary(), predictions


def model_class_names(model: torch.nn.Module) -> tuple[str, ...]:
    """A segmenter's class names (its UNetConfig's label set); the laryngoscopy set for a model without one."""
    cfg = getattr(model, "cfg", None)
    return cfg.class_names if cfg is not None and hasattr(cfg, "class_names") else CLASS_NAMES
