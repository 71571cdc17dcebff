"""Scoring mask propagation, in one place: video sequences by J&F with the first labelled frame given (beside the
copy-first-mask baseline), CT volumes by Dice and NSD with one key slice given (beside copying it), torch/onnxruntime
sequence parity. The metrics themselves (J, F, Dice, NSD) are training/propagation_metrics.py.

Used by the training job (validation), the CLI's evaluate and run, the end-to-end flow and the benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data.classes import VOID
from training.data.folders import DataError
from training.data.sources import DataSpec
from training.data.volumes import Volume
from training.propagate.export import ExportedGraphs, OnnxBackend
from training.propagate.inference import MemoryPolicy, SegmenterGuide, TorchBackend, propagate, propagate_volume
from training.propagate.pictures import sequence_picture, volume_picture
from training.propagate.sequences import labelled_sequences, sequence_names
from training.propagation_metrics import dice, j_and_f, normalized_surface_dice

NSD_TOLERANCE_MM = 2.0  # the surface tolerance of the reported NSD ("nsd_2mm"): one voxel of a 2 mm scan


@dataclass
class Propagated:
    """One sequence propagated from its first frame's labels, and J&F (j_and_f) of every later frame."""

    labels: np.ndarray  # (T, H, W) uint8, the first frame's given labels included
    confidence: np.ndarray
    objects: list[int]  # the labels present in the first frame: the objects scored
    scores: dict
    seconds: float  # propagation only, for frames/s


def first_frame_given(
    backend, frames: np.ndarray, truth: np.ndarray, policy: MemoryPolicy, guide: SegmenterGuide | None = None
) -> Propagated:
    """The one protocol every propagation score follows (the job's validation, evaluation, benchmarks, parity): the
    first frame's labels given, the rest propagated, the later frames scored against the truth by J&F."""
    objects = [int(c) for c in np.unique(truth[0]) if c != 0]
    started = time.perf_counter()
    labels, confidence = propagate(backend, frames, truth[0], policy, guide=guide)
    seconds = time.perf_counter() - started
    return Propagated(labels, confidence, objects, j_and_f(truth[1:], labels[1:], objects), seconds)


def validation_scores(backend, sequences: Iterable[tuple[np.ndarray, np.ndarray]], policy: MemoryPolicy) -> dict:
    """Mean J&F (and J, F) over labelled sequences, the first frame given: the training job's validation score.
    A sequence without objects in its first frame scores NaN and is left out of the means."""
    scores = [first_frame_given(backend, frames, truth, policy).scores for frames, truth in sequences]
    return {key: float(np.nanmean([s[key] for s in scores])) for key in ("J&F", "J", "F")}


def score_sequence(
    backend, frames: np.ndarray, truth: np.ndarray, policy: MemoryPolicy, segmenter=None, guide_weight: float = 0.0
) -> dict:
    """The first frame's labels given, the rest propagated and scored; the copy-first-mask baseline beside it, and
    the scores with the truth's void pixels (class 0) left out as DAVIS leaves out its void pixels (`void_excluded`:
    painting an object onto void costs nothing there, where J and F count it as a false positive).
    `segmenter` (frames → class probabilities, OnnxReferenceSegmenter): scored alone beside it, and mixed into
    every propagated frame with `guide_weight` (> 0; SegmenterGuide)."""
    class_probs = segmenter(frames) if segmenter is not None else None
    guide = SegmenterGuide(class_probs, guide_weight) if class_probs is not None and guide_weight > 0 else None
    propagated = first_frame_given(backend, frames, truth, policy, guide)
    labels, confidence, objects, ours = propagated.labels, propagated.confidence, propagated.objects, propagated.scores
    seconds = propagated.seconds
    copy = np.repeat(truth[:1], len(truth) - 1, axis=0)
    baseline = j_and_f(truth[1:], copy, objects)
    void = truth[1:] == VOID
    void_excluded = j_and_f(truth[1:], labels[1:], objects, void=void) if void.any() else ours  # same when none
    scores = {
        "frames": len(frames),
        "objects": objects,
        "J": ours["J"],
        "F": ours["F"],
        "J&F": ours["J&F"],
        "J_recall": ours["J_recall"],
        "J_decay": ours["J_decay"],
        "copy_first": {"J": baseline["J"], "F": baseline["F"], "J&F": baseline["J&F"]},
        "per_object_J": {str(k): v["J"] for k, v in ours["objects"].items()},
        "per_object": {str(k): v for k, v in ours["objects"].items()},
        "void_excluded": {
            "J": void_excluded["J"],
            "F": void_excluded["F"],
            "J&F": void_excluded["J&F"],
            "void_fraction": float(void.mean()),
            "per_object_J&F": {str(k): v["J&F"] for k, v in void_excluded["objects"].items()},
        },
        "frames_per_second": (len(frames) - 1) / seconds,
        "labels": labels,
        "confidence": confidence,
    }
    if class_probs is not None:
        alone = j_and_f(truth[1:], class_probs[1:].argmax(1).astype(np.uint8), objects)
        scores["segmenter_only"] = {"J": alone["J"], "F": alone["F"], "J&F": alone["J&F"]}
    return scores


