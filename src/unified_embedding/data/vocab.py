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
    result = {}
    for name in data.features.sparse_names:
        if name in data.categorical:
            ids = data.categorical[name][rows]
        else:
            ids, _ = gather_jagged(*data.multivalent[name], rows)
        result[name] = np.unique(ids)
    return result
