"""The learned sim → real translator of the CUT family (Park et al., "Contrastive Learning for Unpaired Image-to-Image
Translation", ECCV 2020): one ResNet-style generator, a PatchGAN discriminator, and the small MLP heads of PatchNCE.

Why CUT rather than CycleGAN: one generator and one discriminator instead of two of each, so roughly half the
compute per step on a CPU, and PatchNCE ties each output patch to the input patch at the same place — the content
(and so the simulator label) is kept by construction rather than through a cycle.

The generator is residual: it predicts a change to its input (`out = clamp(x + Δ)`). Sim → real is a change of
appearance over fixed geometry, so starting at the identity keeps labels valid from step 0 and trains in far fewer
CPU steps than learning to redraw the image.

Shapes: images (B, 3, H, W) in [-1, 1] (see `to_signed`), H and W multiples of 4; features (B, C, h, w).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn


class TranslatorConfig(BaseModel):
    model_config = {"extra": "forbid"}

    width: int = Field(16, ge=4, description="generator channels at full resolution; ×2 per downsampling")
    blocks: int = Field(3, ge=1, le=9, description="residual blocks at 1/4 resolution")
    disc_width: int = Field(32, ge=4, description="PatchGAN channels at its first level")
    disc_layers: int = Field(3, ge=1, le=5, description="stride-2 levels of the PatchGAN (receptive field ~70 px at 3)")
    head_width: int = Field(128, ge=8, description="PatchNCE projection width")

    @property
    def size_multiple(self) -> int:
        return 4


def to_signed(unit_bchw: torch.Tensor) -> torch.Tensor:
    return unit_bchw * 2 - 1


def to_unit(signed_bchw: torch.Tensor) -> torch.Tensor:
    return (signed_bchw + 1) / 2


def _conv_norm_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, padding_mode="reflect"),
        nn.InstanceNorm2d(cout, affine=True),
        nn.ReLU(inplace=True),
    ]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_norm_relu(channels, channels, 3),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect"),
            nn.InstanceNorm2d(channels, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """c7s1-w, two stride-2 downs, residual blocks, two upsample+conv ups, c7s1-3 → Δ; out = clamp(x + Δ)."""

    def __init__(self, cfg: TranslatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        # The encoder is a list of stages so PatchNCE can read the feature map after each one.
        self.encoder = nn.ModuleList(
            [
                nn.Sequential(*_conv_norm_relu(3, w, 7)),
                nn.Sequential(*_conv_norm_relu(w, 2 * w, 3, stride=2)),
                nn.Sequential(*_conv_norm_relu(2 * w, 4 * w, 3, stride=2)),
                nn.Sequential(*[ResidualBlock(4 * w) for _ in range(cfg.blocks)]),
            ]
        )
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            *_conv_norm_relu(4 * w, 2 * w, 3),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            *_conv_norm_relu(2 * w, w, 3),
            nn.Conv2d(w, 3, 7, padding=3, padding_mode="reflect"),
        )
        nn.init.zeros_(self.decoder[-1].weight)  # Δ = 0 at start: the generator begins as the identity
        nn.init.zeros_(self.decoder[-1].bias)

    @property
    def feature_channels(self) -> list[int]:
        w = self.cfg.width
        return [w, 2 * w, 4 * w, 4 * w]

    def encode(self, x_signed: torch.Tensor) -> list[torch.Tensor]:
        """The feature map after every encoder stage (the PatchNCE layers)."""
        features, h = [], x_signed
        for stage in self.encoder:
            h = stage(h)
            features.append(h)
        return features

    def forward(self, x_signed: torch.Tensor) -> torch.Tensor:
        if x_signed.shape[-1] % 4 or x_signed.shape[-2] % 4:
            raise ValueError(f"translator input sides must be multiples of 4, got {tuple(x_signed.shape[-2:])}")
        return (x_signed + self.decoder(self.encode(x_signed)[-1])).clamp(-1.0, 1.0)


class PatchDiscriminator(nn.Module):
    """PatchGAN: a grid of real/fake logits, each judging one ~70 px patch (with 3 layers)."""

    def __init__(self, cfg: TranslatorConfig) -> None:
        super().__init__()
        w = cfg.disc_width
        layers: list[nn.Module] = [nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        channels = w
        for level in range(1, cfg.disc_layers):
            out = w * min(2**level, 8)
            layers += [nn.Conv2d(channels, out, 4, 2, 1), nn.InstanceNorm2d(out, affine=True), nn.LeakyReLU(0.2, True)]
            channels = out
        layers += [
            nn.Conv2d(channels, channels, 4, 1, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(channels, 1, 4, 1, 1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x_signed: torch.Tensor) -> torch.Tensor:
        return self.net(x_signed)


class PatchHeads(nn.Module):
    """One two-layer MLP per encoder stage, projecting sampled patch features onto the unit sphere."""

    def __init__(self, channels: list[int], width: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(c, width), nn.ReLU(inplace=True), nn.Linear(width, width)) for c in channels
        )

    def forward(self, features_bchw: torch.Tensor, stage: int, positions: torch.Tensor) -> torch.Tensor:
        """(B, P, width) unit vectors of the features at flat `positions` (P,) of every image."""
        flat = features_bchw.flatten(2).transpose(1, 2)[:, positions]  # (B, P, C)
        return F.normalize(self.heads[stage](flat), dim=-1)


def patch_nce_loss(query_bpd: torch.Tensor, key_bpd: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """InfoNCE per patch: a query's positive is the key at its own place, its negatives the other patches of the
    same image (CUT's internal negatives). (B, P, D) unit vectors → scalar mean loss."""
    logits = torch.bmm(query_bpd, key_bpd.detach().transpose(1, 2)) / temperature  # (B, P, P), diagonal = positives
    targets = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
