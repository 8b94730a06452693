"""`CTRData`: a whole dataset as columns, the form every reader's output takes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unified_embedding.data.jagged import gather_jagged
from unified_embedding.features import FeatureKind, FeatureSet


@dataclass
class CTRData:
    """A dataset's rows as parallel columns (usually memory-mapped from the columnar cache).

    Value ids are int64 hashes of the raw cells (`unified_embedding.hashing.hash_bytes`), so
    no vocabulary is needed to read data; `features` leaves `cardinality` unset because it
    depends on the training split (see `vocabularies`). `time` orders rows for time splits:
    a unix time in seconds (MovieLens, Avazu) or the row's position (Criteo), None when the
    data has no time (Frappe).
    """

    name: str
    features: FeatureSet
    labels: np.ndarray  # float32 [N], exactly 0.0 or 1.0
    dense: np.ndarray  # float32 [N, D], columns in features.dense order
    categorical: dict[str, np.ndarray]  # int64 [N] value ids per categorical feature
    multivalent: dict[str, tuple[np.ndarray, np.ndarray]]  # (int64 values [nnz], int64 offsets [N+1])
    time: np.ndarray | None
    bad_rows_skipped: int
    sources: list[str]

    def head(self, rows: int) -> CTRData:
        """The first `rows` rows (all of them when there are fewer), as views of the columns."""
        n = min(int(rows), self.num_rows)
        return CTRData(
            name=self.name,
            features=self.features,
            labels=self.labels[:n],
            dense=self.dense[:n],
            categorical={name: ids[:n] for name, ids in self.categorical.items()},
            multivalent={name: (v[: int(o[n])], o[: n + 1]) for name, (v, o) in self.multivalent.items()},
            time=None if self.time is None else self.time[:n],
            bad_rows_skipped=self.bad_rows_skipped,
            sources=list(self.sources),
        )

    def take(self, rows: np.ndarray) -> CTRData:
        """The rows `rows`, in that order, as a new in-memory dataset (a time-ordered prefix, say)."""
        rows = np.asarray(rows, dtype=np.int64)
        multivalent = {}
        for name, (values, offsets) in self.multivalent.items():
            taken, lengths = gather_jagged(values, offsets, rows)
            multivalent[name] = (taken, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        return CTRData(
            name=self.name,
            features=self.features,
            labels=self.labels[rows],
            dense=self.dense[rows],
            categorical={name: ids[rows] for name, ids in self.categorical.items()},
            multivalent=multivalent,
            time=None if self.time is None else self.time[rows],
            bad_rows_skipped=self.bad_rows_skipped,
            sources=list(self.sources),
        )

    def __post_init__(self) -> None:
        # Cheap shape checks only (no pass over the data), so that a hand-built CTRData that
        # does not match its features fails here rather than deep inside a training loop.
        n = len(self.labels)
        kinds = {kind: [f.name for f in self.features if f.kind is kind] for kind in FeatureKind}
        if self.dense.shape != (n, len(kinds[FeatureKind.DENSE])):
            raise ValueError(f"dense has shape {self.dense.shape}, expected ({n}, {len(kinds[FeatureKind.DENSE])})")
        if sorted(self.categorical) != sorted(kinds[FeatureKind.CATEGORICAL]):
            raise ValueError(f"categorical columns {sorted(self.categorical)} do not match the categorical features")
        if sorted(self.multivalent) != sorted(kinds[FeatureKind.MULTIVALENT]):
            raise ValueError(f"multivalent columns {sorted(self.multivalent)} do not match the multivalent features")
        for name, ids in self.categorical.items():
            if ids.shape != (n,):
                raise ValueError(f"categorical column {name!r} has shape {ids.shape}, expected ({n},)")
        for name, (values, offsets) in self.multivalent.items():
            if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(values):
                raise ValueError(
                    f"multivalent column {name!r}: offsets must have {n + 1} entries from 0 to len(values)"
                )
        if self.time is not None and self.time.shape != (n,):
            raise ValueError(f"time has shape {self.time.shape}, expected ({n},)")

    @property
    def num_rows(self) -> int:
        return len(self.labels)
