"""Readers of real and labelled image sets: vocalfolds and folder layouts, local and s3://, and every data error."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import storage
from training.data.classes import NUM_CLASSES, SURGICAL_TOOL, VOCAL_FOLDS, VOID
from training.data.folders import (
    DataError,
    folder_index,
    load_frames,
    load_image,
    vocalfolds_index,
    write_folder_dataset,
)

# ---------------------------------------------------------------------------------------------------------- helpers


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _frame(seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = rng.integers(0, NUM_CLASSES, (size, size), dtype=np.uint8)
    return image, mask


def _vocalfolds_tree(root: str, layout: dict[str, list[str]], size: int = 16) -> dict[str, np.ndarray]:
    """img/ and annot/ files for {"patient/seq": [frame names]}; returns the masks written, by image URI."""
    written = {}
    for seed, (name, frames) in enumerate(layout.items()):
        patient, sequence = name.split("/")
        for offset, frame in enumerate(frames):
            image, mask = _frame(100 * seed + offset, size)
            image_uri = storage.join(root, "img", patient, sequence, frame)
            storage.write_bytes(image_uri, _png(image))
            storage.write_bytes(storage.join(root, "annot", patient, sequence, frame), _png(mask))
            written[image_uri] = mask
    return written


LAYOUT = {"pA/s1": ["0001.png", "0002.png"], "pA/s2": ["0001.png"], "pB/s1": ["0005.png"]}


# ------------------------------------------------------------------------------------------------- vocalfolds layout


def test_real_vocalfolds_sequences(vocalfolds_root: Path) -> None:
    index = vocalfolds_index(str(vocalfolds_root), sequences=["seq1", "seq2"])
    assert len(index) > 0 and index.masks is not None
    assert set(index.sequences) == {"patient1/seq1", "patient1/seq2"}
    images, masks = load_frames(index.subset([0, len(index) - 1]), size=64)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert masks is not None and masks.shape == (2, 64, 64) and int(masks.max()) < NUM_CLASSES
    native, _ = load_frames(index.subset([0]))
    assert native.shape == (1, 512, 512, 3)
    unlabelled = vocalfolds_index(str(vocalfolds_root), patients=["patient1"], labelled=False)
    assert unlabelled.masks is None and len(unlabelled) >= len(index)


def test_real_vocalfolds_unknown_sequence_lists_what_exists(vocalfolds_root: Path) -> None:
    with pytest.raises(DataError, match=r"seq9.*patient1/seq1"):
        vocalfolds_index(str(vocalfolds_root), sequences=["seq9"])


def test_synthetic_vocalfolds_tree(tmp_path: Path) -> None:
    written = _vocalfolds_tree(str(tmp_path), LAYOUT)
    index = vocalfolds_index(str(tmp_path))
    assert len(index) == 4
    assert index.sequences == ("pA/s1", "pA/s1", "pA/s2", "pB/s1")
    _, masks = load_frames(index)
    assert masks is not None
    for position, image_uri in enumerate(index.images):
        np.testing.assert_array_equal(masks[position], written[image_uri])

    assert len(vocalfolds_index(str(tmp_path), sequences=["s1"])) == 3  # "s1" of every patient
    assert vocalfolds_index(str(tmp_path), sequences=["pB/s1"]).sequences == ("pB/s1",)
    assert len(vocalfolds_index(str(tmp_path), patients=["pA"], sequences=["s2"])) == 1
    with pytest.raises(DataError, match=r"pZ.*pA.*pB"):
        vocalfolds_index(str(tmp_path), patients=["pZ"])
    with pytest.raises(DataError, match=r"s7.*pA/s1"):
        vocalfolds_index(str(tmp_path), sequences=["s1", "s7"])


def test_vocalfolds_image_without_mask_is_named(tmp_path: Path) -> None:
    _vocalfolds_tree(str(tmp_path), LAYOUT)
    (tmp_path / "annot" / "pA" / "s2" / "0001.png").unlink()
    lonely = str(tmp_path / "img" / "pA" / "s2" / "0001.png")
    with pytest.raises(DataError, match="no matching mask") as caught:
        vocalfolds_index(str(tmp_path))
    assert lonely in str(caught.value)
    assert vocalfolds_index(str(tmp_path), labelled=False).masks is None  # unlabelled use is still fine


def test_missing_root_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="img"):
        vocalfolds_index(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="images"):
        folder_index(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------------------ data errors


def test_corrupt_png_is_named(tmp_path: Path) -> None:
    _vocalfolds_tree(str(tmp_path), LAYOUT)
    broken = tmp_path / "img" / "pA" / "s1" / "0002.png"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated mid-header
    index = vocalfolds_index(str(tmp_path))
    with pytest.raises(DataError, match="cannot decode") as caught:
        load_frames(index)
    assert str(broken) in str(caught.value)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(DataError, match="expected a PNG or JPEG") as caught:
        load_image(str(not_an_image))
    assert str(not_an_image) in str(caught.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    _vocalfolds_tree(str(tmp_path), LAYOUT)
    index = vocalfolds_index(str(tmp_path))
    gone = Path(index.masks[1])  # type: ignore[index]
    gone.unlink()
    with pytest.raises(DataError, match="not found") as caught:
        load_frames(index)
    assert str(gone) in str(caught.value)


def test_size_mismatch_is_named(tmp_path: Path) -> None:
    _vocalfolds_tree(str(tmp_path), LAYOUT)
    small_mask = tmp_path / "annot" / "pB" / "s1" / "0005.png"
    small_mask.write_bytes(_png(np.zeros((8, 8), np.uint8)))
    with pytest.raises(DataError, match="expected equal sizes") as caught:
        load_frames(vocalfolds_index(str(tmp_path)))
    assert str(small_mask) in str(caught.value)


def test_frames_of_different_sizes_need_a_size(tmp_path: Path) -> None:
    _vocalfolds_tree(str(tmp_path), {"pA/s1": ["0001.png"]}, size=16)
    _vocalfolds_tree(str(tmp_path), {"pA/s2": ["0001.png"]}, size=24)
    index = vocalfolds_index(str(tmp_path))
    with pytest.raises(DataError, match="size=") as caught:
        load_frames(index)
    assert "s2" in str(caught.value)
    images, masks = load_frames(index, size=20)
    assert images.shape == (2, 20, 20, 3) and masks is not None and masks.shape == (2, 20, 20)


def test_unknown_mask_value_is_named(tmp_path: Path) -> None:
    _vocalfolds_tree(str(tmp_path), LAYOUT)
    odd = tmp_path / "annot" / "pA" / "s1" / "0001.png"
    values = np.zeros((16, 16), np.uint8)
    values[0, 0] = 9
    odd.write_bytes(_png(values))
    with pytest.raises(DataError, match=r"mask values 9 are not in") as caught:
        load_frames(vocalfolds_index(str(tmp_path)))
    assert str(odd) in str(caught.value)


# ---------------------------------------------------------------------------------------------------- folder layout


def test_folder_round_trip(tmp_path: Path) -> None:
    frames = [_frame(seed, 24) for seed in range(5)]
    images = np.stack([image for image, _ in frames])
    masks = np.stack([mask for _, mask in frames])
    names = ["a/0", "a/1", "b/0", "b/1", "b/2"]
    write_folder_dataset(str(tmp_path / "set"), images, masks, names=names)
    index = folder_index(str(tmp_path / "set"))
    assert index.sequences == ("a", "a", "b", "b", "b")
    loaded_images, loaded_masks = load_frames(index)
    np.testing.assert_array_equal(loaded_images, images)
    np.testing.assert_array_equal(loaded_masks, masks)

    write_folder_dataset(str(tmp_path / "flat"), images[:2], None)
    unlabelled = folder_index(str(tmp_path / "flat"))
    assert unlabelled.masks is None and unlabelled.sequences == ("flat", "flat")
    assert load_frames(unlabelled)[1] is None


def _folder(root: Path, masks: dict[str, np.ndarray], class_map: str | None, map_name: str = "classes.json") -> None:
    for name, mask in masks.items():
        storage.write_bytes(str(root / "images" / f"{name}.jpg"), _jpeg(np.full((*mask.shape[:2], 3), 90, np.uint8)))
        storage.write_bytes(str(root / "masks" / f"{name}.png"), _png(mask))
    if class_map is not None:
        (root / map_name).write_text(class_map)


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_folder_grey_and_colour_class_maps(tmp_path: Path) -> None:
    grey = np.zeros((8, 8), np.uint8)
    grey[2:5, 2:5] = 255
    _folder(tmp_path / "grey", {"x": grey}, json.dumps({"0": "void", "255": "vocal_folds"}))
    _, masks = load_frames(folder_index(str(tmp_path / "grey")))
    assert masks is not None
    np.testing.assert_array_equal(masks[0], np.where(grey == 255, VOCAL_FOLDS, VOID))

    _folder(tmp_path / "yaml", {"x": grey}, "0: void\n255: vocal_folds\n", map_name="classes.yaml")
    np.testing.assert_array_equal(load_frames(folder_index(str(tmp_path / "yaml")))[1], masks)

    colour = np.zeros((8, 8, 3), np.uint8)
    colour[:3] = (255, 0, 0)
    _folder(tmp_path / "colour", {"x": colour}, json.dumps({"0,0,0": "void", "255,0,0": "surgical_tool"}))
    _, colour_masks = load_frames(folder_index(str(tmp_path / "colour")))
    assert colour_masks is not None
    np.testing.assert_array_equal(colour_masks[0], np.where(colour[..., 0] == 255, SURGICAL_TOOL, VOID))


def test_folder_errors_name_the_file(tmp_path: Path) -> None:
    grey = np.zeros((8, 8), np.uint8)
    _folder(tmp_path / "bad_name", {"x": grey}, json.dumps({"0": "vocal_chords"}))
    with pytest.raises(DataError, match=r"vocal_chords.*valid names: void, vocal_folds") as caught:
        folder_index(str(tmp_path / "bad_name"))
    assert str(tmp_path / "bad_name" / "classes.json") in str(caught.value)

    _folder(tmp_path / "no_map", {"x": grey}, None)
    with pytest.raises(DataError, match="classes.json"):
        folder_index(str(tmp_path / "no_map"))

    grey[0, 0] = 7
    _folder(tmp_path / "value", {"x": grey}, json.dumps({"0": "void"}))
    with pytest.raises(DataError, match=r"mask values 7 are not in .*classes.json; expected one of 0") as caught:
        load_frames(folder_index(str(tmp_path / "value")))
    assert str(tmp_path / "value" / "masks" / "x.png") in str(caught.value)

    _folder(tmp_path / "lonely", {"x": grey}, json.dumps({"0": "void", "7": "pathology"}))
    storage.write_bytes(str(tmp_path / "lonely" / "images" / "y.png"), _png(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(DataError, match="no matching mask") as caught:
        folder_index(str(tmp_path / "lonely"))
    assert str(tmp_path / "lonely" / "images" / "y.png") in str(caught.value)


# ------------------------------------------------------------------------------------------------------------- s3://


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """An in-process S3 stand-in on 127.0.0.1 and a free port; nothing leaves the machine."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    import boto3

    bucket = f"endoflow-{tmp_path.name.lower().replace('_', '-')}"[:63]
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


