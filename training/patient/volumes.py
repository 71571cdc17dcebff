"""A patient's CT volumes (`data.layout: flare22`) as patient sequences: each volume of <frames>/imagesTr/ a sequence,
its axial slices the frames, windowed and resized as `propagate evaluate --layout flare22` sees them
(training/propagate/inference.py `volume_frames`), the labelled slices picked from <labels>/labelsTr/<case>.nii.gz
(training/patient/config.py says which and why).

Every volume is read and checked before anything is propagated or trained; each problem raises DataError naming the
file: no volume, an unreadable or non-3-D NIfTI, a volume without slices, a label volume of another shape than its
image, a key slice outside the volume or no annotated slice to start from, a label value outside the model's classes.

Shapes: frames (Z, size, size, 3) uint8, key labels (size, size) uint8 organ labels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.data.folders import DataError
from training.data.volumes import case_index, label_file, read_case
from training.patient.config import PatientDataConfig
from training.patient.inputs import PatientSequence
from training.propagate.inference import volume_frames
from training.propagate.scoring import middle_key_slice


def key_slices(labels_xyz: np.ndarray, wanted: str | list[int], path: Path) -> list[int]:
    """The labelled slices `wanted` picks (config: middle, annotated, or indices); DataError naming `path`."""
    slices = labels_xyz.shape[2]
    annotated = [z for z in range(slices) if labels_xyz[:, :, z].any()]
    if wanted == "middle":
        return [middle_key_slice(labels_xyz, path)]
    if wanted == "annotated":
        if not annotated:
            raise DataError(f"{path}: no labelled slice to start from")
        return annotated
    outside = [z for z in wanted if z >= slices]
    if outside:
        raise DataError(f"{path}: key slice(s) {outside} outside its {slices} slices; expected indices 0..{slices - 1}")
    return sorted(set(wanted))


def check_classes(labels_xyz: np.ndarray, keys: list[int], classes: tuple[str, ...], path: Path) -> None:
    """DataError naming `path`, the slice and the values when a key slice holds a label past `classes`."""
    for z in keys:
        unknown = np.unique(labels_xyz[:, :, z][labels_xyz[:, :, z] >= len(classes)])
        if unknown.size:
            raise DataError(
                f"{path}: slice {z} holds label values {', '.join(map(str, unknown.tolist()))}, not classes of the "
                f"model; expected 0..{len(classes) - 1} ({', '.join(classes)}; model.num_classes)"
            )


def read_volumes(
    data: PatientDataConfig, size: int, classes: tuple[str, ...], progress: Callable[[str], None] = print
) -> list[PatientSequence]:
    """Every selected volume with a label file, as a sequence with its key slices labelled (module docstring)."""
    if not data.frames or not data.labels:
        raise DataError("the patient's volumes are needed: set data.frames (a FLARE22-layout root)")
    root, labels_root = Path(data.frames), Path(data.labels)
    index = {case: image for case, image, _ in case_index(root)}
    wanted = data.sequences or list(index)
    unknown = [case for case in wanted if case not in index]
    if unknown:
        raise DataError(f"{root}: unknown volume(s) {unknown} in imagesTr/; it has {list(index)}")
    labelled = {case: label_file(labels_root, case) for case in wanted}
    for case in wanted:
        if labelled[case] is None:
            progress(f"{case}: no {labels_root / 'labelsTr' / case}.nii.gz, left out")
    chosen = [case for case in wanted if labelled[case] is not None]
    if not chosen:
        raise DataError(f"{labels_root / 'labelsTr'}: no label volume of {wanted}; expected <case>.nii.gz")
    out = []
    for case in chosen:  # one volume in memory at a time (CT scans are large), only its frames kept
        volume = read_case(index[case], labelled[case])  # DataError: unreadable, not 3-D, shapes differ
        if volume.hu.shape[2] == 0:
            raise DataError(f"{index[case]}: a volume without slices; expected (X, Y, Z) with Z ≥ 1")
        keys = key_slices(volume.labels, data.key_slices, labelled[case])
        check_classes(volume.labels, keys, classes, labelled[case])
        frames, key_labels = volume_frames(volume.hu, {z: volume.labels[:, :, z] for z in keys}, size)
        out.append(PatientSequence(case, frames, [f"{z:04d}" for z in range(len(frames))], key_labels))
        progress(f"{case}: {len(frames)} slices, labelled {keys}")
    return out
