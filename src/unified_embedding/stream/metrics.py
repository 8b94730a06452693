"""AUC and log loss over a stream too long to keep its predictions: fixed-size score histograms.

Progressive validation scores every example once, so the overall AUC is over the whole
stream. Keeping 50 M scores to sort at the end is what bounded memory rules out; a histogram
of scores per label over 2^16 equal bins is exact up to ties inside one bin (pairs whose
scores differ by under 1.5e-5 count as half-ordered), and takes 1 MiB whatever the length.
"""

from __future__ import annotations

import numpy as np
import torch

from unified_embedding.metrics import EPS, auc, logloss

#: histogram bins over [0, 1]; AUC error is at most the share of positive-negative pairs within one bin
BINS = 1 << 16


def window_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Exact AUC (None with one class) and log loss (None when empty) of one window."""
    if len(labels) == 0:
        return {"auc": None, "logloss": None}
    return {"auc": auc(labels, scores), "logloss": logloss(labels, scores)}


class StreamingMetrics:
    """Running AUC and log loss of every example added; state is two histograms and two sums."""

    def __init__(self) -> None:
        self.counts = np.zeros((2, BINS), dtype=np.int64)  # [label, bin]
        self.loss_sum = 0.0
        self.examples = 0

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        bins = np.minimum((scores * BINS).astype(np.int64), BINS - 1)
        positive = labels > 0.5
        self.counts[1] += np.bincount(bins[positive], minlength=BINS)
        self.counts[0] += np.bincount(bins[~positive], minlength=BINS)
        clipped = np.clip(scores.astype(np.float64), EPS, 1 - EPS)
        self.loss_sum -= float(np.where(positive, np.log(clipped), np.log1p(-clipped)).sum())
        self.examples += len(labels)

    def result(self) -> dict[str, float | int | None]:
        negatives, positives = self.counts[0], self.counts[1]
        n_neg, n_pos = int(negatives.sum()), int(positives.sum())
        auc = None
        if n_neg and n_pos:
            below = np.cumsum(negatives) - negatives  # negatives in lower bins
            auc = float((positives * (below + 0.5 * negatives)).sum() / (n_pos * n_neg))
        logloss = self.loss_sum / self.examples if self.examples else None
        return {"auc": auc, "logloss": logloss, "examples": self.examples}

    def state_dict(self) -> dict:
        return {"counts": torch.from_numpy(self.counts), "loss_sum": self.loss_sum, "examples": self.examples}

    def load_state_dict(self, state: dict) -> None:
        self.counts = state["counts"].numpy().copy()
        self.loss_sum = float(state["loss_sum"])
        self.examples = int(state["examples"])
