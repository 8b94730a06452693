"""AUC and log loss, computed one way wherever a split or a window is scored.

scikit-learn is imported on first use, not with the package: it took 0.8 s of `ue --help`'s
2.6 s (idle machine), a cost that `ue --help`, `ue methods` or `ue report` should not pay.
"""

from __future__ import annotations

import numpy as np

#: scores are clipped to [EPS, 1 - EPS] before the log loss, so one confident miss stays finite
EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC, or None when the labels hold one class only (AUC is undefined there)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def logloss(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import log_loss

    return float(log_loss(labels, np.clip(scores, EPS, 1 - EPS), labels=[0, 1]))


def split_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUC and log loss of an evaluated split, which must hold both classes to rank a model."""
    area = auc(labels, scores)
    if area is None:
        raise ValueError("AUC needs both classes in the evaluated split")
    return {"auc": area, "logloss": logloss(labels, scores)}
