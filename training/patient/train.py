"""The patient job: a patient's labelled frames (or CT slices) propagated through their sequences (or volumes),
pseudo-labels kept where the propagation and the current segmenter agree, or where propagation alone is confident
(training/propagate/pseudo_labels.py, as `propagate pseudo-label`), written as a folder set with keep/ masks, then
the segmenter fine-tuned on it by the adapt job (Ray Train), with no style transfer, IRB or self-training: the
patient's own frames are the labelled source, simulator frames join them at `sim_share`.

`prepare` reads and checks every input, then writes the training set; `finetune_config` is the adapt job that trains
on it; `run(cfg, tracking_uri)` does both, the entry point `endoflow sweep` (job: patient) calls per trial.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training import loop
from training.adapt import train as adapt_train
from training.adapt.config import AdaptJobConfig
from training.config import ConfigError
from training.data.sources import DataSpec
from training.patient.config import PatientJobConfig
from training.patient.inputs import PatientSequence, read_patient
from training.patient.volumes import read_volumes
from training.propagate.models import load_backend, locate_model
from training.propagate.pseudo_labels import (
    OnnxReferenceSegmenter,
    PseudoLabelConfig,
    SequencePseudoLabels,
    pseudo_label_sequence,
    reference_segmenter,
    write_pseudo_dataset,
)
from training.segment.train import TrainedSegmenter

COPY_SUFFIX = ".copy"  # sequence names of the repeated labelled frames in the written set


@dataclass
class PatientSet:
    uri: str  # the folder set (images/, masks/, keep/, classes.json, pseudo_labels.json)
    summary: dict  # write_pseudo_dataset's, per sequence
    sequences: list[PatientSequence]
    results: dict[str, SequencePseudoLabels]  # per sequence, all its frames (pseudo-labels on) or its labelled ones
    reference: OnnxReferenceSegmenter | None

    @property
    def frames_written(self) -> int:
        return int(self.summary["frames_written"])


def training_set_uri(cfg: PatientJobConfig) -> Path:
    return (Path(cfg.runs_dir) / "patient" / cfg.name / "train").resolve()


def labelled_only(sequence: PatientSequence) -> tuple[np.ndarray, list[str], SequencePseudoLabels]:
    """The labelled frames of a sequence alone, kept whole: what the set holds without propagation."""
    order = sorted(sequence.key_labels)
    labels = np.stack([sequence.key_labels[i] for i in order])
    result = SequencePseudoLabels(
        labels, np.ones(labels.shape, bool), np.zeros(labels.shape, np.float32), np.ones(len(order), bool)
    )
    return sequence.frames[order], [sequence.frame_names[i] for i in order], result


def check_init_checkpoint(cfg: PatientJobConfig) -> None:
    """The adapt job starts from a teacher checkpoint only when its architecture is cfg.model's, and silently
    trains from scratch otherwise: here a mismatch is an error, named, before anything runs."""
    if not cfg.init_checkpoint:
        return
    state_file = loop.checkpoint_state_file(cfg.init_checkpoint)
    saved = torch.load(state_file, map_location="cpu", weights_only=False)["config"]["model"]
    saved = loop.saved_model_section(saved, type(cfg.model))
    ours = cfg.model.model_dump(mode="json")
    differing = sorted(k for k in ours if k != "dropout" and saved.get(k) != ours[k])
    if differing:
        raise ConfigError(
            f"init_checkpoint {state_file}: its model differs from model in {differing} "
            f"({ {k: saved.get(k) for k in differing} }); set model to the checkpoint's to fine-tune it"
        )


def check_reference_classes(cfg: PatientJobConfig, reference: OnnxReferenceSegmenter, frame: np.ndarray) -> None:
    """The segmenter must answer with the model's classes (agreement compares labels; the pictures show them)."""
    classes = reference(frame).shape[1]
    if classes != cfg.model.num_classes:
        raise ConfigError(
            f"segmenter {cfg.segmenter}: {classes} classes, but model has {cfg.model.num_classes} "
            f"({cfg.model.label_set}); expected a segmenter of the same label set"
        )


