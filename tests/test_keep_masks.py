"""Pseudo-label sets with keep/ masks: the folder reader turns ignored pixels into IGNORE_INDEX, and the losses,
augmentation and scores of the training jobs skip them; a tiny adapt run trains and validates on such a set."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.classes import IGNORE_INDEX, NUM_CLASSES
from training.data.folders import DataError, folder_index, load_frames, write_folder_dataset
from training.data.simulator import simulate_frames
from training.data.sources import DataSpec, load_data
from training.losses import masked_cross_entropy
from training.metrics import SegmentationScores
from training.models.unet import Segmenter, UNetConfig
from training.propagate.losses import clip_loss
from training.propagate.pseudo_labels import PseudoLabelConfig, SequencePseudoLabels, write_pseudo_dataset
from training.propagate.sequences import labelled_sequences
from training.segment.config import AugmentConfig
from training.segment.predict import predict_labels, score
from training.segment.train import augment

SIZE = 32


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pseudo_set(root: Path, frames: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A pseudo-label set as `endoflow propagate pseudo-label` writes it: two sequences, a random keep mask per
    frame (about a third ignored). Returns the images, the labels in masks/ and the keep masks."""
    images, labels = simulate_frames(frames, seed=seed, style="real-like", size=SIZE)
    keep = np.random.default_rng(seed).random(labels.shape) > 0.3
    half = frames // 2
    sequences = {
        name: (images[part], [f"{i:03d}" for i in range(len(images[part]))], _result(labels[part], keep[part]))
        for name, part in (("s1", slice(0, half)), ("s2", slice(half, frames)))
    }
    write_pseudo_dataset(str(root), sequences, PseudoLabelConfig(min_kept=0))
    return images, labels, keep


def _result(labels: np.ndarray, keep: np.ndarray) -> SequencePseudoLabels:
    return SequencePseudoLabels(labels, keep, np.zeros(labels.shape, np.float32), np.ones(len(labels), bool))


# ------------------------------------------------------------------------------------------------- the folder reader


def test_keep_masks_make_ignored_labels_ignore_index(tmp_path: Path) -> None:
    images, labels, keep = pseudo_set(tmp_path / "pseudo")
    index = folder_index(str(tmp_path / "pseudo"))
    assert index.keep is not None and len(index.keep) == len(images)
    loaded_images, masks = load_frames(index)
    np.testing.assert_array_equal(loaded_images, images)
    np.testing.assert_array_equal(masks, np.where(keep, labels, IGNORE_INDEX))

    # Whatever label masks/ holds under an ignored pixel, the loaded label is the same.
    first = tmp_path / "pseudo" / "masks" / "s1" / "000.png"
    first.write_bytes(_png(np.where(keep[0], labels[0], (labels[0] + 1) % NUM_CLASSES).astype(np.uint8)))
    np.testing.assert_array_equal(load_frames(folder_index(str(tmp_path / "pseudo")))[1], masks)

    # Through a DataSpec, sharded and resized: nearest-neighbour resizing keeps exactly the values 0..6 and 255.
    spec = DataSpec(kind="folder", uri=str(tmp_path / "pseudo"), size=2 * SIZE)
    shard = load_data(spec, rank=1, world=2)[1]
    assert shard.shape == (3, 2 * SIZE, 2 * SIZE)
    np.testing.assert_array_equal(shard[:, ::2, ::2], masks[3:])
    assert set(np.unique(shard)) <= set(range(NUM_CLASSES)) | {IGNORE_INDEX}
    assert load_data(spec.model_copy(update={"labelled": False}))[1] is None