def evaluate_sequences(
    backend,
    sequences: dict[str, tuple[np.ndarray, np.ndarray]],
    policy: MemoryPolicy,
    segmenter=None,
    guide_weight: float = 0.0,
    pictures: Path | None = None,
) -> dict:
    """Per-sequence scores (without label maps) and their means; with a segmenter, its own scores' mean too.
    `pictures`: a folder that gets one PNG per sequence (patient1/seq4 → patient1/seq4.png, as pseudo-label folders
    nest them), evenly spaced frames with the truth and the propagated labels overlaid (sequence_picture); their
    paths are in the report's "pictures"."""
    per_sequence, pictured = {}, {}
    for name, (frames, truth) in sequences.items():
        scores = score_sequence(backend, frames, truth, policy, segmenter, guide_weight)
        labels = scores.pop("labels")
        scores.pop("confidence")
        per_sequence[name] = scores
        if pictures is not None:
            pictured[name] = str(sequence_picture(frames, truth, labels, pictures / f"{name}.png"))
    keys = ("J", "F", "J&F")
    report = {
        "mean": {key: float(np.mean([s[key] for s in per_sequence.values()])) for key in keys},
        "copy_first_mean": {k: float(np.mean([s["copy_first"][k] for s in per_sequence.values()])) for k in keys},
        "void_excluded_mean": {k: float(np.mean([s["void_excluded"][k] for s in per_sequence.values()])) for k in keys},
        "sequences": per_sequence,
        "policy": policy.model_dump(),
    }
    if segmenter is not None:
        report["segmenter_only_mean"] = {
            k: float(np.mean([s["segmenter_only"][k] for s in per_sequence.values()])) for k in keys
        }
        report["segmenter_guide_weight"] = guide_weight
    if pictures is not None:
        report["pictures"] = pictured
    return report


