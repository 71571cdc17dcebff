import math
from collections import Counter

import numpy as np
import pytest
import torch

from training.adapt.adversarial import OutputDiscriminator, adversarial_losses, class_centroid_alignment
from training.adapt.blend import irb_mix, per_image_iou, rank_by_iou
from training.adapt.pseudo_labels import (
    class_balanced_thresholds,
    confidence_mask,
    disagreement_uncertainty,
    mc_dropout_uncertainty,
    pseudo_labels,
    slic_refine,
)
from training.models.unet import Segmenter, UNetConfig

# --- IoU-Ranking Blend -------------------------------------------------------------------------------------------


def _square_masks() -> tuple[np.ndarray, np.ndarray]:
    """Truth: a 4×4 square of class 1 in an 8×8 frame; predictions: the square shifted right by 0, 1, 2 and 4."""
    truth = np.zeros((8, 8), dtype=np.int64)
    truth[2:6, 2:6] = 1
    preds = np.stack([np.roll(truth, shift, axis=1) for shift in (0, 1, 2, 4)])
    return preds, np.stack([truth] * 4)


def test_per_image_iou_by_hand():
    truth, pred = np.array([[[1, 1, 0, 0]]]), np.array([[[1, 0, 0, 0]]])
    # class 0: 2 / 3, class 1: 1 / 2, class 2 absent from both → left out of the mean
    assert per_image_iou(pred, truth, num_classes=3) == pytest.approx([(2 / 3 + 1 / 2) / 2])


def test_rank_by_iou_puts_identical_predictions_first_and_shifted_ones_later():
    preds, truths = _square_masks()
    shuffled = np.array([2, 0, 3, 1])
    ious = per_image_iou(preds[shuffled], truths[shuffled], num_classes=2)
    assert ious[1] == 1.0
    assert list(shuffled[rank_by_iou(ious)]) == [0, 1, 2, 3]  # more shift, lower IoU, later


def test_rank_by_iou_is_stable_and_puts_nan_last():
    assert list(rank_by_iou(np.array([0.5, np.nan, 0.9, 0.5, 0.9]))) == [2, 4, 0, 3, 1]


def test_irb_mix_proportions_are_exact():
    ious = np.linspace(0.0, 0.9, 10)  # best three are indices 9, 8, 7
    picks = irb_mix(
        num_source=10, ious=ious, top_fraction=0.3, translated_ratio=0.25, total=40, rng=np.random.default_rng(0)
    )
    kinds = Counter(kind for kind, _ in picks)
    assert len(picks) == 40 and kinds == {"translated": 10, "source": 30}
    translated = Counter(i for kind, i in picks if kind == "translated")
    assert set(translated) == {7, 8, 9} and sorted(translated.values()) == [3, 3, 4]  # cycled, not starved
    assert Counter(i for kind, i in picks if kind == "source") == {i: 3 for i in range(10)}
    assert picks != sorted(picks)  # shuffled, not grouped by kind


def test_irb_mix_extremes_and_determinism():
    ious = np.array([0.2, 0.8, 0.5])
    only_source = irb_mix(4, ious, 1.0, 0.0, 8, np.random.default_rng(1))
    only_translated = irb_mix(0, ious, 1 / 3, 1.0, 5, np.random.default_rng(1))
    assert {kind for kind, _ in only_source} == {"source"}
    assert only_translated == [("translated", 1)] * 5  # top third of three images: the best one
    assert irb_mix(4, ious, 0.5, 0.5, 8, np.random.default_rng(7)) == irb_mix(
        4, ious, 0.5, 0.5, 8, np.random.default_rng(7)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_fraction": 0.0}, r"top_fraction must lie in \(0, 1\]"),
        ({"top_fraction": 1.5}, r"top_fraction must lie in \(0, 1\]"),
        ({"translated_ratio": -0.1}, r"translated_ratio must lie in \[0, 1\]"),
        ({"translated_ratio": 1.1}, r"translated_ratio must lie in \[0, 1\]"),
        ({"total": 0}, "total must be >= 1"),
        ({"num_source": -1}, "num_source must be >= 0"),
        ({"ious": np.zeros((2, 2))}, "ious must be a 1-D array"),
        ({"ious": np.array([])}, "ious is empty"),
        ({"num_source": 0}, "num_source is 0"),
    ],
)
def test_irb_mix_argument_errors_name_the_parameter(kwargs, message):
    arguments = {"num_source": 5, "ious": np.array([0.1, 0.9]), "top_fraction": 0.5, "translated_ratio": 0.5}
    arguments |= {"total": 10, "rng": np.random.default_rng(0)} | kwargs
    with pytest.raises(ValueError, match=message):
        irb_mix(**arguments)


