"""Binary classification metrics against hand computations and the pairwise definition of ROC AUC."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gradleak.federated.evaluation import binary_metrics, roc_auc


def test_roc_auc_by_hand_with_ties():
    scores = [0.1, 0.4, 0.35, 0.8, 0.4]
    labels = [0, 0, 1, 1, 1]
    # pairs (pos, neg): (0.35,0.1)=1 (0.35,0.4)=0 (0.8,0.1)=1 (0.8,0.4)=1 (0.4,0.1)=1 (0.4,0.4)=1/2
    assert roc_auc(scores, labels) == 4.5 / 6


def test_roc_auc_extremes_and_missing_class():
    assert roc_auc([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0
    assert roc_auc([0.9, 0.2, 0.1], [0, 0, 1]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=40))
def test_roc_auc_equals_the_pairwise_probability(pairs):
    scores = np.array([p[0] / 6 for p in pairs])  # few distinct values: many ties
    labels = np.array([p[1] for p in pairs])
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        assert math.isnan(roc_auc(scores, labels))
        return
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert abs(roc_auc(scores, labels) - pairwise) < 1e-12


def test_binary_metrics_by_hand():
    scores = [0.9, 0.6, 0.4, 0.2, 0.7, 0.1]
    labels = [1, 1, 1, 0, 0, 0]
    m = binary_metrics(scores, labels, threshold=0.5, loss=0.25)
    assert m["confusion"] == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    assert m["accuracy"] == 4 / 6
    assert m["sensitivity"] == 2 / 3 and m["specificity"] == 2 / 3
    assert m["precision"] == 2 / 3
    assert m["f1"] == 2 * 2 / (2 * 2 + 1 + 1)
    assert m["balanced_accuracy"] == 2 / 3
    assert m["loss"] == 0.25 and m["num_images"] == 6
    # the threshold is inclusive and moves the operating point
    assert binary_metrics(scores, labels, threshold=0.4)["confusion"] == {"tp": 3, "fp": 1, "tn": 2, "fn": 0}
