"""Training-free colour transfers from a target domain onto source images: the cheap siblings of FDA.

- `lab_statistics_transfer`: per image, shift and scale each CIELAB channel of the source to the target's mean and
  standard deviation (Reinhard et al. 2001). LAB separates lightness from colour, so a colour cast moves as one.
- `histogram_matching`: per image and RGB channel, give the source the target's whole value distribution by mapping
  each source value's rank to the target value at the same quantile.

Both keep the geometry (and so the simulator labels) and only move colours. Batches are float (B, 3, H, W) sRGB in
[0, 1]; the target batch holds B images (paired one to one) or 1 (shared by all). Sizes may differ: only statistics
of the target are used.
"""

from __future__ import annotations

import torch

# Linear sRGB → CIE XYZ under the D65 illuminant, and the D65 reference white (Y normalised to 1).
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
_D65_WHITE = (0.95047, 1.0, 1.08883)
_DELTA = 6.0 / 29.0  # where the CIELAB cube root switches to its linear segment


def srgb_to_lab(rgb_bchw: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] → CIELAB (L in [0, 100], a and b roughly in [-128, 127]), same shape."""
    rgb = rgb_bchw.float()
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(_RGB_TO_XYZ, device=rgb.device)
    white = torch.tensor(_D65_WHITE, device=rgb.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear) / white
    # clamp_min keeps the unused branch of `where` finite (and its gradient free of NaNs).
    f = torch.where(xyz > _DELTA**3, xyz.clamp_min(_DELTA**3) ** (1 / 3), xyz / (3 * _DELTA**2) + 4 / 29)
    fx, fy, fz = f.unbind(dim=1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_srgb(lab_bchw: torch.Tensor) -> torch.Tensor:
    """CIELAB → sRGB, clamped to [0, 1] (LAB colours outside the sRGB gamut land on its boundary)."""
    lightness, a, b = lab_bchw.float().unbind(dim=1)
    fy = (lightness + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=1)
    xyz = torch.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4 / 29))
    white = torch.tensor(_D65_WHITE, device=xyz.device).view(1, 3, 1, 1)
    inverse = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).float().to(xyz.device)
    linear = torch.einsum("ij,bjhw->bihw", inverse, xyz * white).clamp(0.0, 1.0)
    rgb = torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear.clamp_min(0.0031308) ** (1 / 2.4) - 0.055)
    return rgb.clamp(0.0, 1.0)


def _check_pair(source_bchw: torch.Tensor, target_bchw: torch.Tensor) -> None:
    if source_bchw.ndim != 4 or source_bchw.shape[1] != 3 or target_bchw.ndim != 4 or target_bchw.shape[1] != 3:
        raise ValueError(
            f"expected (B, 3, H, W) batches, got {tuple(source_bchw.shape)} and {tuple(target_bchw.shape)}"
        )
    if target_bchw.shape[0] not in (1, source_bchw.shape[0]):
        raise ValueError(f"target batch must hold 1 or {source_bchw.shape[0]} images, got {target_bchw.shape[0]}")


def lab_statistics_transfer(source_bchw: torch.Tensor, target_bchw: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per image and LAB channel: (x − μ_source) · σ_target / σ_source + μ_target, back to sRGB in [0, 1]."""
    _check_pair(source_bchw, target_bchw)
    source_lab, target_lab = srgb_to_lab(source_bchw), srgb_to_lab(target_bchw)
    source_mean = source_lab.mean(dim=(-2, -1), keepdim=True)
    source_std = source_lab.std(dim=(-2, -1), keepdim=True, correction=0)
    target_mean = target_lab.mean(dim=(-2, -1), keepdim=True)
    target_std = target_lab.std(dim=(-2, -1), keepdim=True, correction=0)
    # A flat source channel (σ ≈ 0) has nothing to scale: eps keeps it flat at the target mean instead of dividing by 0.
    matched = (source_lab - source_mean) * (target_std / (source_std + eps)) + target_mean
    return lab_to_srgb(matched).to(source_bchw.dtype)


def histogram_matching(source_bchw: torch.Tensor, target_bchw: torch.Tensor) -> torch.Tensor:
    """Per image and channel CDF matching: a source value at rank r of N takes the target value at quantile r/(N−1).

    Tied source values (flat regions are common in simulator frames) share the mean rank of their tie group, so
    equal inputs map to equal outputs and a flat region stays flat rather than turning into a raster-order ramp.
    Without ties and with equal sizes, the sorted output equals the sorted target exactly.
    """
    _check_pair(source_bchw, target_bchw)
    batch, channels, height, width = source_bchw.shape
    source_bcn = source_bchw.float().reshape(batch, channels, -1)
    target_bcm = target_bchw.float().reshape(target_bchw.shape[0], channels, -1).expand(batch, -1, -1)
    n, m = source_bcn.shape[-1], target_bcm.shape[-1]
    sorted_source, order = source_bcn.sort(dim=-1)
    sorted_target = target_bcm.sort(dim=-1).values

    # Mean rank of each tie group: groups are runs of equal values in the sorted source, numbered per row and offset
    # by row · n so that one index_add over the whole batch keeps the rows apart.
    rows = sorted_source.reshape(-1, n)
    starts = torch.ones_like(rows, dtype=torch.bool)
    starts[:, 1:] = rows[:, 1:] != rows[:, :-1]
    row_offset = torch.arange(rows.shape[0], device=rows.device).unsqueeze(1) * n
    group = starts.long().cumsum(dim=-1) - 1 + row_offset
    ranks = torch.arange(n, dtype=torch.float32, device=rows.device).expand_as(rows).reshape(-1)
    rank_sum = rows.new_zeros(rows.numel()).index_add_(0, group.reshape(-1), ranks)
    count = rows.new_zeros(rows.numel()).index_add_(0, group.reshape(-1), torch.ones_like(ranks))
    mean_rank = (rank_sum / count.clamp_min(1))[group].reshape(batch, channels, n)

    # Linear interpolation into the sorted target at the same quantile.
    position = mean_rank * (m - 1) / max(n - 1, 1)
    low = position.floor().long().clamp(0, m - 1)
    high = (low + 1).clamp(max=m - 1)
    weight = position - low
    matched_sorted = sorted_target.gather(-1, low) * (1 - weight) + sorted_target.gather(-1, high) * weight
    matched = torch.empty_like(source_bcn).scatter_(-1, order, matched_sorted)
    return matched.reshape(batch, channels, height, width).to(source_bchw.dtype)
