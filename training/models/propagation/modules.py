"""Building blocks of the propagation network: a separable conv, the two encoders, the decoder.

Shapes: B batch, N objects, H×W the frame; f4/f8/f16 are features at 1/4, 1/8, 1/16 of the frame's side.
Everything is depthwise-separable and narrow so that a 256×256 frame runs at video rate on two CPU cores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.models.encoders import Lite0Trunk


class SepConv(nn.Sequential):
    """Depthwise 3×3 (optionally strided) then pointwise 1×1, each with batch norm and ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class ResSepConv(nn.Module):
    """SepConv with a residual connection (same width, stride 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = SepConv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def stem(cin: int, cout: int) -> nn.Sequential:
    """Full-resolution input → 1/2 with a plain strided 3×3 conv (cheap: few input channels)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class KeyEncoder(nn.Module):
    """frame (B, 3, H, W) → f4, f8, f16. Shared by query and memory frames, as in STCN."""

    def __init__(self, c4: int, c8: int, c16: int) -> None:
        super().__init__()
        self.to4 = nn.Sequential(stem(3, 16), SepConv(16, c4, stride=2), ResSepConv(c4))
        self.to8 = nn.Sequential(SepConv(c4, c8, stride=2), ResSepConv(c8))
        self.to16 = nn.Sequential(SepConv(c8, c16, stride=2), ResSepConv(c16), ResSepConv(c16))

    def forward(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f4 = self.to4(frame)
        f8 = self.to8(f4)
        return f4, f8, self.to16(f8)


class PretrainedKeyEncoder(nn.Module):
    """frame → f4, f8, f16 from the ImageNet Lite0 trunk (to 1/16, as STCN's key encoder is a pretrained trunk cut
    at 1/16), each projected by a 1×1 conv to the widths the rest of the network and the exported graphs expect."""

    def __init__(self, c4: int, c8: int, c16: int, pretrained: bool = True) -> None:
        super().__init__()
        self.trunk = Lite0Trunk(pretrained=pretrained, stop_at=16)
        _, w4, w8, w16 = self.trunk.widths
        self.project = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
            for cin, cout in ((w4, c4), (w8, c8), (w16, c16))
        )

    def forward(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, f4, f8, f16 = self.trunk(frame)
        return self.project[0](f4), self.project[1](f8), self.project[2](f16)


class ValueEncoder(nn.Module):
    """(frame, this object's mask, the other objects' masks) (B, 5, H, W) + the key encoder's f16 → value (B, Dv,
    H/16, W/16). Its own light backbone sees the mask; the key features it is fused with carry the appearance."""

    def __init__(self, c16: int, value_dim: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            stem(5, 16), SepConv(16, 24, stride=2), SepConv(24, 32, stride=2), SepConv(32, 48, stride=2)
        )
        self.fuse = nn.Sequential(SepConv(48 + c16, value_dim), ResSepConv(value_dim))

    def forward(self, frame_mask_others: torch.Tensor, f16: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.backbone(frame_mask_others), f16], dim=1))


class UpsampleBlock(nn.Module):
    """×2 upsampling of the per-object coarse features, fused with a skip connection of the query frame."""

    def __init__(self, skip_channels: int, cin: int, cout: int) -> None:
        super().__init__()
        self.skip = nn.Conv2d(skip_channels, cin, 1)
        self.out = SepConv(cin, cout)

    def forward(self, skip_b: torch.Tensor, coarse_bn: torch.Tensor) -> torch.Tensor:
        """skip (B, C, H, W) of the query frame, coarse (B·N, cin, H/2, W/2) → (B·N, cout, H, W). The skip's conv
        is the same for every object, so it runs once per frame and is broadcast over the N objects."""
        b, n = skip_b.shape[0], coarse_bn.shape[0] // skip_b.shape[0]
        up = F.interpolate(coarse_bn, size=skip_b.shape[-2:], mode="bilinear", align_corners=False)
        fused = up.reshape(b, n, *up.shape[1:]) + self.skip(skip_b).unsqueeze(1)
        return self.out(fused.flatten(0, 1))


class Decoder(nn.Module):
    """Per object: memory readout (B·N, Dv, h, w) + the query's f16/f8/f4 (B, ·) → one mask logit (B·N, 1, H/4,
    W/4)."""

    def __init__(self, value_dim: int, c4: int, c8: int, c16: int, width: int) -> None:
        super().__init__()
        self.compress = nn.Sequential(SepConv(value_dim + c16, width), ResSepConv(width))
        self.up8 = UpsampleBlock(c8, width, width)
        self.up4 = UpsampleBlock(c4, width, width // 2)
        self.head = nn.Conv2d(width // 2, 1, 3, padding=1)

    def forward(self, readout: torch.Tensor, f16: torch.Tensor, f8: torch.Tensor, f4: torch.Tensor) -> torch.Tensor:
        b, n = f16.shape[0], readout.shape[0] // f16.shape[0]
        f16_per_object = f16.unsqueeze(1).expand(b, n, *f16.shape[1:]).flatten(0, 1)
        x = self.compress(torch.cat([readout, f16_per_object], dim=1))
        return self.head(self.up4(f4, self.up8(f8, x)))
