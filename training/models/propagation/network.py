"""The propagation network: encode_key, encode_value, segment (memory read + decoder + soft aggregation).

Shapes: B batch, N objects, T memory frames, H×W the frame, h×w = H/16×W/16 where keys and values live.
Memory tensors are passed flattened over frames and positions: keys (B, Dk, M), values (B, N, Dv, M), M = T·h·w.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from training.models.encoders import EncoderName
from training.models.propagation.memory import read
from training.models.propagation.modules import Decoder, KeyEncoder, PretrainedKeyEncoder, ValueEncoder

KEY_STRIDE = 16
_EPS = 1e-7


class PropagationConfig(BaseModel):
    model_config = {"extra": "forbid"}

    # Measured on vocalfolds seq4 (held out, `make bench-propagate`): key_dim 32, value_dim 64, c4 24, c8 48, c16 96
    # (86 k parameters) scored J&F 0.478; these widths (211 k) 0.617 at about the same stream speed, whose cost is
    # mostly the per-object decoder.
    key_dim: int = Field(64, ge=4)
    value_dim: int = Field(96, ge=8)
    c4: int = Field(32, ge=4, description="channels at 1/4")
    c8: int = Field(96, ge=4, description="channels at 1/8")
    c16: int = Field(192, ge=4, description="channels at 1/16")
    decoder_width: int = Field(64, ge=8)
    key_encoder: EncoderName = Field("scratch", description="scratch, or lite0-imagenet: the pretrained Lite0 trunk")

    @property
    def size_multiple(self) -> int:
        return KEY_STRIDE


class PropagationNet(nn.Module):
    def __init__(self, cfg: PropagationConfig | None = None, pretrained: bool = True) -> None:
        """`pretrained=False` skips reading the ImageNet weights of a pretrained key encoder (a checkpoint follows)."""
        super().__init__()
        self.cfg = cfg = cfg or PropagationConfig()
        self.key_encoder: nn.Module = (
            PretrainedKeyEncoder(cfg.c4, cfg.c8, cfg.c16, pretrained)
            if cfg.key_encoder == "lite0-imagenet"
            else KeyEncoder(cfg.c4, cfg.c8, cfg.c16)
        )
        self.key_projection = nn.Conv2d(cfg.c16, cfg.key_dim, 1)
        self.value_encoder = ValueEncoder(cfg.c16, cfg.value_dim)
        self.decoder = Decoder(cfg.value_dim, cfg.c4, cfg.c8, cfg.c16, cfg.decoder_width)

    def forward(self, frames_bk3hw: torch.Tensor, first_masks_bnhw: torch.Tensor) -> torch.Tensor:
        """Training pass over a clip: frame 0 is given by its object masks; each later frame is segmented from the
        memory of all earlier frames (their predicted masks re-encoded). Returns logits (B, K − 1, N + 1, H, W)."""
        b, k = frames_bk3hw.shape[:2]
        key, f16, f8, f4 = (x.reshape(b, k, *x.shape[1:]) for x in self.encode_key(frames_bk3hw.flatten(0, 1)))
        keys = [key[:, 0]]
        values = [self.encode_value(frames_bk3hw[:, 0], f16[:, 0], first_masks_bnhw)]
        outputs = []
        for t in range(1, k):
            memory_keys, memory_values = flatten_memory(torch.stack(keys, 1), torch.stack(values, 2))
            logits = self.segment(key[:, t], f16[:, t], f8[:, t], f4[:, t], memory_keys, memory_values)
            outputs.append(logits)
            if t < k - 1:
                keys.append(key[:, t])
                values.append(self.encode_value(frames_bk3hw[:, t], f16[:, t], logits.softmax(1)[:, 1:]))
        return torch.stack(outputs, 1)

    def encode_key(self, frame_b3hw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normalised frames → key (B, Dk, h, w), f16, f8, f4."""
        f4, f8, f16 = self.key_encoder(frame_b3hw)
        return self.key_projection(f16), f16, f8, f4

    def encode_value(self, frame_b3hw: torch.Tensor, f16: torch.Tensor, masks_bnhw: torch.Tensor) -> torch.Tensor:
        """Frames, their f16 and per-object mask probabilities (B, N, H, W) → values (B, N, Dv, h, w)."""
        b, n, height, width = masks_bnhw.shape
        others = (masks_bnhw.sum(1, keepdim=True) - masks_bnhw).clamp(0, 1)
        stacked = torch.cat(
            [
                frame_b3hw.unsqueeze(1).expand(b, n, 3, height, width),
                masks_bnhw.unsqueeze(2),
                others.unsqueeze(2),
            ],
            dim=2,
        ).reshape(b * n, 5, height, width)
        f16_per_object = f16.unsqueeze(1).expand(b, n, *f16.shape[1:]).reshape(b * n, *f16.shape[1:])
        value = self.value_encoder(stacked, f16_per_object)
        return value.reshape(b, n, *value.shape[1:])

    def segment(
        self,
        key: torch.Tensor,
        f16: torch.Tensor,
        f8: torch.Tensor,
        f4: torch.Tensor,
        memory_keys_bdm: torch.Tensor,
        memory_values_bndm: torch.Tensor,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Read the memory for the query frame and decode: logits (B, N + 1, H, W), background first."""
        logits = self.segment_quarter(key, f16, f8, f4, memory_keys_bdm, memory_values_bndm, top_k)
        return F.interpolate(logits, scale_factor=4.0, mode="bilinear", align_corners=False)

    def segment_probs(self, *args, **kwargs) -> torch.Tensor:
        """Inference: probabilities (B, N + 1, H, W). The softmax runs at 1/4 resolution before the upsampling, 16×
        fewer pixels than after it; bilinear weights keep the probabilities summing to 1."""
        probs = self.segment_quarter(*args, **kwargs).softmax(1)
        return F.interpolate(probs, scale_factor=4.0, mode="bilinear", align_corners=False)

    def segment_quarter(self, key, f16, f8, f4, memory_keys_bdm, memory_values_bndm, top_k=None) -> torch.Tensor:
        """Aggregated logits at 1/4 resolution, (B, N + 1, H/4, W/4)."""
        b, n = memory_values_bndm.shape[:2]
        h, w = key.shape[-2:]
        readout = read(memory_keys_bdm, key.flatten(2), memory_values_bndm, top_k).reshape(b * n, -1, h, w)
        logits = self.decoder(readout, f16, f8, f4)
        return aggregate(torch.sigmoid(logits.reshape(b, n, *logits.shape[-2:])))


def aggregate(probs_bnhw: torch.Tensor) -> torch.Tensor:
    """STCN's soft aggregation: per-object probabilities → logits over (background, objects), (B, N + 1, H, W)."""
    background = torch.prod(1 - probs_bnhw, dim=1, keepdim=True)
    merged = torch.cat([background, probs_bnhw], dim=1).clamp(_EPS, 1 - _EPS)
    return torch.log(merged / (1 - merged))


def flatten_memory(keys_btdhw: torch.Tensor, values_bntdhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked memory frames (B, T, Dk, h, w), (B, N, T, Dv, h, w) → (B, Dk, M), (B, N, Dv, M)."""
    b, t, dk, h, w = keys_btdhw.shape
    n, dv = values_bntdhw.shape[1], values_bntdhw.shape[3]
    keys = keys_btdhw.permute(0, 2, 1, 3, 4).reshape(b, dk, t * h * w)
    values = values_bntdhw.permute(0, 1, 3, 2, 4, 5).reshape(b, n, dv, t * h * w)
    return keys, values


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
