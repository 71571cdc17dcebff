import math

import numpy as np
import pytest

from training.metrics import SegmentationScores, confusion_matrix, dice_iou_from_confusion


def test_hand_computed_two_class_case():
    truth = np.array([[1, 1, 0, 0]])
    pred = np.array([[1, 0, 0, 0]])
    # class 1: tp=1 fp=0 fn=1 → Dice 2/3, IoU 1/2; class 0: tp=2 fp=1 fn=0 → Dice 4/5, IoU 2/3
    dice, iou = dice_iou_from_confusion(confusion_matrix(truth, pred, 2))
    assert dice == pytest.approx([4 / 5, 2 / 3])
    assert iou == pytest.approx([2 / 3, 1 / 2])


def test_class_absent_from_both_is_excluded_not_counted_as_one():
    scores = SegmentationScores(("void", "a", "b", "c"))
    truth = np.array([[1, 1, 2, 2]])
    pred = np.array([[1, 1, 2, 1]])
    scores.update(truth, pred)
    summary = scores.summary()
    assert summary["dice"]["c"] is None  # absent in truth and prediction
    # a: tp=2 fp=1 fn=0 → 0.8; b: tp=1 fp=0 fn=1 → 2/3; mean over a, b only (void skipped, c excluded)
    assert summary["mean_dice"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_false_positive_of_absent_class_scores_zero():
    scores = SegmentationScores(("void", "a", "b"))
    scores.update(np.array([[1, 1]]), np.array([[1, 2]]))
    summary = scores.summary()
    assert summary["dice"]["b"] == 0.0
    assert summary["mean_dice"] == pytest.approx((2 / 3 + 0.0) / 2)


def test_accumulates_over_batches_like_one_big_batch():
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 4, (2, 5, 8, 8))
    together = SegmentationScores(("void", "a", "b", "c"))
    together.update(truth, pred)
    split = SegmentationScores(("void", "a", "b", "c"))
    for t, p in zip(truth, pred, strict=True):
        split.update(t, p)
    assert together.summary() == split.summary()


def test_shape_mismatch_and_bad_labels_are_errors():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 9), 3)


def test_all_empty_mean_is_nan():
    scores = SegmentationScores(("void", "a"))
    scores.update(np.zeros((2, 2)), np.zeros((2, 2)))
    assert math.isnan(scores.summary()["mean_dice"])


def test_validation_metrics_add_vocal_folds_and_glottal_space_where_the_label_set_has_them():
    from training.metrics import validation_metrics, vocal_folds_glottal_dice

    truth = np.array([[1, 1, 3, 3], [2, 2, 2, 2]])
    pred = np.array([[1, 0, 3, 3], [2, 2, 2, 2]])
    scores = SegmentationScores(("void", "vocal_folds", "other_tissue", "glottal_space"))
    scores.update(truth, pred)
    summary = scores.summary()
    metrics = validation_metrics(summary)
    assert metrics["val_vf_gs_dice"] == pytest.approx((2 / 3 + 1.0) / 2)  # vocal folds 2·1/(2+1), glottal space 1
    assert metrics["val_mean_dice"] == summary["mean_dice"]
    assert vocal_folds_glottal_dice({"vocal_folds": None, "glottal_space": 0.5}) == 0.5
    organs = SegmentationScores(("background", "liver"))
    organs.update(np.array([[0, 1]]), np.array([[0, 1]]))
    assert "val_vf_gs_dice" not in validation_metrics(organs.summary())
