"""Vectorised gather of jagged lists (values + offsets) by row index."""

from __future__ import annotations

import numpy as np


def gather_jagged(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of the lists of `rows`, in that order: list r is values[offsets[r]:offsets[r+1]].

    One ``np.repeat`` maps every output position to its source position, so the cost is
    O(len(rows) + output size) in numpy, never a Python loop over rows.
    """
    rows = np.asarray(rows, dtype=np.int64)
    starts = np.asarray(offsets[rows], dtype=np.int64)
    lengths = np.asarray(offsets[rows + 1], dtype=np.int64) - starts
    ends = np.cumsum(lengths)
    # Output position p of row r reads starts[r] + (p - (ends[r] - lengths[r])).
    source = np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) + np.repeat(
        starts - (ends - lengths), lengths
    )
    return np.asarray(values[source]), lengths
