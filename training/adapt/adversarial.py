"""Output-space adversarial alignment (AdaptSegNet, Tsai et al. 2018), plus an optional class-centroid alignment.

Segmentation maps are structured (vocal folds flank the glottis, tools enter from the border) in both domains even
when textures differ, so aligning the *softmax outputs* is easier than aligning features: a small discriminator learns
to tell source maps (label 1) from target maps (label 0), and the segmenter is pushed to make its target maps look
like source ones.

Weighting: the segmenter minimises `segmentation_ce + λ_adv · losses.segmenter`. Keep λ_adv small — AdaptSegNet
used 1e-3 for single-level output alignment; start there (or ramp it up from 0 over the first epochs). Too large a
λ_adv lets the segmenter fool the discriminator with confident, source-looking but wrong target maps.

Shapes: probabilities (B, C, H, W); discriminator logits (B, 1, H/2^depth, W/2^depth); features (B, F, h, w).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

SOURCE_LABEL, TARGET_LABEL = 1.0, 0.0


class OutputDiscriminator(nn.Sequential):
    """Fully convolutional: `depth` 4×4 stride-2 convs (width doubling, capped at 8·width) with leaky ReLU, then a
    3×3 classifier. Each output logit judges one patch of the segmentation map. No batch norm, as in AdaptSegNet:
    batch statistics would differ between the all-source and all-target batches the discriminator is fed."""

    def __init__(self, num_classes: int, width: int = 64, depth: int = 4):
        widths = [num_classes] + [width * 2 ** min(i, 3) for i in range(depth)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, kernel_size=3, padding=1))
        super().__init__(*layers)


class AdversarialLosses(NamedTuple):
    discriminator: torch.Tensor  # backward + discriminator optimiser step; reaches no segmenter parameter
    segmenter: torch.Tensor  # scale by λ_adv, add to the segmentation loss; reaches no discriminator parameter


def adversarial_losses(
    disc: nn.Module, source_probs_bchw: torch.Tensor, target_probs_bchw: torch.Tensor
) -> AdversarialLosses:
    """Both losses of one adversarial step, with the gradient paths cut so the two can be back-propagated freely.

    `disc` may be wrapped in DistributedDataParallel: the discriminator loss comes from one forward through the wrapper
    (source and target maps concatenated, so DDP sees one forward per backward; they need the same H and W), and the
    segmenter loss from the wrapped module, which DDP never sees.
    """
    if source_probs_bchw.shape[1:] != target_probs_bchw.shape[1:]:
        raise ValueError(
            f"source and target maps differ: {tuple(source_probs_bchw.shape)}, {tuple(target_probs_bchw.shape)}"
        )
    # Discriminator: source = 1, target = 0, on detached maps so this loss never moves the segmenter.
    logits = disc(torch.cat([source_probs_bchw, target_probs_bchw]).detach())
    source_logits, target_logits = logits.split([len(source_probs_bchw), len(target_probs_bchw)])
    discriminator = 0.5 * (
        F.binary_cross_entropy_with_logits(source_logits, torch.full_like(source_logits, SOURCE_LABEL))
        + F.binary_cross_entropy_with_logits(target_logits, torch.full_like(target_logits, TARGET_LABEL))
    )
    # Segmenter: make target maps be judged "source". The discriminator runs with detached copies of its parameters,
    # so the gradient reaches the target maps (and the segmenter) but never lands on the discriminator's .grad.
    plain = disc.module if isinstance(disc, nn.parallel.DistributedDataParallel) else disc
    frozen = {name: p.detach() for name, p in plain.named_parameters()} | dict(plain.named_buffers())
    fooled_logits = functional_call(plain, frozen, (target_probs_bchw,))
    segmenter = F.binary_cross_entropy_with_logits(fooled_logits, torch.full_like(fooled_logits, SOURCE_LABEL))
    return AdversarialLosses(discriminator, segmenter)


def class_centroids(
    features_bfhw: torch.Tensor, labels_bhw: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """((C, F) mean feature per class, (C,) bool present). Labels are resized (nearest) to the feature resolution."""
    if labels_bhw.shape[-2:] != features_bfhw.shape[-2:]:
        labels_bhw = F.interpolate(labels_bhw[:, None].float(), size=features_bfhw.shape[-2:], mode="nearest")[:, 0]
    labels = labels_bhw.long().reshape(-1)
    features_nf = features_bfhw.permute(0, 2, 3, 1).reshape(-1, features_bfhw.shape[1])
    keep = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    sums = features_nf.new_zeros(num_classes, features_nf.shape[1]).index_add(0, labels[keep], features_nf[keep])
    counts = torch.bincount(labels[keep], minlength=num_classes)
    return sums / counts.clamp_min(1)[:, None], counts > 0


def class_centroid_alignment(
    source_features_bfhw: torch.Tensor,
    source_labels_bhw: torch.Tensor,
    target_features_bfhw: torch.Tensor,
    target_pseudo_bhw: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Mean over classes present in both domains of ‖μ_source,c − μ_target,c‖² (squared: smooth where they meet).

    Features are e.g. `UNet.features` (stem resolution); target classes come from pseudo-labels, whose ignored pixels
    are skipped. Gradients reach both domains' features. Returns a graph-connected 0 if no class is shared.
    """
    source_centroids, source_present = class_centroids(
        source_features_bfhw, source_labels_bhw, num_classes, ignore_index
    )
    target_centroids, target_present = class_centroids(
        target_features_bfhw, target_pseudo_bhw, num_classes, ignore_index
    )
    shared = source_present & target_present
    if not shared.any():
        return (source_features_bfhw.sum() + target_features_bfhw.sum()) * 0.0
    return ((source_centroids[shared] - target_centroids[shared]) ** 2).sum(dim=1).mean()
