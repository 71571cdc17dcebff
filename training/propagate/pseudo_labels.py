"""Pseudo-labels by mutual agreement (the FLARE22 semi-supervised recipe): a reference segmenter labels key
frames (or slices), propagation fills every frame from its nearest key frame, and a pixel is kept where the two
agree with low uncertainty; frames with too few kept pixels are dropped.

Uncertainty per pixel: 1 − ½(p_ref + p_prop) of the shared label where the two labels agree, 1 where they differ
(p_ref: the segmenter's softmax probability, p_prop: the propagation's). Kept: uncertainty ≤ `threshold`, the
sweep parameter (below 1, so that disagreeing pixels are never kept). Without a segmenter (`endoflow patient adapt`
with `pseudo.agreement: propagation`), 1 − p_prop: the propagation's confidence alone.

Output: the folder layout training/data/folders.py reads (images/, masks/, classes.json, one subfolder per
sequence), plus keep/<sequence>/<frame>.png — 255 where a pixel is kept, 0 where it must be ignored — and
pseudo_labels.json with the settings and per-frame kept fractions. Why a separate mask: masks/ may hold only values
of classes.json, which names classes only, so the ignore value cannot be stored there; masks/ holds the reference
segmenter's label at ignored pixels. The folder reader applies keep/ itself: labels where keep is 0 load as
IGNORE_INDEX (255), which the segment and adapt jobs' losses (labelled source and extra_labelled alike) and val
scores, and the propagation job's clip loss, skip; so the set works directly as `{kind: folder, uri: OUT}` there.
J&F evaluation, which needs dense labels, refuses it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from serving.resolve import resolve_model
from training.config import StrictModel
from training.data import storage
from training.data.classes import CLASS_NAMES, IGNORE_INDEX
from training.data.folders import _png, folder_index, vocalfolds_index, write_folder_dataset
from training.data.sources import DataSpec
from training.propagate.inference import MemoryPolicy, propagate_from_keys
from training.propagate.sequences import labelled_sequences, sequence_names, unlabelled_sequences

# frames (T, H, W, 3) uint8 → softmax probabilities (T, C, H, W) float32
ReferenceSegmenter = Callable[[np.ndarray], np.ndarray]


class PseudoLabelConfig(StrictModel):
    threshold: float = Field(0.3, ge=0, lt=1, description="largest mutual-agreement uncertainty of a kept pixel")
    key_every: int = Field(10, ge=1, description="every k-th frame/slice is a key frame labelled by the segmenter")
    min_kept: float = Field(0.5, ge=0, le=1, description="a frame is written only if this fraction is kept")
    memory: MemoryPolicy = MemoryPolicy()


@dataclass
class SequencePseudoLabels:
    labels: np.ndarray  # (T, H, W) uint8: the agreed label where kept, the segmenter's (or propagated) elsewhere
    keep: np.ndarray  # (T, H, W) bool
    uncertainty: np.ndarray  # (T, H, W) float32
    frame_kept: np.ndarray  # (T,) bool

    @property
    def kept_fraction(self) -> np.ndarray:
        return self.keep.reshape(len(self.keep), -1).mean(1)


def mutual_uncertainty(
    reference_probs_tchw: np.ndarray, propagated_labels_thw: np.ndarray, propagated_confidence_thw: np.ndarray
) -> np.ndarray:
    """(T, H, W): 1 − mean confidence where the argmax labels agree, 1 where they disagree."""
    reference_labels = reference_probs_tchw.argmax(1)
    reference_confidence = reference_probs_tchw.max(1)
    agree = reference_labels == propagated_labels_thw
    return np.where(agree, 1 - 0.5 * (reference_confidence + propagated_confidence_thw), 1.0).astype(np.float32)


def pseudo_label_sequence(
    backend,
    frames_thw3: np.ndarray,
    reference_probs_tchw: np.ndarray | None,
    cfg: PseudoLabelConfig,
    key_labels: dict[int, np.ndarray] | None = None,
) -> SequencePseudoLabels:
    """key_labels (frame index → a person's label map, e.g. `endoflow patient adapt`'s K labelled frames):
    propagation starts from these instead of the segmenter's labels of every key_every-th frame, and each is kept
    whole on its own frame, where it is the truth rather than an estimate. Without reference probabilities (no
    segmenter yet, e.g. a first CT patient) the propagation's own confidence decides: uncertainty 1 − p_prop, the
    propagated labels throughout; key_labels are then needed."""
    if reference_probs_tchw is None and key_labels is None:
        raise ValueError("pseudo-labels without a reference segmenter need key_labels to propagate from")
    reference_labels = None if reference_probs_tchw is None else reference_probs_tchw.argmax(1).astype(np.uint8)
    if key_labels is None:
        keys = {k: reference_labels[k] for k in range(0, len(frames_thw3), cfg.key_every)}
    else:
        keys = key_labels
    propagated, confidence = propagate_from_keys(backend, frames_thw3, keys, cfg.memory)
    if reference_labels is None:
        labels, uncertainty = propagated, (1 - confidence).astype(np.float32)
    else:
        labels, uncertainty = reference_labels, mutual_uncertainty(reference_probs_tchw, propagated, confidence)
    keep = uncertainty <= cfg.threshold
    for index, truth in (key_labels or {}).items():
        labels[index], keep[index], uncertainty[index] = truth, True, 0.0
    frame_kept = keep.reshape(len(keep), -1).mean(1) >= cfg.min_kept
    return SequencePseudoLabels(labels, keep, uncertainty, frame_kept)


def truth_check(truth_thw: np.ndarray, result: SequencePseudoLabels) -> dict:
    """Where labels are known: accuracy of the kept pixels of written frames against the truth, beside the
    reference segmenter's accuracy on all pixels — what the threshold trades coverage for."""
    written = result.frame_kept
    kept = result.keep & written[:, None, None]
    correct = result.labels == truth_thw
    return {
        "kept_pixel_accuracy": float(correct[kept].mean()) if kept.any() else None,
        "reference_accuracy": float(correct.mean()),
        "coverage": float(kept.mean()),
    }


