"""Fourier domain adaptation (FDA, Yang & Soatto, CVPR 2020): a training-free sim → real style transfer.

The low-frequency amplitude spectrum carries illumination and colour cast; the phase carries the structure. Swapping
the central (2β·min(H,W))² block of the source amplitude for a target image's keeps the simulator geometry — so its
labels stay valid — while taking on the target's look. Works on float batches (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import torch


def fourier_style_transfer(source_bchw: torch.Tensor, target_bchw: torch.Tensor, beta: float = 0.01) -> torch.Tensor:
    if source_bchw.shape[-2:] != target_bchw.shape[-2:]:
        raise ValueError(f"FDA needs equal image sizes, got {tuple(source_bchw.shape)} and {tuple(target_bchw.shape)}")
    if not 0.0 <= beta <= 0.5:
        raise ValueError(f"FDA beta must lie in [0, 0.5], got {beta}")
    height, width = source_bchw.shape[-2:]
    half = int(beta * min(height, width))
    if half == 0:
        return source_bchw
    src = torch.fft.fft2(source_bchw.float(), norm="ortho")
    tgt = torch.fft.fft2(target_bchw.float(), norm="ortho")
    amplitude, phase = src.abs(), src.angle()
    # Centre the spectrum so the low frequencies form one block, swap it, and shift back.
    amplitude = torch.fft.fftshift(amplitude, dim=(-2, -1))
    target_amplitude = torch.fft.fftshift(tgt.abs(), dim=(-2, -1))
    cy, cx = height // 2, width // 2
    window = (..., slice(cy - half, cy + half + 1), slice(cx - half, cx + half + 1))
    amplitude[window] = target_amplitude[window]
    amplitude = torch.fft.ifftshift(amplitude, dim=(-2, -1))
    out = torch.fft.ifft2(torch.polar(amplitude, phase), norm="ortho").real
    return out.clamp(0.0, 1.0).to(source_bchw.dtype)
