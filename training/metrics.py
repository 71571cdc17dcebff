"""Segmentation metrics on label maps.

Per-class Dice and IoU accumulate a confusion matrix over all evaluated pixels (dataset-level, like the
vocalfolds paper). A class absent from both prediction and truth has no score (NaN) and is left out of the means,
rather than counted as a perfect 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def confusion_matrix(
    truth: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """(num_classes, num_classes) counts, rows = truth, columns = prediction. Truth pixels outside 0..num_classes-1
    (IGNORE_INDEX, 255) or equal to `ignore_index` are left out."""
    if truth.shape != pred.shape:
        raise ValueError(f"truth shape {truth.shape} and prediction shape {pred.shape} differ")
    t = truth.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    keep = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    if np.any((p[keep] < 0) | (p[keep] >= num_classes)):
        raise ValueError(f"prediction holds labels outside 0..{num_classes - 1}")
    return np.bincount(t[keep] * num_classes + p[keep], minlength=num_classes**2).reshape(num_classes, num_classes)


def dice_iou_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    return dice, iou


@dataclass
class SegmentationScores:
    """Accumulates batches; `summary()` gives per-class and mean Dice/IoU."""

    class_names: tuple[str, ...]
    ignore_index: int | None = None
    skip_in_mean: tuple[str, ...] = ("void",)
    confusion: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.class_names)
        self.confusion = np.zeros((n, n), dtype=np.int64)

    def update(self, truth: np.ndarray, pred: np.ndarray) -> None:
        self.confusion += confusion_matrix(truth, pred, len(self.class_names), self.ignore_index)

    def summary(self) -> dict:
        dice, iou = dice_iou_from_confusion(self.confusion)
        counted = [i for i, name in enumerate(self.class_names) if name not in self.skip_in_mean]
        return {
            "dice": {name: _num(d) for name, d in zip(self.class_names, dice, strict=True)},
            "iou": {name: _num(v) for name, v in zip(self.class_names, iou, strict=True)},
            "mean_dice": _nanmean(dice[counted]),
            "mean_iou": _nanmean(iou[counted]),
            "pixel_accuracy": float(np.diag(self.confusion).sum() / max(1, self.confusion.sum())),
        }


# The classes a laryngoscopist reads first; issue #35's zero-label target is their mean Dice ("VF+GS").
VOCAL_FOLDS_GLOTTAL = ("vocal_folds", "glottal_space")


def vocal_folds_glottal_dice(dice: dict[str, float | None]) -> float | None:
    """Mean Dice of vocal folds and glottal space over those scored (None when neither is: another label set,
    or neither class in truth nor prediction)."""
    scored = [dice[name] for name in VOCAL_FOLDS_GLOTTAL if dice.get(name) is not None]
    return sum(scored) / len(scored) if scored else None


def validation_metrics(summary: dict) -> dict[str, float]:
    """What a training loop reports per epoch from a `SegmentationScores.summary()` of its val frames: mean Dice,
    mean IoU and, where the label set has them, VF+GS Dice (a sweep may select on any of them)."""
    metrics = {"val_mean_dice": summary["mean_dice"], "val_mean_iou": summary["mean_iou"]}
    vf_gs = vocal_folds_glottal_dice(summary["dice"])
    if vf_gs is not None:
        metrics["val_vf_gs_dice"] = vf_gs
    return metrics


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def _num(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