def test_s3_storage_basics(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/some/dir/file.txt"
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.exists(uri) and storage.exists(f"s3://{s3_bucket}/some/dir")
    assert not storage.exists(f"s3://{s3_bucket}/some/other")
    storage.write_bytes(f"s3://{s3_bucket}/some/b.PNG", b"x")
    assert storage.list_files(f"s3://{s3_bucket}/some", suffixes=(".png",)) == [f"s3://{s3_bucket}/some/b.PNG"]
    assert storage.list_files(f"s3://{s3_bucket}/some") == [f"s3://{s3_bucket}/some/b.PNG", uri]
    missing = f"s3://{s3_bucket}/some/missing.txt"
    with pytest.raises(FileNotFoundError, match=missing):
        storage.read_bytes(missing)
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        storage.read_bytes("s3://no-such-bucket/key")


def test_s3_folder_round_trip(s3_bucket: str) -> None:
    images, masks = (np.stack(parts) for parts in zip(*[_frame(seed, 20) for seed in range(3)], strict=True))
    root = f"s3://{s3_bucket}/translated/run1"
    write_folder_dataset(root, images, masks)
    index = folder_index(root)
    assert index.images[0] == f"{root}/images/000000.png" and index.sequences == ("run1",) * 3
    loaded_images, loaded_masks = load_frames(index)
    np.testing.assert_array_equal(loaded_images, images)
    np.testing.assert_array_equal(loaded_masks, masks)


def test_s3_vocalfolds_layout_and_errors(s3_bucket: str) -> None:
    root = f"s3://{s3_bucket}/vocalfolds"
    written = _vocalfolds_tree(root, LAYOUT)
    index = vocalfolds_index(root, sequences=["pA/s1"])
    assert index.images == (f"{root}/img/pA/s1/0001.png", f"{root}/img/pA/s1/0002.png")
    _, masks = load_frames(index)
    assert masks is not None
    np.testing.assert_array_equal(masks[1], written[index.images[1]])
    gone = f"{root}/annot/pA/s1/0002.png"
    storage.write_bytes(gone, b"not a png")
    with pytest.raises(DataError, match="cannot decode") as caught:
        load_frames(index)
    assert gone in str(caught.value)


def test_local_storage_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.bin")
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        storage.read_bytes(missing)
    assert not storage.exists(missing) and not storage.is_s3(missing) and storage.is_s3("s3://b/k")
