"""Propagation over a folder of video frames: a key frame's labels (a mask PNG, or a segmenter's) carried forward, or
both ways from a middle key frame, written as one label PNG per frame (`endoflow propagate run --input FOLDER`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from training.data import storage
from training.data.folders import IMAGE_SUFFIXES, _png, load_image, load_mask
from training.propagate.inference import (
    MemoryPolicy,
    SegmenterGuide,
    propagate_both_ways,
    resize_frames,
    resize_labels,
)
from training.propagate.pseudo_labels import ReferenceSegmenter


def propagate_frame_folder(
    backend,
    folder: Path,
    mask: Path | None,
    segmenter: ReferenceSegmenter | None,
    key_index: int,
    out: Path,
    policy: MemoryPolicy,
    size: int,
    guide_weight: float = 0.0,
) -> str:
    """A label PNG per frame of `folder` in `out`, at the frames' own size; what was written, in words.
    segmenter: None, or a callable frames → probabilities (OnnxReferenceSegmenter) labelling the key frame when
    there is no mask, and guiding every frame when guide_weight > 0. key_index -1: the middle frame."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder}: no frames; expected a folder of .png/.jpg frames in time order")
    originals = [load_image(str(p)) for p in files]
    height, width = originals[0].shape[:2]
    frames = resize_frames(np.stack([np.asarray(_resize_rgb(f, width, height)) for f in originals]), size)
    key_index = len(frames) // 2 if key_index < 0 else key_index
    if mask is not None:
        key_labels = resize_labels(load_mask(str(mask))[None], size, size)[0]
    elif segmenter is not None:
        key_labels = segmenter(frames[key_index : key_index + 1])[0].argmax(0).astype(np.uint8)
    else:
        raise ValueError("give the key frame's labels: --mask PNG or --segmenter ONNX")
    guide = SegmenterGuide(segmenter(frames), guide_weight) if segmenter is not None and guide_weight > 0 else None
    labels, _ = propagate_both_ways(backend, frames, key_labels, key_index, policy, guide)
    labels = resize_labels(labels, height, width)
    for path, label in zip(files, labels, strict=True):
        storage.write_bytes(str(out / f"{path.stem}.png"), _png(label))
    return f"{len(files)} label maps to {out} (key frame {files[key_index].name})"


def _resize_rgb(frame: np.ndarray, width: int, height: int):
    return frame if frame.shape[:2] == (height, width) else Image.fromarray(frame).resize((width, height))
