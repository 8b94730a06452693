"""Train / validation / test row splits: seeded random, or by time (train on the past, test on the future)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np

from unified_embedding.data.dataset import CTRData


class Split(NamedTuple):
    """Row indices (int64) of each part; disjoint, and together every row once."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def split_indices(
    data: CTRData,
    *,
    method: Literal["random", "time"] = "random",
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> Split:
    """Split the rows of `data` into train / valid / test by `fractions`.

    ``random``: a permutation seeded by `seed`; each part is returned sorted, so reading it
    from memory-mapped columns walks the files forward. ``time``: rows in (stable) time
    order, the earliest fraction to train, the latest to test, each part in time order;
    this is the honest protocol for CTR, where a model always predicts the future.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")
    n = data.num_rows
    first, second = (int(cut) for cut in np.rint(np.cumsum(fractions)[:2] * n))
    if method == "random":
        order = np.random.default_rng(seed).permutation(n)
        return Split(*(np.sort(part) for part in (order[:first], order[first:second], order[second:])))
    if method == "time":
        if data.time is None:
            raise ValueError(f"dataset {data.name!r} has no time column; use method='random'")
        order = np.argsort(data.time, kind="stable").astype(np.int64)
        return Split(order[:first], order[first:second], order[second:])
    raise ValueError(f"method must be 'random' or 'time', got {method!r}")
