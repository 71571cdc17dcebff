"""Training-clip augmentation: colour and gamma jitter change the look of each frame, never its labels."""

import numpy as np
import torch

from training.propagate.config import DeformConfig
from training.propagate.sequences import random_deform

PHOTOMETRIC_ONLY = DeformConfig(brightness=0.0, contrast=0.0)


def _gray_images(n: int = 6, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.full((n, 3, size, size), 0.5)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    labels[:, 8:24, 8:24] = 2
    return images, labels


def _deform(cfg: DeformConfig, strength: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _gray_images()
    return random_deform(images, labels, cfg, torch.full((len(images),), strength), np.random.default_rng(seed))


def test_without_jitter_and_without_deformation_an_image_comes_back_as_it_was():
    images, labels = _gray_images()
    out, out_labels = _deform(PHOTOMETRIC_ONLY, strength=0.0)
    assert torch.allclose(out[:, :, 1:-1, 1:-1], images[:, :, 1:-1, 1:-1], atol=1e-5)
    assert torch.equal(out_labels, labels)


def test_colour_jitter_gives_each_frame_its_own_cast_within_the_bound():
    out, _ = _deform(PHOTOMETRIC_ONLY.model_copy(update={"colour": 0.2}), strength=0.0)
    centre = out[:, :, 16, 16]  # (n, 3): one gain per frame and channel
    assert torch.all((centre >= 0.5 * 0.8 - 1e-6) & (centre <= 0.5 * 1.2 + 1e-6))
    assert (centre.max(1).values - centre.min(1).values).min() > 0  # a gray frame is no longer gray
    assert len(torch.unique(centre[:, 0])) == len(centre)  # every frame drew its own


def test_gamma_jitter_moves_a_mid_gray_within_the_exposure_bound_and_keeps_it_gray():
    g = 0.4
    out, _ = _deform(PHOTOMETRIC_ONLY.model_copy(update={"gamma": g}), strength=0.0)
    centre = out[:, :, 16, 16]
    assert torch.allclose(centre, centre[:, :1].expand_as(centre))  # one curve for all channels
    assert torch.all((centre >= 0.5 ** (1 + g) - 1e-6) & (centre <= 0.5 ** (1 / (1 + g)) + 1e-6))
    assert centre[:, 0].max() - centre[:, 0].min() > 0.05


def test_jitter_changes_the_look_and_leaves_the_geometry_and_labels_as_without_it():
    base = DeformConfig()
    plain, plain_labels = _deform(base, strength=1.0, seed=3)
    jittered, jittered_labels = _deform(base.model_copy(update={"colour": 0.1, "gamma": 0.4}), strength=1.0, seed=3)
    assert torch.equal(plain_labels, jittered_labels)
    assert not torch.allclose(plain, jittered)
    assert torch.equal(plain == 0, jittered == 0)  # black outside the source image stays black
