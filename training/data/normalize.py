"""uint8 images ↔ network input. The constants travel into the ONNX metadata so serving normalises the same way."""

from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit_bchw(images_nhwc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float in [0, 1]."""
    tensor = torch.as_tensor(images_nhwc)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(unit_bchw: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=unit_bchw.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=unit_bchw.device).view(1, 3, 1, 1)
    return (unit_bchw - mean) / std
