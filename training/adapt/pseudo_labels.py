"""Pseudo-labels for unlabelled target images: keep a prediction's confident, certain pixels, ignore the rest.

Pieces, each usable alone:
- `confidence_mask`: max softmax probability ≥ τ, with τ one number or one per class.
- `class_balanced_thresholds`: per-class τ keeping each predicted class's most confident `fraction` of pixels (CBST,
  Zou et al. 2018), so rare classes such as pathology or tools are not drowned out by a single global τ.
- `disagreement_uncertainty`: symmetric KL between two predictions (two models, two heads, or two views).
- `mc_dropout_uncertainty`: predictive entropy of the mean of several dropout-perturbed passes.
- `pseudo_labels`: argmax labels with unconfident or uncertain pixels set to `ignore_index` (cross-entropy skips them).
- `slic_refine`: majority vote of the pseudo-labels inside SLIC superpixels, snapping label edges to image edges.

Shapes: probabilities are softmax outputs (B, C, H, W); masks, uncertainties and labels are (B, H, W).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.data.classes import IGNORE_INDEX
from training.style.colour import srgb_to_lab

_EPS = 1e-8


def confidence_mask(probs_bchw: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: the winning class's probability is at least τ (a float, or a (C,) tensor of per-class τ)."""
    confidence_bhw, predicted_bhw = probs_bchw.max(dim=1)
    if isinstance(tau, torch.Tensor) and tau.ndim == 1:
        if len(tau) != probs_bchw.shape[1]:
            raise ValueError(f"per-class tau has {len(tau)} entries but probs have {probs_bchw.shape[1]} classes")
        return confidence_bhw >= tau.to(probs_bchw.device)[predicted_bhw]
    return confidence_bhw >= tau


