"""GLUE metrics on cases small enough to compute by hand (the expected values are worked out in the comments)."""
import math

import numpy as np
import pytest

from qlora_cls.metrics import compute_metrics
from qlora_cls.tasks import GLUE_TASKS


def logits_for(preds, num_labels=2):
    """Logits whose argmax is ``preds``."""
    out = np.zeros((len(preds), num_labels))
    out[np.arange(len(preds)), preds] = 1.0
    return out


def test_mrpc_accuracy_and_f1_by_hand():
    labels = np.array([1, 1, 0, 0, 1])
    preds = [1, 0, 0, 1, 1]  # right: 0, 2, 4 -> accuracy 3/5
    # positive class: TP = {0, 4}, FP = {3}, FN = {1}: precision 2/3, recall 2/3, F1 2/3
    m = compute_metrics(GLUE_TASKS["mrpc"], logits_for(preds), labels)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 / 3)


def test_f1_is_of_the_positive_class_not_the_mean_of_both():
    labels = np.array([1, 0, 0, 0])
    preds = [1, 1, 0, 0]  # TP 1, FP 1, FN 0: F1 = 2*1/(2*1+1+0) = 2/3 (class 0 alone would give 0.8)
    assert compute_metrics(GLUE_TASKS["mrpc"], logits_for(preds), labels)["f1"] == pytest.approx(2 / 3)


def test_cola_matthews_by_hand():
    labels = np.array([1, 1, 0, 0, 1, 0])
    preds = [1, 0, 0, 0, 1, 1]
    # TP 2 (0, 4), TN 2 (2, 3), FP 1 (5), FN 1 (1): (2*2 - 1*1) / sqrt(3*3*3*3) = 3/9
    m = compute_metrics(GLUE_TASKS["cola"], logits_for(preds), labels)
    assert m["matthews_correlation"] == pytest.approx(1 / 3)
    # all one class predicted: MCC is defined as 0
    assert compute_metrics(GLUE_TASKS["cola"], logits_for([1] * 6), labels)["matthews_correlation"] == 0


def test_stsb_correlations_by_hand():
    labels = np.array([1.0, 2.0, 3.0, 4.0])
    # scores x^2: same order (Spearman 1) but not linear. Deviations from the means (2.5, 7.5):
    # x: -1.5 -0.5 0.5 1.5, y: -6.5 -3.5 1.5 8.5; sum xy = 25, sum x^2 = 5, sum y^2 = 129
    scores = labels ** 2
    m = compute_metrics(GLUE_TASKS["stsb"], scores[:, None], labels)
    assert m["pearson"] == pytest.approx(25 / math.sqrt(5 * 129), abs=1e-6)
    assert m["spearmanr"] == pytest.approx(1.0, abs=1e-6)
    # swapping the middle two: Pearson = Spearman = 1 - 6*(1+1)/(4*15) = 0.8 (ranks equal the values)
    m = compute_metrics(GLUE_TASKS["stsb"], np.array([[1.0], [3.0], [2.0], [4.0]]), labels)
    assert (m["pearson"], m["spearmanr"]) == (pytest.approx(0.8, abs=1e-6), pytest.approx(0.8, abs=1e-6))


def test_mnli_accuracy_over_three_classes():
    labels = np.array([0, 1, 2, 2, 1, 0])
    preds = [0, 2, 2, 1, 1, 0]  # right: 0, 2, 4, 5
    assert compute_metrics(GLUE_TASKS["mnli"], logits_for(preds, 3), labels) == {"accuracy": pytest.approx(4 / 6)}


def test_hidden_labels_give_no_score_and_are_excluded():
    assert compute_metrics(GLUE_TASKS["mrpc"], logits_for([0, 1, 1]), np.full(3, -1)) == {}
    labels = np.array([1, 0, -1, -1, 1])
    preds = [1, 1, 0, 1, 1]  # visible 0, 1, 4: right, wrong, right -> 2/3 (counting the hidden ones: 2/5 or 3/5)
    m = compute_metrics(GLUE_TASKS["sst2"], logits_for(preds), labels)
    assert m == {"accuracy": pytest.approx(2 / 3)}
