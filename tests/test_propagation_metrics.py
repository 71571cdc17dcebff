"""Hand-made cases for J, boundary F, Dice and NSD."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.data.folders import DataError
from training.propagate.scoring import middle_key_slice, score_volume
from training.propagation_metrics import (
    boundary,
    boundary_f,
    dice,
    j_and_f,
    normalized_surface_dice,
    recall_and_decay,
    region_j,
)


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_region_j_and_dice_by_hand():
    a = square(10, 0, 0, 4)  # 16 pixels
    b = square(10, 2, 0, 4)  # overlaps a in 8
    assert region_j(a, b) == pytest.approx(8 / 24)
    assert dice(a, b) == pytest.approx(16 / 32)
    assert region_j(a, a) == 1.0 and dice(a, a) == 1.0
    empty = np.zeros_like(a)
    assert region_j(empty, empty) == 1.0 and dice(empty, empty) == 1.0
    assert region_j(a, empty) == 0.0 and dice(empty, a) == 0.0


def test_boundary_is_the_inner_contour():
    edge = boundary(square(8, 2, 2, 4))
    assert edge.sum() == 12  # a 4×4 square's ring
    assert not edge[3:5, 3:5].any()


def test_boundary_f_tolerance():
    a = square(100, 20, 20, 40)
    shifted = square(100, 21, 20, 40)  # one pixel: within ceil(0.008 · 141) = 2 pixels
    assert boundary_f(a, shifted) == pytest.approx(1.0)
    far = square(100, 30, 20, 40)  # ten pixels: the top and bottom rows miss, the sides mostly match
    value = boundary_f(a, far)
    assert 0.3 < value < 0.9
    assert boundary_f(a, np.zeros_like(a)) == 0.0
    assert boundary_f(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_nsd_uses_spacing():
    truth = np.zeros((4, 20, 20), bool)
    truth[1:3, 5:15, 5:15] = True
    pred = np.roll(truth, 2, axis=2)  # 2 voxels along x
    # 1 mm voxels: a 2 mm shift is within a 2 mm tolerance everywhere, not within 1 mm.
    assert normalized_surface_dice(truth, pred, 2.0, (1, 1, 1)) == pytest.approx(1.0)
    assert normalized_surface_dice(truth, pred, 1.0, (1, 1, 1)) < 1.0
    # 0.5 mm voxels along x: the same shift is 1 mm.
    assert normalized_surface_dice(truth, pred, 1.0, (1, 1, 0.5)) == pytest.approx(1.0)
    assert normalized_surface_dice(truth, np.zeros_like(truth), 1.0) == 0.0
    with pytest.raises(ValueError, match="spacing"):
        normalized_surface_dice(truth, pred, 1.0, (1, 1))


def test_j_and_f_per_object_mean():
    truth = np.zeros((2, 50, 50), np.uint8)
    truth[:, 10:20, 10:20] = 1
    truth[:, 30:40, 30:40] = 3
    pred = truth.copy()
    pred[1][pred[1] == 3] = 0  # object 3 lost in the second frame
    scores = j_and_f(truth, pred, objects=[1, 3])
    assert scores["objects"][1]["J"] == 1.0 and scores["objects"][1]["F"] == 1.0
    assert scores["objects"][3]["J"] == pytest.approx(0.5) and scores["objects"][3]["F"] == pytest.approx(0.5)
    assert scores["J&F"] == pytest.approx(0.75)
    assert math.isnan(j_and_f(truth, pred, objects=[])["J&F"])


def test_recall_and_decay():
    # 8 frames in 4 spans of 2: the first span scores 1.0, the last 0.2, so decay is 0.8
    scores = [1.0, 1.0, 0.9, 0.6, 0.5, 0.4, 0.2, 0.2]
    recall, decay = recall_and_decay(scores)
    assert recall == pytest.approx(4 / 8)  # above 0.5, not at it
    assert decay == pytest.approx(0.8)
    assert recall_and_decay([0.7]) == (1.0, 0.0)
    assert all(math.isnan(v) for v in recall_and_decay([]))


def test_j_and_f_counts_frames_where_an_absent_object_is_painted():
    truth = np.zeros((4, 40, 40), np.uint8)
    truth[:2, 5:15, 5:15] = 2  # object 2 leaves the view after frame 1
    pred = truth.copy()
    pred[2, 30:35, 30:35] = 2  # painted onto something else in frame 2, correctly gone in frame 3
    scores = j_and_f(truth, pred, objects=[2])
    two = scores["objects"][2]
    assert two["absent_frames"] == 2 and two["false_positive_frames"] == 1
    assert two["J"] == pytest.approx(3 / 4)  # the painted frame scores 0, the empty one 1
    assert two["J_recall"] == pytest.approx(3 / 4)
    assert two["J_decay"] == pytest.approx(0.0)  # the first frame scores 1, and so does the last
    assert two["J&F"] == pytest.approx((two["J"] + two["F"]) / 2)
    assert scores["J_recall"] == two["J_recall"]
    assert math.isnan(j_and_f(truth, pred, objects=[])["J_recall"])


def test_j_and_f_leaves_void_pixels_out_as_davis_does():
    truth = np.zeros((2, 40, 40), np.uint8)  # 0 is the void class here
    truth[0, 10:20, 10:20] = 1
    pred = truth.copy()
    pred[0, 10:20, 20:30] = 1  # the object spills into void beside it: J 0.5 when every pixel counts
    pred[1, 0:5, 0:5] = 1  # painted onto void where the truth has none of it
    strict = j_and_f(truth, pred, objects=[1])["objects"][1]
    assert strict["J"] == pytest.approx((0.5 + 0.0) / 2) and strict["false_positive_frames"] == 1
    void = truth == 0
    excluded = j_and_f(truth, pred, objects=[1], void=void)["objects"][1]
    assert excluded["J"] == 1.0 and excluded["F"] == 1.0 and excluded["false_positive_frames"] == 0
    # a miss outside void still costs: half of the object predicted as void in frame 0 (J 0.5, then 1 in frame 1)
    missed = truth.copy()
    missed[0, 10:20, 15:20] = 0
    assert j_and_f(truth, missed, objects=[1], void=void)["objects"][1]["J"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="void shape"):
        j_and_f(truth, pred, objects=[1], void=void[:1])


def test_score_volume_beside_copying_the_key_slice():
    truth = np.zeros((12, 12, 8), np.uint8)
    truth[2:8, 2:8, 2:6] = 1  # in slices 2-5, the key slice 3 among them
    truth[8:11, 8:11, 6:8] = 13  # only after the key slice: copying it never finds this organ
    scores = score_volume(truth, truth.copy(), keys=[3], spacing=(2.0, 2.0, 4.0))
    assert set(scores) == {"1", "13"}
    assert scores["1"]["dice"] == scores["1"]["nsd_2mm"] == scores["13"]["dice"] == 1.0
    # the copy repeats slice 3's square in all 8 slices: 4 of them right, Dice 2·4 / (4 + 8)
    assert scores["1"]["copy_key_slice_dice"] == pytest.approx(8 / 12)
    assert scores["13"]["copy_key_slice_dice"] == 0.0 and scores["13"]["copy_key_slice_nsd_2mm"] == 0.0
    # two key slices: each slice copies its nearest (ties go to the first), so slice 7 now copies slice 7
    two = score_volume(truth, truth.copy(), keys=[3, 7], spacing=(2.0, 2.0, 4.0))
    assert two["13"]["copy_key_slice_dice"] == 1.0 and two["1"]["copy_key_slice_dice"] == pytest.approx(8 / 10)
    shifted = np.roll(truth, 1, axis=0)  # one voxel (2 mm) off in x: every surface voxel within the tolerance
    moved = score_volume(truth, shifted, keys=[3], spacing=(2.0, 2.0, 4.0))
    assert moved["1"]["nsd_2mm"] == 1.0 and moved["1"]["dice"] < 1.0
    assert score_volume(truth, shifted, keys=[3], spacing=(1.0, 1.0, 4.0))["1"]["nsd_2mm"] == 1.0
    assert score_volume(truth, np.roll(truth, 2, axis=0), keys=[3], spacing=(2.0, 2.0, 4.0))["1"]["nsd_2mm"] < 1.0


def test_middle_key_slice_is_the_middle_labelled_one_and_an_unlabelled_volume_is_named():
    labels = np.zeros((4, 4, 10), np.uint8)
    labels[1, 1, [2, 3, 7]] = 5
    assert middle_key_slice(labels, "case") == 3
    with pytest.raises(DataError, match="case_7: no labelled slice"):
        middle_key_slice(np.zeros((4, 4, 3), np.uint8), "case_7")
