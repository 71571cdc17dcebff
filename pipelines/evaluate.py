"""`endoflow evaluate`: score an exported ONNX model (path or models:/name@alias) on labelled frames.

It runs the model the way serving does (onnxruntime, the metadata's resize and normalisation), so the numbers are
those of the deployed artefact, not of a torch checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from serving.onnx_model import OnnxSegmenter
from serving.resolve import resolve_model
from training.data.folders import DataError, folder_index, load_frames, vocalfolds_index
from training.metrics import SegmentationScores
from training.visualize import comparison_grid, save_png


def evaluate_onnx(
    model_ref: str,
    data_uri: str,
    layout: str,
    out: Path,
    sequences: list[str] | None = None,
    tracking_uri: str | None = None,
    batch_size: int = 8,
) -> dict:
    if layout == "vocalfolds":
        index = vocalfolds_index(data_uri, sequences=sequences)
    elif layout == "folder":
        index = folder_index(data_uri)
    else:
        raise ValueError(f"--layout must be 'folder' or 'vocalfolds', got {layout!r}")
    if index.masks is None:
        raise DataError(f"{data_uri}: evaluation needs label masks, found none")
    resolved = resolve_model(model_ref, tracking_uri=tracking_uri)
    model = OnnxSegmenter(resolved.path)
    images, masks = load_frames(index)
    scores = SegmentationScores(tuple(model.class_names))
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = model.predict(images[start : start + batch_size])
        scores.update(masks[start : start + batch_size], batch)
        predictions.append(batch)
    summary = scores.summary()
    report = {
        "model": {"ref": model_ref, "sha256": resolved.sha256, "source_run_id": model.metadata.source_run_id},
        "data": {"uri": data_uri, "layout": layout, "sequences": sequences, "frames": len(images)},
        **summary,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay_path = save_png(
        comparison_grid(images, {"truth": masks, "prediction": np.concatenate(predictions)}, rows=6),
        out.with_suffix(".overlays.png"),
    )
    report["overlays"] = str(overlay_path)
    out.write_text(json.dumps(report, indent=2))
    return report
