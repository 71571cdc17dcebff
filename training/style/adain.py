"""AdaIN style transfer (Huang & Belongie, ICCV 2017) with weights the user supplies as a local file — never downloaded.

A VGG-like encoder (3×3 conv + ReLU stacks with max-pooling, up to the relu4_1-like stage) maps content and style
images to features; AdaIN gives the content features the channel-wise mean and std of the style features; a mirrored
decoder (nearest upsampling) turns them back into an image. `alpha` blends adapted and original content features.

The weights file is a torch state dict of `AdaINNet` (keys `encoder.*`, `decoder.*`), e.g. converted from a VGG-19
encoder and a decoder the user trained; the widths in `AdaINConfig` must match it. Errors name the config field.
Shapes: images (B, 3, H, W) in [0, 1], H and W multiples of 8.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from training.config import StrictModel
from training.data.normalize import normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AdaINConfig(StrictModel):
    weights: str | None = Field(None, description="local path to the AdaINNet state dict (required; never downloaded)")
    width: int = Field(64, ge=4, description="encoder channels at the first stage (64 for VGG)")
    alpha: float = Field(1.0, ge=0.0, le=1.0, description="style strength: 0 keeps the content features")


# (channels as multiples of width, convs) per stage; the last stage stops after its first conv (relu4_1).
_STAGES = ((1, 2), (2, 2), (4, 4), (8, 1))


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect"), nn.ReLU(inplace=True)]


class AdaINNet(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        encoder: list[nn.Module] = []
        channels = 3
        for stage, (multiple, convs) in enumerate(_STAGES):
            if stage:
                encoder.append(nn.MaxPool2d(2))
            for _ in range(convs):
                encoder += _conv(channels, multiple * width)
                channels = multiple * width
        self.encoder = nn.Sequential(*encoder)
        decoder: list[nn.Module] = []
        for multiple, convs in reversed(_STAGES[:-1]):
            decoder += _conv(channels, multiple * width) + [nn.Upsample(scale_factor=2, mode="nearest")]
            channels = multiple * width
            decoder += [layer for _ in range(convs - 1) for layer in _conv(channels, channels)]
        decoder.append(nn.Conv2d(channels, 3, 3, padding=1, padding_mode="reflect"))
        self.decoder = nn.Sequential(*decoder)

    def forward(self, content_unit: torch.Tensor, style_unit: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        if content_unit.shape[-1] % 8 or content_unit.shape[-2] % 8:
            raise ValueError(f"AdaIN input sides must be multiples of 8, got {tuple(content_unit.shape[-2:])}")
        content, style = self.encoder(normalize(content_unit)), self.encoder(normalize(style_unit))
        target = adaptive_instance_norm(content, style)
        mixed = alpha * target + (1 - alpha) * content
        mean = torch.tensor(IMAGENET_MEAN, device=mixed.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=mixed.device).view(1, 3, 1, 1)
        return (self.decoder(mixed) * std + mean).clamp(0.0, 1.0)  # the decoder outputs normalised pixels


def adaptive_instance_norm(content_bchw: torch.Tensor, style_bchw: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    c_mean, c_std = content_bchw.mean((2, 3), keepdim=True), content_bchw.std((2, 3), keepdim=True) + eps
    s_mean, s_std = style_bchw.mean((2, 3), keepdim=True), style_bchw.std((2, 3), keepdim=True) + eps
    return (content_bchw - c_mean) / c_std * s_std + s_mean


def load_adain(cfg: AdaINConfig, field: str = "adain.weights") -> AdaINNet:
    """The network with the user's weights, in eval mode; a missing or wrong file names `field` and the file."""
    if not cfg.weights:
        raise ValueError(f"{field} is not set: AdaIN needs a local weights file (nothing is ever downloaded)")
    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{field}: weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a torch archive
        raise ValueError(f"{field}: {path} is not a torch state dict ({exc.__class__.__name__})") from exc
    net = AdaINNet(cfg.width)
    if not isinstance(state, dict):
        raise ValueError(f"{field}: {path} holds a {type(state).__name__}, expected an AdaINNet state dict")
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{field}: {path} does not fit AdaINNet(width={cfg.width}): missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shapes {wrong[:3]} (check adain.width against the file)"
        )
    net.load_state_dict(state)
    return net.eval()


@torch.no_grad()
def adain_transfer(net: AdaINNet, source_bchw: torch.Tensor, target_bchw: torch.Tensor, alpha: float = 1.0):
    """Each source image in the style of its paired target image (or of the single target image)."""
    if target_bchw.shape[0] == 1 and source_bchw.shape[0] > 1:
        target_bchw = target_bchw.expand(source_bchw.shape[0], -1, -1, -1)
    return net(source_bchw, target_bchw, alpha).to(source_bchw.dtype)
