"""A new patient's sequences and labelled frames, read and checked whole before anything is trained.

Every problem raises DataError naming the file or folder: a sequence folder without frames, a label map without its
frame, a label map of another size than its frame, a value that is not a class index (0..6), an undecodable file.
Folders are read from local disk (a patient's video does not start on S3). Video files are not decoded: no pinned
dependency of this project reads them; extract the frames first (e.g. `ffmpeg -i video.mp4 frames/%05d.png`).

Shapes: frames (T, size, size, 3) uint8, label maps (size, size) uint8 class indices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.folders import IMAGE_SUFFIXES, DataError, FrameIndex, load_frames, load_image, load_mask
from training.patient.config import PatientDataConfig


@dataclass
class PatientSequence:
    name: str  # "seq1", or "patient1/seq1" in the vocalfolds layout
    frames: np.ndarray  # (T, size, size, 3) uint8, time order
    frame_names: list[str]  # file stems, time order
    key_labels: dict[int, np.ndarray] = field(default_factory=dict)  # frame index → (size, size) uint8 labels


def frame_root(data: PatientDataConfig) -> Path:
    """The folder the sequences (and, mirrored, the label maps) lie under."""
    root = Path(data.frames).expanduser()
    return root / "img" if data.layout == "vocalfolds" else root


def index_sequences(data: PatientDataConfig) -> dict[str, list[Path]]:
    """Sequence name → its frame files in time (file-name) order, every sequence of the layout; DataError naming
    the folder when one holds no frames, or when there is no sequence at all."""
    root = frame_root(data)
    if not root.is_dir():
        expected = "img/<patient>/<sequence>/<frame>.png" if data.layout == "vocalfolds" else "<sequence>/<frame>.png"
        raise DataError(f"{root}: not a folder; expected the patient's frames as {expected}")
    depth = 2 if data.layout == "vocalfolds" else 1
    folders = [root] if data.layout == "frames" else []
    level = [root]
    for _ in range(depth):
        level = sorted(child for folder in level for child in folder.iterdir() if child.is_dir())
        folders += level
    sequences: dict[str, list[Path]] = {}
    for folder in folders:
        frames = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        is_sequence = len(folder.relative_to(root).parts) == depth or (folder == root and frames)
        if not is_sequence:
            continue
        if not frames:
            raise DataError(f"{folder}: a sequence without frames; expected .png/.jpg frames in it")
        sequences[folder.name if folder == root else folder.relative_to(root).as_posix()] = frames
    if not sequences:
        raise DataError(f"{root}: no sequence of frames found")
    return sequences


def select_sequences(sequences: dict[str, list[Path]], wanted: list[str] | None, root: Path) -> list[str]:
    """The names `wanted` picks ("seq1" also picks "patient1/seq1"); all without it."""
    if wanted is None:
        return list(sequences)
    chosen = [name for name in sequences if any(w in (name, name.rsplit("/", 1)[-1]) for w in wanted)]
    unknown = [w for w in wanted if not any(w in (name, name.rsplit("/", 1)[-1]) for name in chosen)]
    if unknown:
        raise DataError(f"{root}: unknown sequence(s) {unknown}; available: {list(sequences)}")
    return chosen


def index_labels(data: PatientDataConfig, sequences: dict[str, list[Path]]) -> dict[str, dict[int, Path]]:
    """Sequence name → {frame index: its label map file}, for every label map under data.labels; DataError naming
    the label map whose frame does not exist, or the folder when it holds none."""
    labels_root = Path(data.labels).expanduser()
    files = sorted(p for p in labels_root.rglob("*") if p.is_file()) if labels_root.is_dir() else []
    if not files:
        raise DataError(f"{labels_root}: no label maps; expected <sequence>/<frame>.png mirroring the frames")
    root = frame_root(data)
    # Frames directly in the root are one sequence named after it; their label maps lie directly in labels/.
    single = root.name if root.name in sequences and sequences[root.name][0].parent == root else None
    found: dict[str, dict[int, Path]] = {}
    for file in files:
        relative = file.relative_to(labels_root)
        sequence = single if single and relative.parent == Path(".") else relative.parent.as_posix()
        stems = [frame.stem for frame in sequences.get(sequence, [])]
        if file.suffix.lower() != ".png" or file.stem not in stems:
            where = root / relative.parent / f"{file.stem}.png" if sequence != single else root / f"{file.stem}.png"
            raise DataError(f"{file}: a label map without its frame; expected a .png label map of the frame {where}")
        found.setdefault(sequence, {})[stems.index(file.stem)] = file
    return found


def read_patient(data: PatientDataConfig, size: int, progress: Callable[[str], None] = print) -> list[PatientSequence]:
    """Every selected sequence with a labelled frame, frames and labels decoded and resized; all of it checked
    first (module docstring). Sequences without a labelled frame are left out, said through `progress`."""
    if not data.frames or not data.labels:
        raise DataError("the patient's frames and labels are both needed: set data.frames and data.labels")
    root = frame_root(data)
    sequences = index_sequences(data)
    labels = index_labels(data, sequences)
    chosen = select_sequences(sequences, data.sequences, root)
    for name in chosen:
        if name not in labels:
            progress(f"{name}: no labelled frame, left out")
    chosen = [name for name in chosen if name in labels]
    if not chosen:
        raise DataError(f"{data.labels}: no label map belongs to the selected sequences {data.sequences}")
    decoded: dict[str, dict[int, np.ndarray]] = {}
    for name in chosen:  # every label map checked before any frame is decoded in bulk
        decoded[name] = {}
        for index, file in sorted(labels[name].items()):
            label_map = load_mask(str(file))  # DataError naming the file for a value outside 0..6
            frame = sequences[name][index]
            height, width = load_image(str(frame)).shape[:2]
            if label_map.shape != (height, width):
                raise DataError(
                    f"{file}: label map is {label_map.shape[1]}x{label_map.shape[0]} but its frame {frame} is "
                    f"{width}x{height}; expected equal sizes"
                )
            decoded[name][index] = np.asarray(Image.fromarray(label_map).resize((size, size), Image.Resampling.NEAREST))
    out = []
    for name in chosen:
        files = sequences[name]
        index = FrameIndex(images=tuple(map(str, files)), masks=None, sequences=(name,) * len(files))
        frames, _ = load_frames(index, size=size)
        out.append(PatientSequence(name, frames, [f.stem for f in files], decoded[name]))
        progress(f"{name}: {len(files)} frames, labelled {[files[i].name for i in sorted(decoded[name])]}")
    return out
