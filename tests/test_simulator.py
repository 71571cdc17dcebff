"""The simulator and its renderers: deterministic, shardable, complete, smooth in time, and two distinct looks."""

from __future__ import annotations

import numpy as np
import pytest

from training.data.classes import GLOTTAL_SPACE, NUM_CLASSES, OTHER_TISSUE, VOCAL_FOLDS
from training.data.render import STYLES, render
from training.data.scene import SceneConfig, label_map, sample_scene, sample_sequence
from training.data.simulator import simulate_frames, simulate_sequences

SIZE = 64  # small frames keep the suite fast; the geometry is resolution-independent


@pytest.mark.parametrize("style", STYLES)
def test_same_seed_gives_identical_bytes(style: str) -> None:
    first = simulate_frames(4, seed=11, style=style, size=SIZE)
    second = simulate_frames(4, seed=11, style=style, size=SIZE)
    assert first[0].tobytes() == second[0].tobytes()
    assert first[1].tobytes() == second[1].tobytes()


@pytest.mark.parametrize("style", STYLES)
def test_different_seeds_differ(style: str) -> None:
    images_a, masks_a = simulate_frames(3, seed=1, style=style, size=SIZE)
    images_b, masks_b = simulate_frames(3, seed=2, style=style, size=SIZE)
    assert not np.array_equal(images_a, images_b)
    assert not np.array_equal(masks_a, masks_b)


@pytest.mark.parametrize("style", STYLES)
def test_frame_depends_only_on_seed_and_index(style: str) -> None:
    batch_images, batch_masks = simulate_frames(6, seed=5, style=style, size=SIZE)
    alone_images, alone_masks = simulate_frames(1, seed=5, style=style, size=SIZE, start=4)
    np.testing.assert_array_equal(alone_images[0], batch_images[4])
    np.testing.assert_array_equal(alone_masks[0], batch_masks[4])
    # Shards of any split reassemble the batch.
    shards = [simulate_frames(n, seed=5, style=style, size=SIZE, start=s) for s, n in ((0, 2), (2, 3), (5, 1))]
    np.testing.assert_array_equal(np.concatenate([images for images, _ in shards]), batch_images)
    np.testing.assert_array_equal(np.concatenate([masks for _, masks in shards]), batch_masks)


def test_styles_share_the_geometry() -> None:
    _, sim_masks = simulate_frames(3, seed=9, style="sim", size=SIZE)
    _, real_masks = simulate_frames(3, seed=9, style="real-like", size=SIZE)
    np.testing.assert_array_equal(sim_masks, real_masks)


@pytest.mark.parametrize("style", STYLES)
def test_shapes_and_dtypes(style: str) -> None:
    images, masks = simulate_frames(2, seed=0, style=style, size=48)
    assert images.shape == (2, 48, 48, 3) and images.dtype == np.uint8
    assert masks.shape == (2, 48, 48) and masks.dtype == np.uint8
    sequences, sequence_masks = simulate_sequences(2, 3, seed=0, style=style, size=48)
    assert sequences.shape == (2, 3, 48, 48, 3) and sequences.dtype == np.uint8
    assert sequence_masks.shape == (2, 3, 48, 48) and sequence_masks.dtype == np.uint8


def test_labels_in_range_and_every_class_appears() -> None:
    _, masks = simulate_frames(80, seed=3, style="sim", size=SIZE)
    assert int(masks.max()) < NUM_CLASSES
    assert set(np.unique(masks).tolist()) == set(range(NUM_CLASSES))
    # The anatomy is in (nearly) every frame.
    for label in (VOCAL_FOLDS, OTHER_TISSUE, GLOTTAL_SPACE):
        assert (masks == label).any(axis=(1, 2)).mean() > 0.9


def test_sequences_are_smooth() -> None:
    _, masks = simulate_sequences(3, 10, seed=1, style="sim", size=SIZE)
    consecutive = [(masks[s, k] == masks[s, k + 1]).mean() for s in range(3) for k in range(9)]
    unrelated = [(masks[a, 0] == masks[b, 5]).mean() for a in range(3) for b in range(3) if a != b]
    assert min(consecutive) > 0.85
    assert np.mean(consecutive) > np.mean(unrelated) + 0.25


def test_sequence_keeps_patient_and_moves_the_rest() -> None:
    scenes = sample_sequence(np.random.default_rng(4), 12, SceneConfig(size=SIZE, tool_prob=1.0))
    assert len({scene.appearance_seed for scene in scenes}) == 1
    assert len({scene.larynx.length for scene in scenes}) == 1
    assert len({scene.larynx.opening for scene in scenes}) > 1
    assert len({scene.camera.zoom for scene in scenes}) > 1
    assert len({scene.tools[0].tip_x for scene in scenes}) > 1


def test_real_like_is_a_different_domain_with_classes_still_apart() -> None:
    sim, masks = simulate_frames(24, seed=6, style="sim", size=SIZE)
    real, _ = simulate_frames(24, seed=6, style="real-like", size=SIZE)

    def class_mean(images: np.ndarray, label: int) -> np.ndarray:
        return images[masks == label].astype(float).mean(axis=0)

    tissue_shift = np.abs(class_mean(sim, OTHER_TISSUE) - class_mean(real, OTHER_TISSUE)).sum()
    assert tissue_shift > 40  # a visible palette change, not a re-seeding
    for images in (sim, real):
        assert class_mean(images, GLOTTAL_SPACE).sum() < class_mean(images, OTHER_TISSUE).sum() - 60
        assert class_mean(images, VOCAL_FOLDS)[1] > class_mean(images, OTHER_TISSUE)[1]  # folds paler
    # Real-like carries texture and noise that sim lacks: more variation within a class.
    assert real[masks == OTHER_TISSUE].std(axis=0).mean() > sim[masks == OTHER_TISSUE].std(axis=0).mean()


def test_render_accepts_a_label_map_without_a_scene() -> None:
    labels = np.zeros((32, 32), np.uint8)
    labels[8:24, 8:24] = GLOTTAL_SPACE
    for style in STYLES:
        image = render(labels, None, style, np.random.default_rng(0))
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_unknown_style_is_rejected_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"'sim'.*'real-like'"):
        simulate_frames(1, seed=0, style="photoreal", size=SIZE)
    scene = sample_scene(np.random.default_rng(0), SceneConfig(size=SIZE))
    with pytest.raises(ValueError, match="photoreal"):
        render(label_map(scene), scene, "photoreal", np.random.default_rng(0))


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="tool_prob"):
        SceneConfig(tool_prob=1.5)
    with pytest.raises(ValueError, match="length"):
        sample_sequence(np.random.default_rng(0), 0)
