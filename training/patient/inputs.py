"""A new patient's sequences and labelled frames, read and checked whole before anything is trained.

A sequence is a folder of frames (frames and vocalfolds layouts) or one video file (video layout, decoded by
training/data/video.py, whose frames are named by their index: 000000, 000001, ...); past indexing, both are read
through one interface (SequenceFrames), so that every check below holds for both.

Every problem raises DataError naming the file or folder: a sequence folder without frames, a video that does not
decode or has no frame, a label map without its frame, a label map of another size than its frame, a value that is
not a class index (0..6), an undecodable file. Inputs are read from local disk (a patient's video does not start on
S3).

Shapes: frames (T, size, size, 3) uint8, label maps (size, size) uint8 class indices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.data.folders import (
    IMAGE_SUFFIXES,
    DataError,
    FrameIndex,
    load_frames,
    load_image,
    load_mask,
    resize_square,
)
from training.data.video import VIDEO_SUFFIXES, VideoInfo, load_video, probe_video
from training.patient.config import PatientDataConfig


@dataclass
class PatientSequence:
    name: str  # "seq1", or "patient1/seq1" in the vocalfolds layout
    frames: np.ndarray  # (T, size, size, 3) uint8, time order
    frame_names: list[str]  # file stems (video frames: their index, 000000...), time order
    key_labels: dict[int, np.ndarray] = field(default_factory=dict)  # frame index → (size, size) uint8 labels


@dataclass(frozen=True)
class FrameFiles:
    """A sequence stored as one image file per frame, in file-name order."""

    files: list[Path]

    @property
    def frame_names(self) -> list[str]:
        return [file.stem for file in self.files]

    def frame_size(self, index: int) -> tuple[int, int]:
        """(height, width) of frame `index`."""
        return load_image(str(self.files[index])).shape[:2]

    def describe(self, index: int) -> str:
        return str(self.files[index])

    def expected_frame(self, name: str) -> str:
        """What a label map called `name` should belong to, for the message when it belongs to none."""
        return f"the frame {self.files[0].parent / name}.png"

    def decode(self, size: int) -> np.ndarray:
        """Every frame, (T, size, size, 3) uint8."""
        index = FrameIndex(images=tuple(map(str, self.files)), masks=None, sequences=("",) * len(self.files))
        return load_frames(index, size=size)[0]


@dataclass(frozen=True)
class VideoFrames:
    """A sequence stored as one video file, already probed (decodable, its frames counted)."""

    video: VideoInfo

    @property
    def frame_names(self) -> list[str]:
        return self.video.frame_names

    def frame_size(self, index: int) -> tuple[int, int]:
        return self.video.height, self.video.width

    def describe(self, index: int) -> str:
        return f"{self.frame_names[index]} of {self.video.path}"

    def expected_frame(self, name: str) -> str:
        names = self.frame_names
        return f"a frame of {self.video.path}, named by its index ({names[0]}..{names[-1]})"

    def decode(self, size: int) -> np.ndarray:
        return load_video(self.video.path, size)


SequenceFrames = FrameFiles | VideoFrames


def frame_root(data: PatientDataConfig) -> Path:
    """The folder the sequences (and, mirrored, the label maps) lie under; for videos, a folder or one file."""
    root = Path(data.frames).expanduser()
    return root / "img" if data.layout == "vocalfolds" else root


def index_videos(root: Path) -> dict[str, SequenceFrames]:
    """Video stem → the video, for `root` a video file or a folder of them (found by suffix, not in subfolders);
    each probed, so that a video that does not decode or has no frame is named here."""
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        if not files:
            raise DataError(f"{root}: no video file; expected one video per sequence ({', '.join(VIDEO_SUFFIXES)})")
    else:
        raise DataError(f"{root}: not found; expected a video file or a folder of video files")
    by_stem: dict[str, Path] = {}
    for file in files:
        if file.stem in by_stem:  # both would be the sequence of that name
            raise DataError(f"{file}: same name as {by_stem[file.stem]}; expected one video per sequence name")
        by_stem[file.stem] = file
    return {stem: VideoFrames(probe_video(file)) for stem, file in by_stem.items()}


def index_sequences(data: PatientDataConfig) -> dict[str, SequenceFrames]:
    """Sequence name → its frames in time order, every sequence of the layout; DataError naming the folder (or
    video) when one holds no frames, or when there is no sequence at all."""
    root = frame_root(data)
    if data.layout == "video":
        return index_videos(root)
    videos_hint = "; video files need layout video (--layout video)" if _holds_videos(root) else ""
    if not root.is_dir():
        expected = "img/<patient>/<sequence>/<frame>.png" if data.layout == "vocalfolds" else "<sequence>/<frame>.png"
        raise DataError(f"{root}: not a folder; expected the patient's frames as {expected}{videos_hint}")
    depth = 2 if data.layout == "vocalfolds" else 1
    folders = [root] if data.layout == "frames" else []
    level = [root]
    for _ in range(depth):
        level = sorted(child for folder in level for child in folder.iterdir() if child.is_dir())
        folders += level
    sequences: dict[str, SequenceFrames] = {}
    for folder in folders:
        frames = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        is_sequence = len(folder.relative_to(root).parts) == depth or (folder == root and frames)
        if not is_sequence:
            continue
        if not frames:
            raise DataError(f"{folder}: a sequence without frames; expected .png/.jpg frames in it")
        sequences[folder.name if folder == root else folder.relative_to(root).as_posix()] = FrameFiles(frames)
    if not sequences:
        raise DataError(f"{root}: no sequence of frames found{videos_hint}")
    return sequences


def _holds_videos(path: Path) -> bool:
    """Whether `path` is a video file or a folder with one: frames asked for, a video given."""
    if path.is_dir():
        return any(p.suffix.lower() in VIDEO_SUFFIXES for p in path.iterdir())
    return path.suffix.lower() in VIDEO_SUFFIXES


def select_sequences(sequences: dict[str, SequenceFrames], wanted: list[str] | None, root: Path) -> list[str]:
    """The names `wanted` picks ("seq1" also picks "patient1/seq1"); all without it."""
    if wanted is None:
        return list(sequences)
    chosen = [name for name in sequences if any(w in (name, name.rsplit("/", 1)[-1]) for w in wanted)]
    unknown = [w for w in wanted if not any(w in (name, name.rsplit("/", 1)[-1]) for name in chosen)]
    if unknown:
        raise DataError(f"{root}: unknown sequence(s) {unknown}; available: {list(sequences)}")
    return chosen


def index_labels(data: PatientDataConfig, sequences: dict[str, SequenceFrames]) -> dict[str, dict[int, Path]]:
    """Sequence name → {frame index: its label map file}, for every label map under data.labels; DataError naming
    the label map whose frame does not exist, or the folder when it holds none."""
    labels_root = Path(data.labels).expanduser()
    files = sorted(p for p in labels_root.rglob("*") if p.is_file()) if labels_root.is_dir() else []
    if not files:
        raise DataError(f"{labels_root}: no label maps; expected <sequence>/<frame>.png mirroring the frames")
    root = frame_root(data)
    # Frames directly in the root are one sequence named after it; their label maps lie directly in labels/.
    alone = sequences.get(root.name)
    single = root.name if isinstance(alone, FrameFiles) and alone.files[0].parent == root else None
    found: dict[str, dict[int, Path]] = {}
    for file in files:
        relative = file.relative_to(labels_root)
        sequence = single if single and relative.parent == Path(".") else relative.parent.as_posix()
        names = sequences[sequence].frame_names if sequence in sequences else []
        if file.suffix.lower() != ".png" or file.stem not in names:
            if sequence in sequences:
                where = sequences[sequence].expected_frame(file.stem)
            elif data.layout == "video":
                where = f"a video's frame, as labels/<video name>/<frame index>.png; videos: {list(sequences)}"
            else:
                where = f"the frame {root / relative.parent / file.stem}.png"
            raise DataError(f"{file}: a label map without its frame; expected a .png label map of {where}")
        found.setdefault(sequence, {})[names.index(file.stem)] = file
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
        source = sequences[name]
        for index, file in sorted(labels[name].items()):
            label_map = load_mask(str(file))  # DataError naming the file for a value outside 0..6
            height, width = source.frame_size(index)
            if label_map.shape != (height, width):
                raise DataError(
                    f"{file}: label map is {label_map.shape[1]}x{label_map.shape[0]} but its frame "
                    f"({source.describe(index)}) is {width}x{height}; expected equal sizes"
                )
            decoded[name][index] = resize_square(label_map, size, labels=True)
    out = []
    for name in chosen:
        names = sequences[name].frame_names
        out.append(PatientSequence(name, sequences[name].decode(size), names, decoded[name]))
        progress(f"{name}: {len(names)} frames, labelled {[names[i] for i in sorted(decoded[name])]}")
    return out
