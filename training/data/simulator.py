"""The simulator: procedural scenes (`scene.py`) rendered in a style (`render.py`) into labelled frames and sequences.

Why a module of its own: rendering builds on the scene geometry, and frames need both, so the composition sits above
the two rather than inside either (which would make them import each other).

Determinism: every random number comes from numpy Generators seeded with (seed, stream, index); see scene.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from training.data.render import check_style, render
from training.data.scene import SceneConfig, label_map, sample_scene, sample_sequence

# Seed streams, so frames and sequences drawn from one seed never share random numbers.
_FRAME_STREAM, _SEQUENCE_STREAM, _RENDER_STREAM = 0, 1, 2


def _config_for(size: int, cfg: SceneConfig | None) -> SceneConfig:
    cfg = cfg or SceneConfig(size=size)
    return cfg if cfg.size == size else dataclasses.replace(cfg, size=size)


def simulate_frames(
    n: int, *, seed: int, style: str, size: int = 256, cfg: SceneConfig | None = None, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Frames start .. start+n-1 of the stream named by `seed`: images (N, H, W, 3) uint8, masks (N, H, W) uint8.

    Frame i depends only on (seed, i), so workers can each generate a slice and the union equals one big batch.
    Geometry does not depend on `style`: the same seed gives paired sim / real-like images of identical masks.
    seed: a non-negative int. `size` wins over cfg.size.
    """
    check_style(style)
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be non-negative, got n={n}, start={start}")
    cfg = _config_for(size, cfg)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    for row, index in enumerate(range(start, start + n)):
        scene = sample_scene(np.random.default_rng([seed, _FRAME_STREAM, index]), cfg)
        masks[row] = label_map(scene)
        images[row] = render(masks[row], scene, style, np.random.default_rng([seed, _RENDER_STREAM, index]))
    return images, masks


def simulate_sequences(
    n_sequences: int, length: int, *, seed: int, style: str, size: int = 256, cfg: SceneConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sequences (S, T, H, W, 3) uint8 and their masks (S, T, H, W) uint8; sequence s depends only on (seed, s)."""
    check_style(style)
    if n_sequences < 0:
        raise ValueError(f"n_sequences must be non-negative, got {n_sequences}")
    cfg = _config_for(size, cfg)
    images = np.empty((n_sequences, length, size, size, 3), np.uint8)
    masks = np.empty((n_sequences, length, size, size), np.uint8)
    for s in range(n_sequences):
        scenes = sample_sequence(np.random.default_rng([seed, _SEQUENCE_STREAM, s]), length, cfg)
        for k, scene in enumerate(scenes):
            masks[s, k] = label_map(scene)
            render_rng = np.random.default_rng([seed, _SEQUENCE_STREAM, _RENDER_STREAM, s, k])
            images[s, k] = render(masks[s, k], scene, style, render_rng)
    return images, masks
