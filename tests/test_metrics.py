"""AUC and log loss: the one computation every run, window and shard is scored with."""

import math

import numpy as np
import pytest

from unified_embedding.metrics import EPS, auc, logloss, split_metrics
from unified_embedding.stream.metrics import window_metrics


def test_auc_counts_ordered_pairs() -> None:
    # pairs (positive, negative): (0.35, 0.1) and (0.8, both) ordered, (0.35, 0.4) not: 3 of 4
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)


def test_auc_is_none_with_one_class() -> None:
    assert auc(np.array([1, 1]), np.array([0.2, 0.9])) is None


def test_logloss_clips_a_confident_miss_to_a_finite_loss() -> None:
    assert logloss(np.array([1.0]), np.array([0.0])) == pytest.approx(-math.log(EPS))


def test_split_metrics_refuses_a_split_with_one_class() -> None:
    with pytest.raises(ValueError, match="both classes"):
        split_metrics(np.zeros(4), np.linspace(0.1, 0.9, 4))


def test_window_metrics_keep_log_loss_when_auc_is_undefined() -> None:
    window = window_metrics(np.array([0.5, 0.5]), np.array([0.0, 0.0]))
    assert window["auc"] is None
    assert window["logloss"] == pytest.approx(math.log(2))
