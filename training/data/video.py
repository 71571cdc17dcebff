"""Video files decoded by PyAV (FFmpeg's libraries, bundled in the pinned `av` wheel): a sequence kept as one file
rather than a folder of frames.

A video frame's name is its zero-based index in display order, zero-padded to six digits: `frame_name(42)` is
"000042", and a label map of that frame is `<sequence>/000042.png`. This is the one place that naming is defined.
ffmpeg's image writer counts from 1: to extract frames that keep these names, run
`ffmpeg -i video.mp4 -start_number 0 frames/%06d.png`.

Every problem raises DataError naming the file: a file FFmpeg cannot open, one without a video stream, a frame
that fails to decode, a video without frames, frames that change size mid-stream.

Shapes: a frame (H, W, 3) uint8 RGB; a loaded video (T, H, W, 3).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from training.data.folders import DataError, resize_square

# Suffixes a folder's video files are found by; a single file given by path is tried whatever its suffix.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".wmv", ".ogv")
FRAME_NAME_DIGITS = 6


def frame_name(index: int) -> str:
    """The name of a video's frame `index` (0-based): what its label map is called, without `.png`."""
    return f"{index:0{FRAME_NAME_DIGITS}d}"


@dataclass(frozen=True)
class VideoInfo:
    """What probe_video found: the file, its number of frames and their size."""

    path: Path
    frames: int
    height: int
    width: int

    @property
    def frame_names(self) -> list[str]:
        return [frame_name(index) for index in range(self.frames)]


def _decoded(path: Path) -> Iterator[av.VideoFrame]:
    """The frames of the first video stream in display order, each checked against the first one's size."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected a video file")
    try:
        container = av.open(str(path))
    except av.FFmpegError as error:
        raise DataError(f"{path}: cannot open ({error}); expected a video file FFmpeg reads") from error
    with container:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream; expected a video file")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # decoding is nearly all the cost of reading a video: use every core
        count, size = 0, None
        try:
            for frame in container.decode(stream):
                if size is None:
                    size = (frame.width, frame.height)
                elif (frame.width, frame.height) != size:
                    raise DataError(
                        f"{path}: frame {frame_name(count)} is {frame.width}x{frame.height} but the first is "
                        f"{size[0]}x{size[1]}; expected one size"
                    )
                yield frame
                count += 1
        except av.FFmpegError as error:
            raise DataError(
                f"{path}: frame {frame_name(count)} cannot be decoded ({error}); expected a whole video file"
            ) from error
        if not count:
            raise DataError(f"{path}: a video without frames; expected at least one decodable frame")


def read_video(path: str | Path) -> Iterator[tuple[int, np.ndarray]]:
    """(index, frame) for every frame of the video at `path`, in display order; frames (H, W, 3) uint8 RGB."""
    for index, frame in enumerate(_decoded(Path(path))):
        yield index, frame.to_ndarray(format="rgb24")


def probe_video(path: str | Path) -> VideoInfo:
    """Count the frames of a video and read their size by decoding every frame without converting it to RGB: a
    container's own frame count is missing from some formats (Matroska) and only a claim in others, while the
    count has to be exact for label maps to name frames; a file that fails to decode is named here, early."""
    path = Path(path)
    count, height, width = 0, 0, 0
    for frame in _decoded(path):
        count, height, width = count + 1, frame.height, frame.width
    return VideoInfo(path, count, height, width)


def load_video(path: str | Path, size: int | None = None) -> np.ndarray:
    """Every frame of a video, (T, H, W, 3) uint8 RGB, or (T, size, size, 3) resized as load_frames resizes."""
    return np.stack([frame if size is None else resize_square(frame, size) for _, frame in read_video(path)])
