import numpy as np
import pytest

from cifar_exp.evaluate import (
    classification_metrics, expected_calibration_error, macro_auc, softmax, superclass_metrics, topk_accuracy,
)

# Hand-worked 4-class case. labels and predictions:
LABELS = np.array([0, 0, 1, 1, 2, 2, 3, 3])
PREDS = np.array([0, 1, 1, 1, 2, 3, 3, 0])
# Per-class (P, R, F1): c0 (1/2, 1/2, 1/2), c1 (2/3, 1, 4/5), c2 (1, 1/2, 2/3), c3 (1/2, 1/2, 1/2).
# Scores 0.7 x one-hot(pred) + 0.1: each class's score is high exactly where it was predicted, so its
# one-vs-rest AUC counts (wins + ties/2) over the 2 x 6 pairs: c0 8/12, c1 11/12, c2 9/12, c3 8/12.
# (Exact ties need exactly equal scores, hence probabilities here rather than softmaxed logits.)


def _logits():
    return 3.0 * np.eye(4)[PREDS]


def test_four_class_hand_computed():
    m = classification_metrics(softmax(_logits()), LABELS)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3 + 1 / 2) / 4)
    assert m["weighted_f1"] == pytest.approx(m["macro_f1"])  # equal supports
    assert m["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 1 + 1 / 2) / 4)
    assert m["macro_recall"] == pytest.approx((1 / 2 + 1 + 1 / 2 + 1 / 2) / 4)
    assert macro_auc(0.7 * np.eye(4)[PREDS] + 0.1, LABELS) == pytest.approx((8 + 11 + 9 + 8) / 12 / 4)
    assert 0.7 < m["macro_auc"] < 0.8
    p_true = np.where(PREDS == LABELS, np.exp(3) / (np.exp(3) + 3), 1 / (np.exp(3) + 3))
    assert m["log_loss"] == pytest.approx(-np.log(p_true).mean())
    assert m["top5_accuracy"] == 1.0


def test_ece_constructed():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    # bin of 0.9: accuracy 1/2, confidence 0.9 -> 0.4; bin of 0.6: 1 vs 0.6 -> 0.4; each half the data.
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, np.array([0, 1])) == 0.0


def test_topk():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    labels = np.array([1, 0, 2])
    assert topk_accuracy(probs, labels, 1) == 0.0
    assert topk_accuracy(probs, labels, 2) == pytest.approx(1 / 3)
    assert topk_accuracy(probs, labels, 3) == 1.0


def test_superclass_metrics():
    f2c = [0, 0, 1, 1]  # classes 0,1 form superclass 0; 2,3 superclass 1
    m = superclass_metrics(PREDS, LABELS, f2c)
    # wrong: 0->1 (same superclass), 2->3 (same), 3->0 (different)
    assert m["within_superclass_error_share"] == pytest.approx(2 / 3)
    assert m["superclass_accuracy"] == pytest.approx(7 / 8)
    assert m["within_superclass_error_chance"] == pytest.approx(4 / 99)
