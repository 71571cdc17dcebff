"""training/data/video.py: a video file decodes to its frames in order, at their size, named by their index; a
file that is not a video, has no video stream or no frame raises DataError naming it."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from conftest import write_video

from training.data.folders import DataError
from training.data.video import frame_name, load_video, probe_video, read_video

FRAMES, SIZE, SQUARE, STEP = 8, 64, 16, 6
MATROSKA_CLUSTER = bytes.fromhex("1f43b675")  # the element ID of a cluster, which holds frames


def moving_square() -> np.ndarray:
    """(FRAMES, SIZE, SIZE, 3): an orange square moving STEP pixels right per frame over a vertical gradient."""
    frames = np.zeros((FRAMES, SIZE, SIZE, 3), np.uint8)
    frames[..., 2] = np.arange(SIZE, dtype=np.uint8)[:, None] * 3
    for t in range(FRAMES):
        frames[t, 8 : 8 + SQUARE, 4 + STEP * t : 4 + STEP * t + SQUARE] = (255, 128, 30)
    return frames


@pytest.fixture
def video(tmp_path: Path) -> tuple[Path, np.ndarray]:
    frames = moving_square()
    return write_video(tmp_path / "clip.mkv", frames), frames


def test_frames_decode_in_order_at_their_size_exactly(video) -> None:
    path, written = video
    decoded = list(read_video(path))
    assert [index for index, _ in decoded] == list(range(FRAMES))
    for index, frame in decoded:
        assert frame.shape == (SIZE, SIZE, 3) and frame.dtype == np.uint8
        np.testing.assert_array_equal(frame, written[index])  # lossless: the square's place gives the order


def test_probe_counts_the_frames_and_names_them_by_index(video) -> None:
    path, _ = video
    info = probe_video(path)
    assert (info.frames, info.height, info.width) == (FRAMES, SIZE, SIZE)
    assert info.frame_names == [f"{t:06d}" for t in range(FRAMES)] and frame_name(42) == "000042"
    assert load_video(path, size=32).shape == (FRAMES, 32, 32, 3)
    np.testing.assert_array_equal(load_video(path), video[1])


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def header_only(path: Path, video: Path) -> Path:
    data = video.read_bytes()
    # the header, the track and the start of the first cluster (which FFmpeg needs to open it), but no frame
    path.write_bytes(data[: data.index(MATROSKA_CLUSTER) + 8])
    return path


BAD_FILES = {
    "not a video": (lambda tmp, video: tmp / "notes.mp4", "cannot open"),
    "no video stream": (lambda tmp, video: audio_only(tmp / "voice.mkv"), "no video stream"),
    "no frame": (lambda tmp, video: header_only(tmp / "cut.mkv", video), "a video without frames"),
    "missing": (lambda tmp, video: tmp / "nowhere.mkv", "file not found"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_video_is_named(case, video, tmp_path) -> None:
    (tmp_path / "notes.mp4").write_text("not a video\n")
    make, message = BAD_FILES[case]
    bad = make(tmp_path, video[0])
    with pytest.raises(DataError, match=message) as raised:
        probe_video(bad)
    assert str(raised.value).startswith(f"{bad}: ")
