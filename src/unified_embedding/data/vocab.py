"""The distinct value ids of each sparse feature within a set of rows (usually the training split)."""

from __future__ import annotations

import numpy as np

from unified_embedding.data.dataset import CTRData
from unified_embedding.data.jagged import gather_jagged


def vocabularies(data: CTRData, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Sparse feature name -> sorted unique int64 value ids occurring in `rows` (every list item, for lists).

    Sizes give the per-feature cardinalities that full tables and the hashing trick are
    sized by; the ids let collisionless baselines map seen values to rows (unseen ones in
    validation and test are, correctly, unknown to them).
    """
    rows = np.asarray(rows, dtype=np.int64)
    return {name: np.unique(_ids(data, rows, name)) for name in data.features.sparse_names}


def ids_by_frequency(data: CTRData, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Sparse feature name -> its distinct ids in `rows`, most frequent first (ties: smaller id first).

    What frequency-aware methods (double hashing's hybrid) give dedicated rows to.
    """
    rows = np.asarray(rows, dtype=np.int64)
    result = {}
    for name in data.features.sparse_names:
        ids, counts = np.unique(_ids(data, rows, name), return_counts=True)
        result[name] = ids[np.argsort(-counts, kind="stable")]
    return result


def _ids(data: CTRData, rows: np.ndarray, name: str) -> np.ndarray:
    if name in data.categorical:
        return data.categorical[name][rows]
    return gather_jagged(*data.multivalent[name], rows)[0]