def prepare(
    cfg: PatientJobConfig, tracking_uri: str | None = None, progress: Callable[[str], None] = print
) -> PatientSet:
    """Check every input (data, models, starting checkpoint), then write the training set; nothing is trained."""
    missing = cfg.missing_inputs()
    if missing:
        raise ConfigError(f"patient job: {', '.join(missing)} not set")
    if cfg.data.layout == "flare22":
        sequences = read_volumes(cfg.data, cfg.size, cfg.model.class_names, progress)
    else:
        sequences = read_patient(cfg.data, cfg.size, progress)
    check_init_checkpoint(cfg)
    backend = reference = None
    if cfg.segmenter:
        reference = reference_segmenter(cfg.segmenter, tracking_uri)
        check_reference_classes(cfg, reference, sequences[0].frames[:1])
    if cfg.pseudo.enabled:
        backend = load_backend(locate_model(cfg.propagation_model, tracking_uri), cfg.pseudo.memory)

    results: dict[str, SequencePseudoLabels] = {}
    written: dict[str, tuple[np.ndarray, list[str], SequencePseudoLabels]] = {}
    pseudo = PseudoLabelConfig(threshold=cfg.pseudo.threshold, min_kept=cfg.pseudo.min_kept, memory=cfg.pseudo.memory)
    for sequence in sequences:
        if cfg.pseudo.enabled:
            probs = reference(sequence.frames) if cfg.pseudo.agreement == "segmenter" else None
            result = pseudo_label_sequence(backend, sequence.frames, probs, pseudo, sequence.key_labels)
            written[sequence.name] = (sequence.frames, sequence.frame_names, result)
            progress(
                f"{sequence.name}: propagated from {len(sequence.key_labels)} labelled frame(s), "
                f"{int(result.frame_kept.sum())}/{len(sequence.frames)} frames kept, "
                f"{result.keep[result.frame_kept].mean():.1%} of their pixels"
            )
        else:
            written[sequence.name] = labelled_only(sequence)
            result = written[sequence.name][2]
        results[sequence.name] = result
        for copy in range(1, cfg.labelled_copies):
            written[f"{sequence.name}{COPY_SUFFIX}{copy}"] = labelled_only(sequence)
    out = training_set_uri(cfg)
    shutil.rmtree(out, ignore_errors=True)  # a set of an earlier run must not leave frames behind
    summary = write_pseudo_dataset(str(out), written, pseudo, cfg.model.class_names)
    summary["key_frames"] = "the labelled frames (key_every unused), each written labelled_copies times"
    progress(f"training set: {summary['frames_written']} frames → {out}")
    return PatientSet(str(out), summary, sequences, results, reference)


def finetune_config(cfg: PatientJobConfig, training_set: str, frames: int) -> AdaptJobConfig:
    """The adapt job that fine-tunes on the written set (`frames` of them) plus simulator frames at sim_share:
    the patient's frames are the labelled source (or, with simulator frames, its extra_labelled)."""
    patient = DataSpec(kind="folder", uri=training_set, size=cfg.size)
    sim_count = round(cfg.sim_share / (1 - cfg.sim_share) * frames)
    source, extra = patient, None
    if sim_count:
        source = DataSpec(kind="sim", style=cfg.sim_style, count=sim_count, seed=cfg.sim_seed, size=cfg.size)
        extra = patient
    return AdaptJobConfig(
        name=cfg.name,
        runs_dir=cfg.runs_dir,
        source=source,
        target=None,
        extra_labelled=extra,
        val=cfg.val,
        style={"method": "none"},
        irb={"enabled": False},
        pseudo={"enabled": False},
        teacher_checkpoint=cfg.init_checkpoint,
        teacher_epochs=0,
        augment=cfg.augment,
        model=cfg.model,
        compute=cfg.compute,
        tracking=cfg.tracking,
    )


def run(cfg: PatientJobConfig, tracking_uri: str) -> TrainedSegmenter:
    """Prepare the set, then fine-tune (Ray Train, on the connected cluster): one sweep trial."""
    patient_set = prepare(cfg, tracking_uri)
    return adapt_train.run(finetune_config(cfg, patient_set.uri, patient_set.frames_written), tracking_uri)