# --- pseudo-labels -----------------------------------------------------------------------------------------------


def _hand_probs() -> torch.Tensor:
    """(1, 3, 1, 4): four pixels, winners class 0 @ 0.9, class 0 @ 0.5, class 0 @ 0.34, class 2 @ 0.8."""
    columns = [[0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.34, 0.33, 0.33], [0.1, 0.1, 0.8]]
    return torch.tensor(columns).T.reshape(1, 3, 1, 4)


def test_confidence_mask_on_hand_made_probabilities():
    probs = _hand_probs()
    assert confidence_mask(probs, 0.8).flatten().tolist() == [True, False, False, True]
    assert confidence_mask(probs, 0.5).flatten().tolist() == [True, True, False, True]  # τ itself is kept
    per_class = torch.tensor([0.95, 0.5, 0.7])
    assert confidence_mask(probs, per_class).flatten().tolist() == [False, False, False, True]


def test_class_balanced_thresholds_keep_the_asked_fraction_of_each_class():
    logits = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    probs = logits.softmax(dim=1)
    thresholds = class_balanced_thresholds(probs, fraction=0.2, tau_max=1.0)
    kept, predicted = confidence_mask(probs, thresholds), probs.argmax(dim=1)
    for c in range(4):
        n_c = int((predicted == c).sum())
        assert n_c > 10
        assert int((kept & (predicted == c)).sum()) == math.ceil(0.2 * n_c)


def test_class_balanced_thresholds_are_capped_and_default_for_absent_classes():
    probs = torch.zeros(1, 3, 4, 4)
    probs[:, 0], probs[:, 1] = 0.99, 0.01  # class 0 everywhere and sure of it; class 1 and 2 never predicted
    thresholds = class_balanced_thresholds(probs, fraction=0.1, tau_max=0.9)
    assert thresholds.tolist() == pytest.approx([0.9, 0.9, 0.9])
    assert confidence_mask(probs, thresholds).all()  # the cap keeps every sure pixel, not just the top 10 %
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        class_balanced_thresholds(probs, fraction=0.0)


def test_pseudo_labels_respect_tau_and_u_max():
    probs = _hand_probs()
    assert pseudo_labels(probs, tau=0.8).flatten().tolist() == [0, 255, 255, 2]
    uncertainty = torch.tensor([[[0.5, 0.0, 0.0, 0.1]]])
    labels = pseudo_labels(probs, tau=0.45, uncertainty=uncertainty, u_max=0.2, ignore_index=99)
    assert labels.flatten().tolist() == [99, 0, 99, 2]  # pixel 0 is confident but too uncertain
    with pytest.raises(ValueError, match="pass both or neither"):
        pseudo_labels(probs, tau=0.5, uncertainty=uncertainty)


def test_disagreement_is_zero_for_agreement_and_symmetric():
    a = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)).softmax(dim=1)
    b = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2)).softmax(dim=1)
    assert disagreement_uncertainty(a, a).abs().max() < 1e-6
    assert torch.allclose(disagreement_uncertainty(a, b), disagreement_uncertainty(b, a))
    assert (disagreement_uncertainty(a, b) > 0).all()


def _tiny_segmenter(dropout: float) -> Segmenter:
    cfg = UNetConfig(base_width=4, depth=1, blocks_per_level=1, num_classes=3, dropout=dropout)
    return Segmenter(cfg)


def test_mc_dropout_keeps_batchnorm_in_eval_and_restores_modes():
    torch.manual_seed(0)
    model = _tiny_segmenter(dropout=0.5).train()
    images = torch.rand(2, 3, 8, 8)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    mean_probs, entropy = mc_dropout_uncertainty(model, images, passes=4)
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())  # BN statistics untouched
    assert all(m.training for m in model.modules())  # train mode restored everywhere
    with torch.no_grad():
        deterministic = model.eval()(images).softmax(dim=1)
    assert not torch.allclose(mean_probs, deterministic)  # dropout was active
    assert torch.allclose(mean_probs.sum(dim=1), torch.ones(2, 8, 8), atol=1e-5)
    assert entropy.shape == (2, 8, 8) and (entropy >= 0).all() and (entropy <= math.log(3) + 1e-5).all()
    assert not model.training  # an eval model stays in eval mode
    mc_dropout_uncertainty(model, images, passes=1)
    assert not any(m.training for m in model.modules())


def test_mc_dropout_refuses_a_model_without_dropout():
    with pytest.raises(ValueError, match="no dropout"):
        mc_dropout_uncertainty(_tiny_segmenter(dropout=0.0), torch.rand(1, 3, 8, 8), passes=2)


