"""Pictures of propagation results: evenly spaced frames (or CT slices) with the truth and the propagated labels
overlaid, one per sequence or volume, for an evaluation's report and MLflow artifacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data.classes import CLASS_COLOURS, IGNORE_INDEX
from training.data.volumes import Volume, slices_as_frames
from training.visualize import comparison_grid, save_png


def sequence_picture(frames: np.ndarray, truth: np.ndarray, labels: np.ndarray, path: Path, rows: int = 6) -> Path:
    """`rows` evenly spaced frames of a sequence (the given first and the last among them): the image, the truth
    and the propagated labels overlaid, one frame a row."""
    return save_png(comparison_grid(frames, {"truth": truth, "propagated": labels}, rows=rows), path)


def volume_picture(volume: Volume, predicted_xyz: np.ndarray, path: Path, rows: int = 6) -> Path:
    """Evenly spaced axial slices (windowed) with the truth and the propagated labels overlaid. FLARE22 numbers its
    organs up to 13, past the palette's 6 colours: organs are coloured in the order of their numbers, cycling."""
    organs = np.setdiff1d(np.union1d(np.unique(volume.labels), np.unique(predicted_xyz)), [0])
    shown = np.zeros(256, np.uint8)
    shown[organs] = 1 + np.arange(len(organs)) % (len(CLASS_COLOURS) - 1)
    frames = slices_as_frames(volume.hu)
    truth, labels = (np.moveaxis(shown[m], 2, 0) for m in (volume.labels, predicted_xyz))
    return save_png(comparison_grid(frames, {"truth": truth, "propagated": labels}, rows=rows), path)


def pseudo_label_picture(frames: np.ndarray, labels: np.ndarray, keep: np.ndarray, path: Path, rows: int = 6) -> Path:
    """Evenly spaced frames of a pseudo-labelled sequence: the labels where propagation and the segmenter were
    compared, and the pseudo-labels as trained on, ignored pixels in grey."""
    kept = np.where(keep, labels, np.uint8(IGNORE_INDEX))
    return save_png(comparison_grid(frames, {"labels": labels, "kept": kept}, rows=rows), path)
