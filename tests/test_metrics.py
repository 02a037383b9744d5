import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from qlora_cls.metrics import compute_metrics
from qlora_cls.tasks import GLUE_TASKS

rng = np.random.default_rng(0)


def test_mrpc_accuracy_and_f1_match_sklearn():
    labels = rng.integers(0, 2, 101)
    logits = rng.normal(size=(101, 2))
    preds = logits.argmax(-1)
    m = compute_metrics(GLUE_TASKS["mrpc"], logits, labels)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert m["f1"] == pytest.approx(f1_score(labels, preds))


def test_cola_matthews():
    labels = rng.integers(0, 2, 80)
    logits = rng.normal(size=(80, 2))
    m = compute_metrics(GLUE_TASKS["cola"], logits, labels)
    assert m["matthews_correlation"] == pytest.approx(matthews_corrcoef(labels, logits.argmax(-1)))


def test_stsb_correlations():
    labels = rng.uniform(0, 5, 60)
    scores = labels + rng.normal(scale=1.0, size=60)
    m = compute_metrics(GLUE_TASKS["stsb"], scores[:, None], labels)
    assert m["pearson"] == pytest.approx(pearsonr(labels, scores)[0], abs=1e-5)
    assert m["spearmanr"] == pytest.approx(spearmanr(labels, scores)[0], abs=1e-5)


def test_hidden_labels_give_no_score_and_are_excluded():
    logits = rng.normal(size=(10, 2))
    assert compute_metrics(GLUE_TASKS["mrpc"], logits, np.full(10, -1)) == {}
    labels = np.array([1, 0, -1, -1, 1, 0, 1, 1, 0, 0])
    m = compute_metrics(GLUE_TASKS["sst2"], logits, labels)
    keep = labels != -1
    assert m["accuracy"] == pytest.approx(accuracy_score(labels[keep], logits.argmax(-1)[keep]))
