"""A U-Net family segmenter whose width, depth and block type come from its config.

Members:
- `plain`: the classic U-Net (two 3×3 convs per level, full-resolution stem) — the accuracy reference.
- `lite` (default): a stride-2 stem and depthwise-separable residual blocks, so the decoder runs at half
  resolution and the whole net fits a real-time budget on a CPU; the logits are upsampled back at the end.
- `encoder: lite0-imagenet`: the same separable decoder over the ImageNet EfficientNet-Lite0 trunk
  (`encoders.py`) instead of a trunk learnt from scratch; `depth` and `stem_stride` then come from the trunk.

Shapes: images are (B, 3, H, W) with H and W multiples of `UNetConfig.size_multiple`; logits are (B, C, H, W).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from torch import nn

from training.data.classes import LABEL_SETS, LabelSet, class_names
from training.models.encoders import EncoderName, Lite0Trunk


class UNetConfig(BaseModel):
    model_config = {"extra": "forbid"}

    block: Literal["double_conv", "separable"] = "separable"
    base_width: int = Field(16, ge=4, description="channels at the first level; doubled at every level")
    depth: int = Field(4, ge=1, le=6, description="number of downsampling steps")
    blocks_per_level: int = Field(2, ge=1, le=4)
    stem_stride: Literal[1, 2] = 2
    max_width: int = Field(256, ge=8, description="channel cap for deep levels")
    label_set: LabelSet = Field("laryngoscopy", description="what the classes are: laryngoscopy, or flare22 organs")
    num_classes: int = Field(7, description="the label set's first classes; default: all of it")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="before the classifier; enables MC-dropout")
    encoder: EncoderName = Field("scratch", description="scratch, or lite0-imagenet: the pretrained Lite0 trunk")
    encoder_lr_scale: float = Field(1.0, gt=0.0, le=1.0, description="pretrained trunk's lr, relative to compute.lr")
    frozen_stages: int = Field(0, ge=0, le=5, description="pretrained trunk: leading stages (stem..f2..f32) frozen")
    encoder_bn: Literal["train", "frozen"] = Field(
        "train", description="pretrained trunk: batch-norm statistics updated (train) or kept from ImageNet (frozen)"
    )

    @model_validator(mode="before")
    @classmethod
    def _whole_label_set(cls, data: object) -> object:
        if isinstance(data, dict) and "num_classes" not in data:
            return {**data, "num_classes": len(LABEL_SETS[data.get("label_set", "laryngoscopy")])}
        return data

    @model_validator(mode="after")
    def _classes_in_label_set(self) -> UNetConfig:
        class_names(self.label_set, self.num_classes)  # ValueError past the set's classes
        return self

    @property
    def class_names(self) -> tuple[str, ...]:
        return class_names(self.label_set, self.num_classes)

    @property
    def size_multiple(self) -> int:
        return 32 if self.encoder == "lite0-imagenet" else self.stem_stride * 2**self.depth

    @classmethod
    def plain(cls, num_classes: int = 7) -> UNetConfig:
        """The reference U-Net: 4 levels, width 32, double 3×3 convs (7.8 M parameters)."""
        return cls(
            block="double_conv",
            base_width=32,
            depth=4,
            blocks_per_level=1,
            stem_stride=1,
            max_width=512,
            num_classes=num_classes,
        )


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DoubleConv(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__(conv_bn_relu(c_in, c_out, stride=stride), conv_bn_relu(c_out, c_out))


class SeparableResidual(nn.Module):
    """Depthwise 3×3 + pointwise 1×1 with a residual path; cheap enough for CPU real time."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.depthwise = conv_bn_relu(c_in, c_in, stride=stride, groups=c_in)
        self.pointwise = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(stride) if stride != 1 else nn.Identity(),
                nn.Conv2d(c_in, c_out, 1, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pointwise(self.depthwise(x)) + self.shortcut(x))


