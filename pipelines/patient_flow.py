"""A new patient end to end (`endoflow patient adapt`): check every input → propagate the labelled frames and keep
the pseudo-labels the segmenter agrees with → fine-tune (Ray Train) → export ONNX + parity → register NAME@ALIAS
(a server watching that alias reloads it) → pictures in MLflow: the pseudo-labels (kept / ignored pixels) of every
sequence and the patient's frames before and after. The job itself is training/patient/."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from pipelines.local_ray import local_ray
from pipelines.segmenter_release import VariantResult, train_and_release
from training import tracking
from training.adapt import train as adapt_train
from training.data.sources import DataSpec
from training.patient.config import PatientJobConfig
from training.patient.train import PatientSet, finetune_config, prepare
from training.propagate.pictures import pseudo_label_picture
from training.propagate.pseudo_labels import OnnxReferenceSegmenter
from training.visualize import comparison_grid, save_png

OVERLAY_FRAMES = 6  # frames of the before/after picture, evenly spaced over all the patient's frames


@dataclass
class PatientResult:
    release: VariantResult  # run id, ONNX, parity, registered version, scores on eval_spec
    training_set: str
    frames_written: int
    pixels_kept: float
    seconds: dict[str, float]  # prepare (checks + propagation + writing), train (+ export), total
    pictures: list[Path] = field(default_factory=list)


def adapt_patient(
    cfg: PatientJobConfig,
    eval_spec: DataSpec | None = None,
    register_as: tuple[str, str | None] | None = None,
    fresh: bool = False,
    progress: Callable[[str], None] = print,
    address: str | None = None,
) -> PatientResult:
    """The whole command. Every input is checked before anything trains, and before Ray starts (DataError or
    ConfigError naming the file or the field); the fine-tuning runs on a local Ray, or the cluster at `address`
    ($RAY_ADDRESS), or the one already connected. `eval_spec`: labelled frames scored after training."""
    started = time.perf_counter()
    tracking_uri = tracking.use_tracking(cfg.tracking, cfg.runs_dir)  # models:/ refs resolve in this registry
    patient_set = prepare(cfg, tracking_uri, progress)
    prepared = time.perf_counter()
    out_dir = Path(cfg.runs_dir) / "patient" / cfg.name
    pictures = [
        pseudo_label_picture(
            sequence.frames if cfg.pseudo.enabled else sequence.frames[sorted(sequence.key_labels)],
            result.labels,
            result.keep,
            out_dir / "pictures" / f"pseudo-labels_{sequence.name.replace('/', '_')}.png",
        )
        for sequence, result in zip(patient_set.sequences, patient_set.results.values(), strict=True)
    ]
    progress(f"fine-tuning on {patient_set.frames_written} frames (sim share {cfg.sim_share:.0%}) …")
    job = finetune_config(cfg, patient_set.uri, patient_set.frames_written)
    with local_ray(num_cpus=None, address=address):
        release = train_and_release(job, adapt_train.run, eval_spec, out_dir, register_as, fresh)
    pictures.append(before_after_picture(patient_set, release.onnx_path, out_dir / "pictures" / "before-after.png"))

    client = MlflowClient(tracking_uri)
    client.log_dict(release.run_id, cfg.model_dump(mode="json"), "patient/config.json")
    client.log_dict(release.run_id, patient_set.summary, "patient/pseudo_labels.json")
    for picture in pictures:
        client.log_artifact(release.run_id, str(picture), "patient")
    pixels_kept = float(patient_set.summary["pixels_kept"])
    client.log_metric(release.run_id, "patient_frames_written", patient_set.frames_written)
    client.log_metric(release.run_id, "patient_pixels_kept", pixels_kept)
    finished = time.perf_counter()
    return PatientResult(
        release=release,
        training_set=patient_set.uri,
        frames_written=patient_set.frames_written,
        pixels_kept=pixels_kept,
        seconds={"prepare": prepared - started, "train": finished - prepared, "total": finished - started},
        pictures=pictures,
    )


def before_after_picture(patient_set: PatientSet, onnx_path: Path, path: Path) -> Path:
    """Evenly spaced frames of the patient: the given labels where a frame has them, the segmenter before (when
    one was given) and the fine-tuned one after."""
    frames = np.concatenate([s.frames for s in patient_set.sequences])
    given = np.concatenate(
        [
            np.stack([s.key_labels.get(i, np.full(s.frames.shape[1:3], 255, np.uint8)) for i in range(len(s.frames))])
            for s in patient_set.sequences
        ]
    )
    picks = np.linspace(0, len(frames) - 1, num=min(OVERLAY_FRAMES, len(frames))).astype(int)
    panels = {"labelled": given[picks]}
    if patient_set.reference is not None:
        panels["before"] = patient_set.reference(frames[picks]).argmax(1).astype(np.uint8)
    panels["after"] = OnnxReferenceSegmenter(onnx_path)(frames[picks]).argmax(1).astype(np.uint8)
    return save_png(comparison_grid(frames[picks], panels, rows=len(picks)), path)