def class_balanced_thresholds(probs_bchw: torch.Tensor, fraction: float, tau_max: float = 0.9) -> torch.Tensor:
    """(C,) thresholds: per predicted class, the confidence of its ceil(fraction · n_c)-th most confident pixel.

    With these thresholds `confidence_mask` keeps (at least, ties aside) that many pixels of every predicted class.
    Each threshold is capped at `tau_max`, so a class the model is sure of everywhere keeps all its sure pixels.
    Classes never predicted get `tau_max`. Statistics are over every pixel passed in: pass many images at once.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    confidence, predicted = probs_bchw.max(dim=1)
    thresholds = torch.full((probs_bchw.shape[1],), float(tau_max), device=probs_bchw.device)
    for c in predicted.unique().tolist():
        class_confidence = confidence[predicted == c]
        keep = max(1, int(np.ceil(fraction * class_confidence.numel())))
        kth_largest = class_confidence.topk(keep).values[-1]
        thresholds[c] = torch.clamp(kth_largest, max=tau_max)
    return thresholds


def disagreement_uncertainty(probs_a_bchw: torch.Tensor, probs_b_bchw: torch.Tensor) -> torch.Tensor:
    """(B, H, W) symmetric KL, ½·(KL(a‖b) + KL(b‖a)) in nats: 0 where the two agree, unbounded as they split."""
    log_a = probs_a_bchw.clamp_min(_EPS).log()
    log_b = probs_b_bchw.clamp_min(_EPS).log()
    return 0.5 * ((probs_a_bchw - probs_b_bchw) * (log_a - log_b)).sum(dim=1)


@torch.no_grad()
def mc_dropout_uncertainty(
    model: nn.Module, images_bchw: torch.Tensor, passes: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean probs (B, C, H, W), predictive entropy (B, H, W) in nats) over `passes` stochastic forward passes.

    Only dropout layers run in train mode; batch norm stays in eval mode so its running statistics are neither used
    per batch nor updated. The model's own train/eval modes are restored afterwards.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if not dropouts:
        raise ValueError("model has no dropout layer, so MC-dropout passes are identical (set UNetConfig.dropout > 0)")
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for m in dropouts:
            m.train()
        mean_probs = sum(model(images_bchw).softmax(dim=1) for _ in range(passes)) / passes
    finally:
        for m, training in modes.items():
            m.train(training)
    entropy = -(mean_probs * mean_probs.clamp_min(_EPS).log()).sum(dim=1)
    return mean_probs, entropy


def pseudo_labels(
    probs_bchw: torch.Tensor,
    tau: float | torch.Tensor,
    uncertainty: torch.Tensor | None = None,
    u_max: float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """(B, H, W) long argmax labels; pixels below τ, or with uncertainty above u_max, become `ignore_index`."""
    if (uncertainty is None) != (u_max is None):
        raise ValueError("uncertainty and u_max go together: pass both or neither")
    labels = probs_bchw.argmax(dim=1)
    keep = confidence_mask(probs_bchw, tau)
    if uncertainty is not None:
        if uncertainty.shape != labels.shape:
            raise ValueError(f"uncertainty must be (B, H, W) {tuple(labels.shape)}, got {tuple(uncertainty.shape)}")
        keep &= uncertainty <= u_max
    return labels.masked_fill(~keep, ignore_index)


def slic_superpixels(
    image_hwc: np.ndarray, segments: int, compactness: float = 10.0, iterations: int = 5
) -> np.ndarray:
    """(H, W) superpixel ids from a small SLIC: k-means over (y, x, L, a, b) with centres seeded on a grid.

    As in SLIC, each pixel only compares itself with the centres seeded in its own and the 8 neighbouring grid cells,
    which keeps one iteration O(9·H·W) (≈ 0.1 s at 256×256 on one CPU core). Distance: ‖Δlab‖² + (‖Δyx‖ / S)² ·
    compactness², S the grid step. No connectivity post-processing: a superpixel may come in pieces, which a vote
    does not mind.
    """
    height, width = image_hwc.shape[:2]
    step = max(1.0, np.sqrt(height * width / max(segments, 1)))
    rows, cols = max(1, round(height / step)), max(1, round(width / step))
    lab = srgb_to_lab(torch.as_tensor(image_hwc, dtype=torch.float32).permute(2, 0, 1)[None])[0].permute(1, 2, 0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    pixels = np.concatenate([yy[..., None], xx[..., None], lab.numpy().astype(np.float64)], axis=-1)  # (H, W, 5)

    # Seed the centres at the grid cell centres; each pixel's candidate centres are the 3×3 cells around its own.
    cell_y = np.minimum((yy * rows / height).astype(int), rows - 1)
    cell_x = np.minimum((xx * cols / width).astype(int), cols - 1)
    seeds_y = ((np.arange(rows) + 0.5) * height / rows).astype(int)
    seeds_x = ((np.arange(cols) + 0.5) * width / cols).astype(int)
    centres = pixels[seeds_y[:, None], seeds_x[None, :]].reshape(rows * cols, 5)
    candidates = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            ny, nx = cell_y + dy, cell_x + dx
            valid = (ny >= 0) & (ny < rows) & (nx >= 0) & (nx < cols)
            candidates.append(np.where(valid, ny * cols + nx, -1))
    candidates_hwk = np.stack(candidates, axis=-1)  # (H, W, 9), -1 where the neighbour cell is off the grid

    spatial_weight = (compactness / step) ** 2
    for _ in range(iterations):
        delta = pixels[..., None, :] - centres[candidates_hwk.clip(min=0)]  # (H, W, 9, 5)
        distance = spatial_weight * (delta[..., :2] ** 2).sum(-1) + (delta[..., 2:] ** 2).sum(-1)
        distance[candidates_hwk < 0] = np.inf
        assignment = np.take_along_axis(candidates_hwk, distance.argmin(-1)[..., None], axis=-1)[..., 0]
        counts = np.bincount(assignment.ravel(), minlength=rows * cols)
        sums = np.stack([np.bincount(assignment.ravel(), pixels[..., i].ravel(), rows * cols) for i in range(5)], 1)
        moved = counts > 0  # an emptied centre stays where it was
        centres[moved] = sums[moved] / counts[moved, None]
    return assignment


def slic_refine(
    labels_hw: np.ndarray,
    image_hwc: np.ndarray,
    segments: int = 200,
    compactness: float = 10.0,
    ignore_index: int = IGNORE_INDEX,
    fill_ignored: bool = False,
) -> np.ndarray:
    """Relabel every kept pixel with the majority label of the kept pixels in its superpixel.

    `image_hwc` is float RGB in [0, 1]. Ignored pixels stay ignored unless `fill_ignored`, which also gives them their
    superpixel's majority (densifies the pseudo-labels, at the price of trusting the vote where the model was unsure).
    A superpixel without kept pixels stays ignored either way.
    """
    if labels_hw.shape != image_hwc.shape[:2]:
        raise ValueError(f"labels {labels_hw.shape} and image {image_hwc.shape} differ in size")
    superpixel = slic_superpixels(image_hwc, segments, compactness).ravel()
    labels = labels_hw.ravel().astype(np.int64)
    kept = labels != ignore_index
    if not kept.any():
        return labels_hw.copy()
    num_classes = int(labels[kept].max()) + 1
    votes = np.bincount(superpixel[kept] * num_classes + labels[kept], minlength=(superpixel.max() + 1) * num_classes)
    votes = votes.reshape(-1, num_classes)
    majority = np.where(votes.sum(1) > 0, votes.argmax(1), ignore_index)[superpixel]
    refined = np.where(kept | fill_ignored, majority, labels)
    return refined.reshape(labels_hw.shape).astype(labels_hw.dtype)
