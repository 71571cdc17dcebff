"""Propagation over CT volumes in NIfTI files: picking the labelled cases of a FLARE22-layout root to evaluate, and
propagating one volume from its annotated key slices into a NIfTI label volume (`endoflow propagate run --input
CASE.nii.gz`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from training.data.folders import DataError
from training.data.volumes import Volume, case_index, read_case, write_nifti
from training.propagate.inference import MemoryPolicy, propagate_volume
from training.propagate.scoring import middle_key_slice, score_volume


def labelled_cases(root: Path, cases: list[str] | None) -> list[tuple[str, Path, Path]]:
    """The labelled cases of a FLARE22-layout root (all, or those named): (name, image, labels) each."""
    index = case_index(root)
    unknown = sorted(set(cases or []) - {name for name, _, _ in index})
    if unknown:
        raise DataError(f"{root}: no case(s) {unknown} in imagesTr/; it has {[name for name, _, _ in index]}")
    chosen = [(name, image, label) for name, image, label in index if not cases or name in cases]
    missing = [name for name, _, label in chosen if label is None]
    if missing:
        raise DataError(f"{root}: case(s) {missing} have no labelsTr/<case>.nii.gz to score against")
    return chosen


def read_cases(chosen: list[tuple[str, Path, Path]]) -> Iterator[Volume]:
    """The chosen cases read one at a time: CT scans are large."""
    return (read_case(image, label) for _, image, label in chosen)


def propagate_nifti(
    backend,
    image_path: Path,
    labels_path: Path | None,
    key_slices: str | None,
    out: Path,
    policy: MemoryPolicy,
    size: int,
) -> str:
    """A NIfTI label volume in `out`, propagated both ways through the slices from the annotated key slices
    (comma-separated indices; default the middle annotated one); scored per organ beside copying the key slice when
    the volume is labelled beyond its keys. What was written, in words."""
    if labels_path is None:
        raise ValueError("a volume needs --labels: a NIfTI holding the annotated key slices")
    volume = read_case(image_path, labels_path)
    annotated = [z for z in range(volume.hu.shape[2]) if volume.labels[:, :, z].any()]
    keys = [int(z) for z in key_slices.split(",")] if key_slices else [middle_key_slice(volume.labels, labels_path)]
    predicted = propagate_volume(backend, volume.hu, {z: volume.labels[:, :, z] for z in keys}, policy, size)
    path = write_nifti(out / f"{volume.name}.nii.gz", predicted, volume.spacing)
    scores = {}
    if len(annotated) > len(keys):  # a fully labelled volume: score every organ, beside copying the key slice
        scores = score_volume(volume.labels, predicted, keys, volume.spacing)
        (out / f"{volume.name}_scores.json").write_text(json.dumps({"key_slices": keys, "organs": scores}, indent=2))
    shown = " ".join(f"{k}:{v['dice']:.3f}" for k, v in scores.items())
    return f"{path} (key slices {keys}){' Dice ' + shown if scores else ''}"
