"""Metrics for mask propagation: region J and boundary F as in the DAVIS benchmark, Dice, and normalised surface
Dice (NSD) at a tolerance in mm as in FLARE22.

Masks are boolean arrays of one object. Conventions for empty masks follow DAVIS: both empty is a perfect 1, one
empty is 0. Boundary pixels of a 2-D mask are its pixels with a 4-neighbour outside it (the frame's edge counts as
outside); a volume's surface voxels are those with a 6-neighbour outside. NSD counts surface voxels (not surface
areas as FLARE22's surface-distance code does), which agrees closely at isotropic-ish spacings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def region_j(truth: np.ndarray, pred: np.ndarray) -> float:
    """Jaccard index (IoU) of two boolean masks; 1 when both are empty."""
    truth, pred = truth.astype(bool), pred.astype(bool)
    union = np.logical_or(truth, pred).sum()
    return 1.0 if union == 0 else float(np.logical_and(truth, pred).sum() / union)


def dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (any dimension); 1 when both are empty."""
    truth, pred = truth.astype(bool), pred.astype(bool)
    total = truth.sum() + pred.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(truth, pred).sum() / total)


def boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels (voxels) of `mask` with a face neighbour outside it; the array's border counts as outside."""
    mask = mask.astype(bool)
    interior = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)
    return mask & ~interior


def boundary_f(truth: np.ndarray, pred: np.ndarray, bound_th: float = 0.008) -> float:
    """DAVIS boundary F-measure: precision and recall of boundary pixels matched within a tolerance of
    ceil(bound_th · image diagonal) pixels (a disk), combined as 2PR / (P + R)."""
    truth_edge, pred_edge = boundary(truth), boundary(pred)
    if not truth_edge.any() and not pred_edge.any():
        return 1.0
    if not truth_edge.any() or not pred_edge.any():
        return 0.0
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*truth.shape))
    # Distance to the nearest boundary pixel of the other mask, thresholded = dilation by a disk of that radius.
    near_truth = ndimage.distance_transform_edt(~truth_edge) <= radius
    near_pred = ndimage.distance_transform_edt(~pred_edge) <= radius
    precision = float((pred_edge & near_truth).sum() / pred_edge.sum())
    recall = float((truth_edge & near_pred).sum() / truth_edge.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def normalized_surface_dice(
    truth: np.ndarray, pred: np.ndarray, tolerance_mm: float, spacing: Sequence[float] | None = None
) -> float:
    """Fraction of both surfaces lying within `tolerance_mm` of the other surface, with distances measured in mm
    using the voxel `spacing` (one value per axis; default 1). 1 when both masks are empty, 0 when one is."""
    truth, pred = truth.astype(bool), pred.astype(bool)
    spacing = tuple(float(s) for s in (spacing or (1.0,) * truth.ndim))
    if len(spacing) != truth.ndim:
        raise ValueError(f"spacing has {len(spacing)} values for a {truth.ndim}-D mask")
    truth_surface, pred_surface = boundary(truth), boundary(pred)
    if not truth_surface.any() and not pred_surface.any():
        return 1.0
    if not truth_surface.any() or not pred_surface.any():
        return 0.0
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    close = (pred_surface & (to_truth <= tolerance_mm)).sum() + (truth_surface & (to_pred <= tolerance_mm)).sum()
    return float(close / (truth_surface.sum() + pred_surface.sum()))


STATISTICS = ("J", "F", "J_recall", "J_decay", "F_recall", "F_decay")  # averaged over the objects by j_and_f


def recall_and_decay(per_frame: Sequence[float], bins: int = 4) -> tuple[float, float]:
    """The DAVIS benchmark's statistics of one object's per-frame scores: recall, the fraction of frames scoring above
    0.5, and decay, the mean of the first of `bins` equal spans of frames minus the mean of the last (how much worse
    the object is tracked late in the sequence than early; DAVIS's spans share their edge frames, these do not)."""
    scores = np.asarray(per_frame, dtype=np.float64)
    if scores.size == 0:
        return float("nan"), float("nan")
    edges = np.linspace(0, scores.size, bins + 1).round().astype(int)
    first, last = scores[: max(edges[1], 1)], scores[min(edges[-2], scores.size - 1) :]
    return float((scores > 0.5).mean()), float(first.mean() - last.mean())


def j_and_f(
    truth_labels: np.ndarray, pred_labels: np.ndarray, objects: Sequence[int], void: np.ndarray | None = None
) -> dict:
    """J, F and their mean J&F over the frames (T, H, W) of one sequence, per object and averaged over objects,
    with DAVIS recall and decay of J and F (recall_and_decay).

    objects: the label values scored (each frame of each object counts once, as DAVIS does). Per object, also
    absent_frames (frames whose truth lacks the object, where any predicted pixel scores J = 0) and
    false_positive_frames (those of them where the object was predicted anyway), as an object that leaves the view
    and is painted onto something else costs a whole frame each time.
    void: boolean (T, H, W) pixels that count for neither J nor F, cut from truth and prediction alike as the DAVIS
    2017 evaluation does with its void pixels; None = every pixel counts."""
    if truth_labels.shape != pred_labels.shape:
        raise ValueError(f"truth shape {truth_labels.shape} and prediction shape {pred_labels.shape} differ")
    if void is not None and void.shape != truth_labels.shape:
        raise ValueError(f"void shape {void.shape} and truth shape {truth_labels.shape} differ")
    counted = True if void is None else ~void.astype(bool)
    per_object = {}
    for label in objects:
        truths, preds = (truth_labels == label) & counted, (pred_labels == label) & counted
        js = [region_j(t, p) for t, p in zip(truths, preds, strict=True)]
        fs = [boundary_f(t, p) for t, p in zip(truths, preds, strict=True)]
        absent = ~truths.any(axis=(1, 2))
        j_recall, j_decay = recall_and_decay(js)
        f_recall, f_decay = recall_and_decay(fs)
        per_object[int(label)] = {
            "J": float(np.mean(js)),
            "F": float(np.mean(fs)),
            "J&F": float((np.mean(js) + np.mean(fs)) / 2),
            "J_recall": j_recall,
            "J_decay": j_decay,
            "F_recall": f_recall,
            "F_decay": f_decay,
            "absent_frames": int(absent.sum()),
            "false_positive_frames": int((absent & preds.any(axis=(1, 2))).sum()),
        }
    if not per_object:
        return {key: float("nan") for key in (*STATISTICS, "J&F")} | {"objects": {}}
    means = {key: float(np.mean([v[key] for v in per_object.values()])) for key in STATISTICS}
    return {**means, "J&F": (means["J"] + means["F"]) / 2, "objects": per_object}