def named_sequences(spec: DataSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return dict(zip(sequence_names(spec), labelled_sequences(spec, dense=True), strict=True))


def sequence_parity(model, graphs: ExportedGraphs, frames: np.ndarray, truth: np.ndarray, policy: MemoryPolicy) -> dict:
    """One whole sequence through torch and through onnxruntime: J&F of each and their difference."""
    torch_scores = score_sequence(TorchBackend(model, policy.top_k), frames, truth, policy)
    onnx_scores = score_sequence(OnnxBackend(graphs), frames, truth, policy)
    return {
        "jf_torch": torch_scores["J&F"],
        "jf_onnx": onnx_scores["J&F"],
        "jf_abs_diff": abs(torch_scores["J&F"] - onnx_scores["J&F"]),
        "label_agreement": float(np.mean(torch_scores["labels"] == onnx_scores["labels"])),
        "confidence_max_abs_diff": float(np.abs(torch_scores["confidence"] - onnx_scores["confidence"]).max()),
    }


def middle_key_slice(labels_xyz: np.ndarray, name: str | Path) -> int:
    """The middle one of a volume's annotated axial slices: where a key slice gives propagation the most context
    both ways."""
    annotated = [z for z in range(labels_xyz.shape[2]) if labels_xyz[:, :, z].any()]
    if not annotated:
        raise DataError(f"{name}: no labelled slice to start from")
    return annotated[len(annotated) // 2]


def score_volume(
    truth_xyz: np.ndarray, predicted_xyz: np.ndarray, keys: Sequence[int], spacing: Sequence[float]
) -> dict[str, dict[str, float]]:
    """Per organ of the truth: Dice and NSD (at NSD_TOLERANCE_MM, in mm through `spacing`) of the propagated
    labels, beside the same scores for copying each slice's nearest key slice."""
    nearest = [min(keys, key=lambda k: abs(k - z)) for z in range(truth_xyz.shape[2])]
    copied = truth_xyz[:, :, nearest]
    scores = {}
    for organ in [int(o) for o in np.unique(truth_xyz) if o]:
        truth, pred, copy = truth_xyz == organ, predicted_xyz == organ, copied == organ
        scores[str(organ)] = {
            "dice": dice(truth, pred),
            "nsd_2mm": normalized_surface_dice(truth, pred, NSD_TOLERANCE_MM, spacing),
            "copy_key_slice_dice": dice(truth, copy),
            "copy_key_slice_nsd_2mm": normalized_surface_dice(truth, copy, NSD_TOLERANCE_MM, spacing),
        }
    return scores


def evaluate_volumes(
    backend, volumes: Iterable[Volume], policy: MemoryPolicy, size: int, pictures: Path | None = None
) -> dict:
    """Per labelled volume (read one at a time: CT scans are large): its middle annotated slice given, the others
    propagated both ways at size×size and scored per organ (score_volume); means over every (volume, organ) pair
    and per organ, and slices/s. `pictures`: a folder that gets one PNG per volume (evenly spaced axial slices
    with the truth and the propagated labels overlaid)."""
    per_volume, pictured, seconds, slices = {}, {}, 0.0, 0
    for volume in volumes:
        if volume.labels is None:
            raise DataError(f"{volume.name}: no labels to score against (FLARE22 layout: labelsTr/<case>.nii.gz)")
        key = middle_key_slice(volume.labels, volume.name)
        started = time.perf_counter()
        predicted = propagate_volume(backend, volume.hu, {key: volume.labels[:, :, key]}, policy, size)
        seconds += time.perf_counter() - started
        slices += volume.hu.shape[2] - 1
        organs = score_volume(volume.labels, predicted, [key], volume.spacing)
        per_volume[volume.name] = {"slices": int(volume.hu.shape[2]), "key_slice": key, "organs": organs}
        if pictures is not None:
            pictured[volume.name] = str(volume_picture(volume, predicted, pictures / f"{volume.name}.png"))
    if not per_volume:
        raise DataError("no volumes to evaluate")
    measures = ("dice", "nsd_2mm", "copy_key_slice_dice", "copy_key_slice_nsd_2mm")
    pairs = [(organ, s) for v in per_volume.values() for organ, s in v["organs"].items()]
    by_organ = {organ: [s for o, s in pairs if o == organ] for organ in sorted({o for o, _ in pairs}, key=int)}
    report = {
        "mean": {m: float(np.mean([s[m] for _, s in pairs])) for m in measures},
        "per_organ": {o: {m: float(np.mean([s[m] for s in ss])) for m in measures} for o, ss in by_organ.items()},
        "volumes": per_volume,
        "slices_per_second": slices / seconds if seconds else None,
        "nsd_tolerance_mm": NSD_TOLERANCE_MM,
        "size": size,
        "policy": policy.model_dump(),
    }
    if pictures is not None:
        report["pictures"] = pictured
    return report