def make_stage(cfg: UNetConfig, c_in: int, c_out: int, stride: int) -> nn.Sequential:
    block = DoubleConv if cfg.block == "double_conv" else SeparableResidual
    layers = [block(c_in, c_out, stride)]
    layers += [block(c_out, c_out) for _ in range(cfg.blocks_per_level - 1)]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        widths = [min(cfg.base_width * 2**i, cfg.max_width) for i in range(cfg.depth + 1)]
        self.stem = conv_bn_relu(3, widths[0], stride=cfg.stem_stride)
        self.enc0 = make_stage(cfg, widths[0], widths[0], stride=1)
        self.down = nn.ModuleList(make_stage(cfg, widths[i], widths[i + 1], stride=2) for i in range(cfg.depth))
        # Each decoder level fuses the upsampled deeper features with the skip of the same resolution.
        self.up = nn.ModuleList(
            make_stage(cfg, widths[i + 1] + widths[i], widths[i], stride=1) for i in range(cfg.depth)
        )
        self.dropout = nn.Dropout2d(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(widths[0], cfg.num_classes, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(image)))

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Decoder features at stem resolution (B, base_width, H/stem, W/stem)."""
        x = self.enc0(self.stem(image))
        skips = [x]
        for stage in self.down:
            x = stage(x)
            skips.append(x)
        for level in reversed(range(self.cfg.depth)):
            skip = skips[level]
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.up[level](torch.cat([x, skip], dim=1))
        return x


class PretrainedUNet(nn.Module):
    """The separable decoder over the Lite0 trunk's f2…f32 skips; logits at 1/2 resolution, like `lite`."""

    def __init__(self, cfg: UNetConfig, pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = Lite0Trunk(pretrained=pretrained)
        skips = self.encoder.widths  # f2, f4, f8, f16, f32
        widths = [min(cfg.base_width * 2**i, cfg.max_width) for i in range(len(skips) - 1)]
        deeper = [*widths[1:], skips[-1]]
        self.up = nn.ModuleList(make_stage(cfg, deeper[i] + skips[i], widths[i], stride=1) for i in range(len(widths)))
        self.dropout = nn.Dropout2d(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(widths[0], cfg.num_classes, 1)
        self._freeze_leading_stages(cfg.frozen_stages)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(image)))

    def features(self, image: torch.Tensor) -> torch.Tensor:
        skips = self.encoder(image)
        x = skips[-1]
        for level in reversed(range(len(self.up))):
            skip = skips[level]
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.up[level](torch.cat([x, skip], dim=1))
        return x

    def _freeze_leading_stages(self, stages: int) -> None:
        if stages == 0:
            return
        last_frozen_block = self.encoder.skip_blocks[stages - 1]
        frozen = [self.encoder.stem, *self.encoder.blocks[: last_frozen_block + 1]]
        for module in frozen:
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> PretrainedUNet:
        super().train(mode)
        if mode and self.cfg.encoder_bn == "frozen":
            # ImageNet statistics over ours: batches of 4 endoscopy frames estimate them poorly.
            for module in self.encoder.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self


class Segmenter(nn.Module):
    """UNet (or the pretrained-trunk U-Net) + the final upsampling to input size, so every caller sees (B, C, H, W)
    logits. `pretrained=False` builds the same graph without reading the ImageNet weights (a checkpoint follows)."""

    def __init__(self, cfg: UNetConfig, pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        self.unet = PretrainedUNet(cfg, pretrained) if cfg.encoder == "lite0-imagenet" else UNet(cfg)

    @property
    def output_stride(self) -> int:
        return 2 if self.cfg.encoder == "lite0-imagenet" else self.cfg.stem_stride

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.unet(image)
        if self.output_stride != 1:
            logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def parameter_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: the pretrained trunk at `encoder_lr_scale` × lr, the rest at lr; frozen weights out."""
        if self.cfg.encoder == "scratch":
            return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]
        encoder = [p for p in self.unet.encoder.parameters() if p.requires_grad]
        encoder_ids = {id(p) for p in self.unet.encoder.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder_ids]
        return [{"params": encoder, "lr": lr * self.cfg.encoder_lr_scale}, {"params": rest, "lr": lr}]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