def write_pseudo_dataset(
    out_uri: str,
    sequences: dict[str, tuple[np.ndarray, list[str], SequencePseudoLabels]],
    cfg: PseudoLabelConfig,
    class_names: Sequence[str] = CLASS_NAMES,
) -> dict:
    """Write kept frames of every sequence (name → (frames, frame names, pseudo-labels)); returns the summary.
    class_names: the label set the labels index (classes.json)."""
    images, masks, names, keeps, report = [], [], [], [], {}
    for sequence, (frames, frame_names, result) in sequences.items():
        kept_frames = np.flatnonzero(result.frame_kept)
        images += [frames[i] for i in kept_frames]
        masks += [result.labels[i] for i in kept_frames]
        keeps += [result.keep[i] for i in kept_frames]
        names += [f"{sequence}/{frame_names[i]}" for i in kept_frames]
        report[sequence] = {
            "frames": len(frames),
            "frames_kept": int(len(kept_frames)),
            "kept_fraction": [round(float(f), 4) for f in result.kept_fraction],
        }
    if not images:
        raise ValueError(f"no frame kept at threshold {cfg.threshold} (min_kept {cfg.min_kept}); raise the threshold")
    write_folder_dataset(out_uri, np.stack(images), np.stack(masks), names, class_names=class_names)
    for name, keep in zip(names, keeps, strict=True):
        storage.write_bytes(storage.join(out_uri, "keep", f"{name}.png"), _png(keep.astype(np.uint8) * 255))
    summary = {
        "threshold": cfg.threshold,
        "key_every": cfg.key_every,
        "min_kept": cfg.min_kept,
        "ignore": f"keep/<name>.png: 255 kept, 0 ignored; the folder reader labels ignored pixels {IGNORE_INDEX}, "
        "which training losses and scores skip",
        "frames_written": len(names),
        "pixels_kept": float(np.mean([k.mean() for k in keeps])),
        "sequences": report,
    }
    storage.write_bytes(storage.join(out_uri, "pseudo_labels.json"), json.dumps(summary, indent=2).encode())
    return summary


def pseudo_label_dataset(
    backend,
    reference: ReferenceSegmenter,
    data: Path,
    out: Path,
    cfg: PseudoLabelConfig,
    layout: str = "vocalfolds",
    sequences: list[str] | None = None,
    size: int = 256,
    check_truth: bool = True,
    progress: Callable[[str], None] = print,
) -> dict:
    """Pseudo-label every sequence of a vocalfolds or folder dataset root and write the set (write_pseudo_dataset);
    the summary. vocalfolds with `check_truth`: kept pixels are also scored against the annotations (truth_check),
    to measure what the threshold keeps, and the summary's "truth_check" is written into pseudo_labels.json."""
    index = (
        vocalfolds_index(str(data), sequences=sequences, labelled=False)
        if layout == "vocalfolds"
        else folder_index(str(data))
    )
    truths = {}
    if layout == "vocalfolds" and check_truth:
        spec = DataSpec(kind="vocalfolds", uri=str(data), sequences=sequences, size=size)
        truths = dict(zip(sequence_names(spec), (m for _, m in labelled_sequences(spec)), strict=True))
    results, checks = {}, {}
    for name, frames, frame_names in unlabelled_sequences(index, size):
        results[name] = (frames, frame_names, pseudo_label_sequence(backend, frames, reference(frames), cfg))
        if name in truths:
            checks[name] = truth_check(truths[name], results[name][2])
        progress(f"{name}: {len(frames)} frames {checks.get(name, '')}")
    summary = write_pseudo_dataset(str(out), results, cfg)
    if checks:
        summary["truth_check"] = checks
        (out / "pseudo_labels.json").write_text(json.dumps(summary, indent=2))
    return summary


class OnnxReferenceSegmenter:
    """A segmentation ONNX of training/export.py as the reference segmenter: frames → softmax probabilities."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        if props.get("endoflow.task") != "segmentation":
            raise ValueError(f"{path}: endoflow.task is {props.get('endoflow.task')!r}; expected 'segmentation'")
        norm = json.loads(props["endoflow.normalization"])
        self.mean = np.array(norm["mean"], np.float32).reshape(1, 3, 1, 1)
        self.std = np.array(norm["std"], np.float32).reshape(1, 3, 1, 1)

    def __call__(self, frames_thw3: np.ndarray, batch: int = 8) -> np.ndarray:
        out = []
        for start in range(0, len(frames_thw3), batch):
            x = frames_thw3[start : start + batch].transpose(0, 3, 1, 2).astype(np.float32) / 255
            logits = self.session.run(["logits"], {"image": (x - self.mean) / self.std})[0]
            e = np.exp(logits - logits.max(1, keepdims=True))
            out.append(e / e.sum(1, keepdims=True))
        return np.concatenate(out).astype(np.float32)


def reference_segmenter(
    ref: str | Path, tracking_uri: str | None = None, threads: int | None = None
) -> OnnxReferenceSegmenter:
    """The segmentation ONNX a --segmenter names: a file, a directory holding model.onnx, or models:/NAME@ALIAS
    (models:/NAME/VERSION) in the registry at `tracking_uri`."""
    return OnnxReferenceSegmenter(resolve_model(ref, tracking_uri=tracking_uri).path, threads)
