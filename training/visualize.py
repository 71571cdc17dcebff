"""Pictures worth looking at: label-map overlays, side-by-side comparisons, training curves (PNG bytes/files)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.data.classes import CLASS_COLOURS, IGNORE_INDEX

IGNORE_COLOUR = (128, 128, 128)  # pixels without a label (a pseudo-label set's ignored pixels), unlike any class


def colourise(labels_hw: np.ndarray) -> np.ndarray:
    palette = np.asarray(CLASS_COLOURS, dtype=np.uint8)
    colours = palette[np.clip(labels_hw, 0, len(palette) - 1)]
    colours[labels_hw == IGNORE_INDEX] = IGNORE_COLOUR
    return colours


def overlay(image_hwc: np.ndarray, labels_hw: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    blended = (1 - alpha) * image_hwc.astype(np.float32) + alpha * colourise(labels_hw).astype(np.float32)
    return blended.clip(0, 255).astype(np.uint8)


def comparison_row(image_hwc: np.ndarray, panels: dict[str, np.ndarray]) -> np.ndarray:
    """image | overlay of each labelled panel (truth, predictions…), with titles."""
    tiles = [_titled(image_hwc, "image")] + [_titled(overlay(image_hwc, lab), name) for name, lab in panels.items()]
    return np.concatenate(tiles, axis=1)


def comparison_grid(images: np.ndarray, panels: dict[str, np.ndarray], rows: int = 4) -> np.ndarray:
    picks = np.linspace(0, len(images) - 1, num=min(rows, len(images))).astype(int)
    return np.concatenate(
        [comparison_row(images[i], {name: labels[i] for name, labels in panels.items()}) for i in picks], axis=0
    )


def save_png(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path, title: str, ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    for name, points in curves.items():
        if points:
            steps, values = zip(*points, strict=True)
            axis.plot(steps, values, marker="o", label=name)
    axis.set(title=title, xlabel="epoch", ylabel=ylabel)
    axis.grid(alpha=0.3)
    axis.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _titled(tile: np.ndarray, title: str) -> np.ndarray:
    image = Image.fromarray(np.ascontiguousarray(tile))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 8 + 7 * len(title), 14), fill=(0, 0, 0))
    draw.text((4, 2), title, fill=(255, 255, 255))
    return np.asarray(image)
