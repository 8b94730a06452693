"""The unit a reader streams to the cache, and the interface every reader implements.

Readers never build a whole dataset in memory: they yield `Chunk`s of already-checked,
already-hashed rows, and the cache writer appends them column by column. A full Criteo
file (11 GB) therefore needs memory for one chunk, not for the file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from unified_embedding.data.badrows import BadRowPolicy
from unified_embedding.features import FeatureSet


@dataclass
class Chunk:
    """Consecutive valid rows: the same columns as `CTRData`, with list *lengths* instead of offsets.

    Lengths, not offsets, because offsets are global to the file; the cache writer turns
    lengths into offsets as it appends.
    """

    labels: np.ndarray  # float32 [n], 0.0 or 1.0
    dense: np.ndarray  # float32 [n, D]
    categorical: dict[str, np.ndarray]  # int64 [n] each
    multivalent: dict[str, tuple[np.ndarray, np.ndarray]]  # (int64 ids [nnz], int64 lengths [n])
    time: np.ndarray | None  # int64 [n]

    @property
    def num_rows(self) -> int:
        return len(self.labels)


class Reader(Protocol):
    """Turns a dataset's files into chunks; `features` and `has_time` are known before reading."""

    features: FeatureSet
    has_time: bool

    def read(self, paths: Sequence[Path], bad_rows: BadRowPolicy) -> Iterator[Chunk]:
        """Chunks of valid rows, in file order; bad rows go through `bad_rows`."""
        ...