def _two_colour_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Red for x < 10, blue from x = 10 (off the 2×2 superpixel grid, whose cells split at x = 12); noisy labels."""
    image = np.zeros((24, 24, 3))
    image[:, :10], image[:, 10:] = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
    truth = np.where(np.arange(24) >= 10, 2, 1)[None, :].repeat(24, axis=0)
    noisy = truth.copy()
    flip = np.random.default_rng(0).random(truth.shape) < 0.15
    noisy[flip] = 3 - noisy[flip]
    return image, truth, noisy


def test_slic_refine_votes_noise_away_along_colour_edges():
    image, truth, noisy = _two_colour_scene()
    assert (noisy != truth).sum() > 50
    assert np.array_equal(slic_refine(noisy, image, segments=4), truth)


def test_slic_refine_leaves_ignored_pixels_unless_asked_to_fill():
    image, truth, noisy = _two_colour_scene()
    noisy[::3, ::3] = 255
    refined = slic_refine(noisy, image, segments=4)
    assert np.array_equal(refined == 255, noisy == 255)
    assert np.array_equal(refined[noisy != 255], truth[noisy != 255])
    assert np.array_equal(slic_refine(noisy, image, segments=4, fill_ignored=True), truth)


# --- adversarial alignment ---------------------------------------------------------------------------------------


def _toy_maps() -> tuple[torch.Tensor, torch.Tensor]:
    """Separable by construction: sharp one-hot-like source maps versus soft, uncertain target maps."""
    generator = torch.Generator().manual_seed(0)
    source = (torch.randn(4, 3, 32, 32, generator=generator) * 10).softmax(dim=1)
    target = (torch.randn(4, 3, 32, 32, generator=generator) * 0.3).softmax(dim=1)
    return source, target


def test_discriminator_is_fully_convolutional_with_stride_2_stages():
    disc = OutputDiscriminator(num_classes=3, width=8, depth=3)
    assert disc(torch.rand(2, 3, 32, 32)).shape == (2, 1, 4, 4)
    assert disc(torch.rand(1, 3, 64, 48)).shape == (1, 1, 8, 6)


def test_one_discriminator_step_lowers_its_loss():
    torch.manual_seed(0)
    disc = OutputDiscriminator(num_classes=3, width=8, depth=3)
    optimizer = torch.optim.SGD(disc.parameters(), lr=0.05)
    source, target = _toy_maps()
    before = adversarial_losses(disc, source, target).discriminator
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    after = adversarial_losses(disc, source, target).discriminator
    assert after < before


def test_gradients_are_cut_between_segmenter_and_discriminator():
    torch.manual_seed(0)
    disc = OutputDiscriminator(num_classes=3, width=8, depth=3)
    source, target = (maps.clone().requires_grad_(True) for maps in _toy_maps())
    losses = adversarial_losses(disc, source, target)
    losses.segmenter.backward()
    assert all(p.grad is None for p in disc.parameters())  # the segmenter's loss never trains the discriminator
    assert target.grad is not None and target.grad.abs().sum() > 0  # ...but it does reach the target maps
    assert source.grad is None
    target.grad = None
    losses.discriminator.backward()
    assert source.grad is None and target.grad is None  # the discriminator's loss never reaches the segmenter
    assert all(p.grad is not None for p in disc.parameters())


def test_class_centroid_alignment_by_hand():
    source_features = torch.zeros(1, 2, 4, 4)
    source_labels = torch.zeros(1, 4, 4, dtype=torch.long)
    source_labels[:, :, 2:] = 1
    source_features[:, :, :, 2:] = 1.0  # class 0 centroid (0, 0), class 1 centroid (1, 1)
    target_features = torch.full((1, 2, 2, 2), 3.0, requires_grad=True)  # half the label resolution
    target_pseudo = torch.full((1, 4, 4), 255, dtype=torch.long)
    target_pseudo[:, :, 2:] = 1  # only class 1 present (the rest ignored): centroid (3, 3)
    loss = class_centroid_alignment(source_features, source_labels, target_features, target_pseudo, num_classes=2)
    assert loss.item() == pytest.approx(2 * (3.0 - 1.0) ** 2)  # class 0 absent in the target → left out
    loss.backward()
    assert target_features.grad is not None and target_features.grad.abs().sum() > 0
    nothing_shared = class_centroid_alignment(
        source_features, torch.zeros_like(source_labels), target_features, target_pseudo, num_classes=2
    )
    assert nothing_shared.item() == 0.0
    nothing_shared.backward()  # still part of the graph, so a training step does not crash
