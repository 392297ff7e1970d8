"""How good a classifier is: ROC AUC, accuracy, sensitivity, specificity, F1 and loss for a binary task.

The positive class is label 1 (pneumonia in the chest X-ray data sets). ``scores`` are the model's
probability of the positive class; a prediction is positive when its score is >= ``threshold``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata

AUC_VARIANT = ("ROC AUC: rank-based (Mann-Whitney U / (n_pos * n_neg)) on P(class 1), tied scores get "
               "their average rank (counted as one half)")
THRESHOLD_VARIANT = "predicted positive (class 1, pneumonia) when P(class 1) >= threshold"


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive).

    Equals the probability that a random positive scores above a random negative, ties counting one
    half (the Mann-Whitney statistic). NaN when either class is absent.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def binary_metrics(scores, labels, threshold: float = 0.5, loss: float | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, sensitivity (recall of class 1), specificity (recall of class 0),
    precision, F1 (of class 1), ROC AUC and the confusion counts at ``threshold``."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    tn = int(np.sum(~pred & ~y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    sens = _ratio(tp, tp + fn)
    spec = _ratio(tn, tn + fp)
    prec = _ratio(tp, tp + fp)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    out = {
        "accuracy": _ratio(tp + tn, y.size),
        "balanced_accuracy": float((sens + spec) / 2),
        "roc_auc": roc_auc(s, y),
        "sensitivity": sens,
        "specificity": spec,
        "precision": prec,
        "f1": f1,
        "threshold": float(threshold),
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "num_images": int(y.size),
    }
    if loss is not None:
        out["loss"] = float(loss)
    return out


__all__ = ["AUC_VARIANT", "THRESHOLD_VARIANT", "binary_metrics", "roc_auc"]