def test_keep_mask_errors_name_the_file(tmp_path: Path) -> None:
    pseudo_set(tmp_path / "missing")
    (tmp_path / "missing" / "keep" / "s2" / "001.png").unlink()
    with pytest.raises(DataError, match="no matching keep mask") as caught:
        folder_index(str(tmp_path / "missing"))
    assert str(tmp_path / "missing" / "keep" / "s2" / "001.png") in str(caught.value)

    pseudo_set(tmp_path / "size")
    small = tmp_path / "size" / "keep" / "s1" / "000.png"
    small.write_bytes(_png(np.full((SIZE // 2, SIZE), 255, np.uint8)))
    with pytest.raises(DataError, match=rf"keep mask is {SIZE}x{SIZE // 2} but its mask .* is {SIZE}x{SIZE}") as err:
        load_frames(folder_index(str(tmp_path / "size")))
    assert str(small) in str(err.value)

    pseudo_set(tmp_path / "values")
    odd = tmp_path / "values" / "keep" / "s1" / "002.png"
    odd.write_bytes(_png(np.full((SIZE, SIZE), 1, np.uint8)))
    with pytest.raises(DataError, match=r"keep mask holds values 1; expected 255 \(keep\) or 0") as err:
        load_frames(folder_index(str(tmp_path / "values")))
    assert str(odd) in str(err.value)

    # A masks/ value outside classes.json is still an error, keep/ or not.
    pseudo_set(tmp_path / "class")
    bad = tmp_path / "class" / "masks" / "s1" / "000.png"
    bad.write_bytes(_png(np.full((SIZE, SIZE), 9, np.uint8)))
    with pytest.raises(DataError, match=r"mask values 9 are not in .*classes.json") as err:
        load_frames(folder_index(str(tmp_path / "class")))
    assert str(bad) in str(err.value)


def test_a_folder_without_keep_is_read_as_before(tmp_path: Path) -> None:
    images, labels = simulate_frames(2, seed=1, style="sim", size=SIZE)
    write_folder_dataset(str(tmp_path / "plain"), images, labels)
    index = folder_index(str(tmp_path / "plain"))
    assert index.keep is None
    np.testing.assert_array_equal(load_frames(index)[1], labels)


def test_jf_evaluation_refuses_ignored_pixels_but_training_reads_them(tmp_path: Path) -> None:
    pseudo_set(tmp_path / "pseudo")
    spec = DataSpec(kind="folder", uri=str(tmp_path / "pseudo"), size=SIZE)
    assert [len(frames) for frames, _ in labelled_sequences(spec)] == [3, 3]
    with pytest.raises(DataError, match="keep/ masks .* J&F evaluation needs fully labelled"):
        labelled_sequences(spec, dense=True)


# -------------------------------------------------------------------------------------- losses, augmentation, score


def _ignored_labels(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (2, 8, 8), generator=generator)
    ignored = torch.rand(2, 8, 8, generator=generator) < 0.4
    return labels, ignored


def test_losses_skip_ignored_pixels() -> None:
    logits = torch.randn(2, NUM_CLASSES, 8, 8, requires_grad=True)
    labels, ignored = _ignored_labels(0)
    loss = masked_cross_entropy(logits, labels.masked_fill(ignored, IGNORE_INDEX))
    kept_only = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[~ignored], labels[~ignored])
    assert loss.item() == pytest.approx(kept_only.item(), rel=1e-5)
    loss.backward()
    per_pixel = logits.grad.abs().sum(1)  # whatever the logits there, ignored pixels move nothing
    assert (per_pixel[ignored] == 0).all() and (per_pixel[~ignored] > 0).all()
    assert masked_cross_entropy(logits, torch.full_like(labels, IGNORE_INDEX)).item() == 0.0  # not NaN

    # The propagation job's clip loss (cross-entropy + soft Dice over the objects) skips them too.
    clip_logits = torch.randn(1, 2, 3, 8, 8, requires_grad=True)
    clip_loss(clip_logits, (labels % 3).masked_fill(ignored, IGNORE_INDEX)[None]).backward()
    per_pixel = clip_logits.grad.abs().sum(2)[0]
    assert (per_pixel[ignored] == 0).all() and (per_pixel[~ignored] > 0).all()


def test_augment_keeps_ignore_index_intact() -> None:
    labels, ignored = _ignored_labels(1)
    labels = labels.masked_fill(ignored, IGNORE_INDEX)
    images = torch.rand(2, 3, 8, 8)
    cfg = AugmentConfig(hflip=True, brightness=0.5, contrast=0.5)
    _, augmented = augment(images, labels.clone(), cfg, torch.Generator().manual_seed(0))
    for before, after in zip(labels, augmented, strict=True):
        assert torch.equal(after, before) or torch.equal(after, before.flip(-1))  # moved, never changed


def test_score_leaves_ignored_pixels_out() -> None:
    torch.manual_seed(0)
    model = Segmenter(UNetConfig(base_width=4, depth=2, blocks_per_level=1))
    images, truth = simulate_frames(2, seed=3, style="sim", size=SIZE)
    predictions = predict_labels(model, images)
    ignored = np.random.default_rng(0).random(truth.shape) < 0.5
    summary, _ = score(model, images, np.where(ignored, IGNORE_INDEX, truth).astype(np.uint8))
    expected = SegmentationScores(tuple(summary["dice"]))
    expected.update(truth[~ignored], predictions[~ignored])
    assert json.dumps(summary, sort_keys=True) == json.dumps(expected.summary(), sort_keys=True)
    # Had those pixels counted (here: labelled as predicted), the scores would differ.
    agreeing = np.where(ignored, predictions, truth).astype(np.uint8)
    assert score(model, images, agreeing)[0]["pixel_accuracy"] > summary["pixel_accuracy"]


def test_overlays_show_ignored_pixels_in_grey() -> None:
    from training.visualize import IGNORE_COLOUR, colourise

    assert tuple(colourise(np.array([[IGNORE_INDEX]], np.uint8))[0, 0]) == IGNORE_COLOUR


# ----------------------------------------------------------------------------------------------- a tiny adapt run


@pytest.mark.slow
def test_adapt_job_trains_and_validates_on_a_pseudo_label_set(ray_session, tmp_path: Path) -> None:
    from training.adapt import train as adapt_train
    from training.adapt.config import AdaptJobConfig
    from training.config import load_config

    pseudo_set(tmp_path / "pseudo", frames=8)
    folder = json.dumps({"kind": "folder", "uri": str(tmp_path / "pseudo"), "size": SIZE})
    overrides = [
        "name=adapt-keep",
        f"runs_dir={tmp_path}",
        f"source={{kind: sim, count: 8, size: {SIZE}}}",
        f"target={{kind: sim, style: real-like, count: 8, size: {SIZE}, labelled: false}}",
        f"extra_labelled={folder}",  # labelled frames with ignored pixels join the source (and IRB's ranking)
        f"val={folder}",
        "model={base_width: 4, depth: 2, blocks_per_level: 1}",
        "compute={workers: 1, batch_size: 4, epochs: 2}",
        "teacher_epochs=1",
    ]
    result = adapt_train.run(load_config(AdaptJobConfig, None, overrides), f"sqlite:///{tmp_path / 'mlflow.db'}")
    metrics = result.metrics
    assert metrics["epoch"] == 2 and metrics["adapting"] == 1.0
    assert math.isfinite(metrics["loss_source"]) and math.isfinite(metrics["loss_pseudo"])
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0 and 0.0 <= metrics["irb_mean_iou"] <= 1.0
