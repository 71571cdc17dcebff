"""Training clips for the propagation job: K frames of one scene in time order with their label maps.

- Static images (simulator frames, labelled real frames) become pseudo-sequences: K independent random affine +
  elastic deformations of the same image (stage 1, as STCN pre-trains on static images).
- Sequences (simulator sequences, labelled real sequences) give K frames in order with random gaps, mildly deformed.
In each clip up to `max_objects` classes of its first frame become objects 1..N; everything else is background 0,
except IGNORE_INDEX pixels (a folder set's keep/ masks), which stay IGNORE_INDEX for the loss to skip.

Shapes: clips are frames (B, K, 3, H, W) float in [0, 1] and labels (B, K, H, W) long.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from training.data.classes import IGNORE_INDEX
from training.data.folders import DataError, FrameIndex, folder_index, load_frames, vocalfolds_index
from training.data.simulator import simulate_frames, simulate_sequences
from training.data.sources import DataSpec
from training.data.volumes import simulate_volume, slices_as_frames
from training.propagate.config import ClipDataConfig, DeformConfig


@dataclass
class Pool:
    """Static images and sequences (each with its largest frame gap) of one domain."""

    static_images: np.ndarray  # (P, H, W, 3) uint8
    static_masks: np.ndarray  # (P, H, W) uint8
    sequences: list[tuple[np.ndarray, np.ndarray, int]] = field(default_factory=list)  # frames, masks, max gap


@dataclass
class ClipPools:
    """Everything a worker samples clips from: the simulator's pool and the real one (either may be None)."""

    sim: Pool | None
    real: Pool | None

    @property
    def static_count(self) -> int:
        return sum(len(p.static_images) for p in (self.sim, self.real) if p is not None)

    @property
    def sequence_count(self) -> int:
        return sum(len(p.sequences) for p in (self.sim, self.real) if p is not None)


def labelled_sequences(spec: DataSpec, dense: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """The labelled frames of a vocalfolds or folder DataSpec, grouped by sequence, in file-name (time) order.

    dense: refuse a folder with keep/ masks. J&F scoring starts from the first frame's full label map and counts
    every pixel, so ignored pixels (IGNORE_INDEX) have no meaning there; training clips skip them instead.
    """
    if spec.kind == "vocalfolds":
        index = vocalfolds_index(spec.uri, patients=spec.patients, sequences=spec.sequences)
    elif spec.kind == "folder":
        index = folder_index(spec.uri)
    else:
        raise ValueError(f"labelled sequences need kind vocalfolds or folder, got {spec.kind!r}")
    if index.masks is None:
        raise ValueError(f"{spec.describe()} has no masks; propagation needs labelled sequences")
    if dense and index.keep is not None:
        raise DataError(
            f"{spec.uri}: has keep/ masks (pseudo-labels with ignored pixels); J&F evaluation needs fully labelled "
            "sequences, e.g. a folder without keep/"
        )
    out = []
    for name in sorted(set(index.sequences)):
        positions = [i for i, s in enumerate(index.sequences) if s == name]
        positions.sort(key=lambda i: index.images[i])
        images, masks = load_frames(index.subset(positions), size=spec.size)
        out.append((images, masks))
    return out


def sequence_names(spec: DataSpec) -> list[str]:
    index: FrameIndex = (
        vocalfolds_index(spec.uri, patients=spec.patients, sequences=spec.sequences)
        if spec.kind == "vocalfolds"
        else folder_index(spec.uri)
    )
    return sorted(set(index.sequences))


def build_pools(cfg: ClipDataConfig, rank: int = 0, world: int = 1) -> ClipPools:
    """This worker's share of the simulated data (seeded by rank) plus all real frames and sequences."""
    size, seed = cfg.size, cfg.sim_seed + 1000 * rank
    per_worker = math.ceil(cfg.sim_frames / world)
    styles = {"sim": ["sim"], "real-like": ["real-like"], "mixed": ["sim", "real-like"]}[cfg.sim_style]
    images, masks = [], []
    for k, style in enumerate(styles):
        count = per_worker // len(styles) + (1 if k < per_worker % len(styles) else 0)
        if count:
            i, m = simulate_frames(count, seed=seed, style=style, size=size, start=k * 100_000)
            images.append(i)
            masks.append(m)
    sequences: list[tuple[np.ndarray, np.ndarray, int]] = []
    n_sequences = math.ceil(cfg.sim_sequences / world)
    if n_sequences:
        style = "real-like" if cfg.sim_style != "sim" else "sim"
        frames, labels = simulate_sequences(n_sequences, cfg.sim_length, seed=seed, style=style, size=size)
        sequences += [(frames[s], labels[s], cfg.sim_max_gap) for s in range(n_sequences)]
    for v in range(math.ceil(cfg.sim_volumes / world)):
        # CT slices in order are a sequence; every 4th slice also serves as a static image.
        volume = simulate_volume(seed + v, shape=(size, size, 48), spacing=(1.5, 1.5, 3.0))
        frames, labels = slices_as_frames(volume.hu), np.ascontiguousarray(np.moveaxis(volume.labels, 2, 0))
        sequences.append((frames, labels, 3))
        images.append(frames[::4])
        masks.append(labels[::4])
    sim = Pool(np.concatenate(images), np.concatenate(masks), sequences) if images else None
    real = None
    if cfg.real is not None:
        real_sequences = labelled_sequences(cfg.real.model_copy(update={"size": size}))
        real = Pool(
            np.concatenate([frames for frames, _ in real_sequences]),
            np.concatenate([labels for _, labels in real_sequences]),
            [(f, m, cfg.real_max_gap) for f, m in real_sequences if len(f) >= cfg.clip_frames],
        )
    if sim is None and real is None:
        raise ValueError("no static images for the propagation job (data.sim_frames = 0 and no data.real)")
    return ClipPools(sim, real)


def pick_objects(labels_khw: np.ndarray, max_objects: int, rng: np.random.Generator) -> np.ndarray:
    """Relabel a clip: up to max_objects classes of its first frame → 1..N in random order, the rest → 0, and
    IGNORE_INDEX stays IGNORE_INDEX."""
    present = [int(c) for c in np.unique(labels_khw[0]) if c not in (0, IGNORE_INDEX)]
    chosen = rng.permutation(present)[:max_objects] if present else []
    table = np.zeros(256, np.int64)
    table[IGNORE_INDEX] = IGNORE_INDEX
    for i, c in enumerate(chosen):
        table[c] = i + 1
    return table[labels_khw]


def sample_clips(
    pools: ClipPools,
    batch: int,
    cfg: ClipDataConfig,
    deform: DeformConfig,
    static_share: float,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of clips: real ones with probability `cfg.real_share` (when there are real frames), and static
    pseudo-sequences with probability `static_share`, sequence clips otherwise."""
    k = cfg.clip_frames
    frames, labels, strengths = [], [], []
    for _ in range(batch):
        use_real = pools.real is not None and (pools.sim is None or rng.random() < cfg.real_share)
        pool = pools.real if use_real else pools.sim
        if not pool.sequences or rng.random() < static_share:
            i = rng.integers(len(pool.static_images))
            clip_frames = np.repeat(pool.static_images[i][None], k, 0)
            clip_labels = np.repeat(pool.static_masks[i][None], k, 0)
            strengths.append(1.0)
        else:
            seq_frames, seq_labels, max_gap = pool.sequences[rng.integers(len(pool.sequences))]
            gaps = rng.integers(1, max_gap + 1, size=k - 1)
            while gaps.sum() >= len(seq_frames):  # short sequences: shrink the gaps until the clip fits
                gaps = np.maximum(1, gaps // 2) if gaps.max() > 1 else gaps[: len(seq_frames) - 1]
            start = rng.integers(len(seq_frames) - gaps.sum())
            order = start + np.concatenate([[0], np.cumsum(gaps)])
            if rng.random() < 0.5:
                order = order[::-1]  # propagation runs both ways in time
            clip_frames, clip_labels = seq_frames[order], seq_labels[order]
            strengths.append(deform.sequence_strength)
        if rng.random() < 0.5:
            clip_frames, clip_labels = clip_frames[:, :, ::-1], clip_labels[:, :, ::-1]
        frames.append(np.ascontiguousarray(clip_frames))
        labels.append(pick_objects(np.ascontiguousarray(clip_labels), cfg.max_objects, rng))
    frames_t = torch.from_numpy(np.stack(frames)).permute(0, 1, 4, 2, 3).float().div_(255)
    labels_t = torch.from_numpy(np.stack(labels))
    strength = torch.tensor(strengths).repeat_interleave(k)
    b, _, _, h, w = frames_t.shape
    warped, warped_labels = random_deform(
        frames_t.reshape(b * k, 3, h, w), labels_t.reshape(b * k, h, w), deform, strength, rng
    )
    return warped.reshape(b, k, 3, h, w), warped_labels.reshape(b, k, h, w)


def random_deform(
    images_n3hw: torch.Tensor,
    labels_nhw: torch.Tensor,
    cfg: DeformConfig,
    strength_n: torch.Tensor,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: a random affine map (rotation, scale, shear, shift) plus a smooth elastic field, scaled by its
    strength; then brightness/contrast jitter, and colour/gamma jitter when set (each image draws its own, so the
    frames of one clip differ in look as well as in shape). Outside the source image is black and background."""
    n, _, h, w = images_n3hw.shape
    s = strength_n.numpy()
    angle = np.deg2rad(rng.uniform(-1, 1, n) * cfg.rotation_deg * s)
    scale = np.exp(rng.uniform(np.log(cfg.scale_min), np.log(cfg.scale_max), n) * s)
    shear = np.deg2rad(rng.uniform(-1, 1, n) * cfg.shear_deg * s)
    shift = rng.uniform(-1, 1, (n, 2)) * 2 * cfg.translate * s[:, None]
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    theta = np.zeros((n, 2, 3), np.float32)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin + np.tan(shear) * cos
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos + np.tan(shear) * -sin
    theta[:, :, 2] = shift
    grid = F.affine_grid(torch.from_numpy(theta), [n, 3, h, w], align_corners=False)
    coarse = torch.from_numpy(rng.normal(0, 1, (n, 2, 5, 5)).astype(np.float32)) * (2 * cfg.elastic)
    coarse *= torch.from_numpy(s.astype(np.float32)).view(n, 1, 1, 1)
    grid = grid + F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    images = F.grid_sample(images_n3hw, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    labels = F.grid_sample(labels_nhw[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    brightness = torch.from_numpy(1 + rng.uniform(-1, 1, (n, 1, 1, 1)).astype(np.float32) * cfg.brightness)
    contrast = torch.from_numpy(1 + rng.uniform(-1, 1, (n, 1, 1, 1)).astype(np.float32) * cfg.contrast)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = ((images - mean) * contrast + mean) * brightness
    # Off by default draws nothing, so the clips of a run without them stay the same, draw for draw.
    if cfg.colour > 0:
        images = images * torch.from_numpy(1 + rng.uniform(-1, 1, (n, 3, 1, 1)).astype(np.float32) * cfg.colour)
    if cfg.gamma > 0:
        exponent = np.exp(rng.uniform(-1, 1, (n, 1, 1, 1)) * np.log1p(cfg.gamma)).astype(np.float32)
        images = images.clamp(0, 1) ** torch.from_numpy(exponent)
    return images.clamp_(0, 1), labels[:, 0].long()


def unlabelled_sequences(index: FrameIndex, size: int) -> list[tuple[str, np.ndarray, list[str]]]:
    """(sequence name, frames (T, size, size, 3), frame names) per sequence of an index, in file-name order."""
    out = []
    for name in sorted(set(index.sequences)):
        positions = sorted((i for i, s in enumerate(index.sequences) if s == name), key=lambda i: index.images[i])
        images = tuple(index.images[i] for i in positions)
        frames, _ = load_frames(FrameIndex(images=images, masks=None, sequences=(name,) * len(images)), size=size)
        out.append((name, frames, [uri.rsplit("/", 1)[-1].rsplit(".", 1)[0] for uri in images]))
    return out
