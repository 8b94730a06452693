"""Collision diagnostics for one method at one budget on one dataset (`ue inspect`).

What a practitioner looks at before choosing a table size: for each feature, the share of
its training values whose vector shares a row with another value of the same feature
(`within`) and with a value of another feature (`across`, possible only when features share
one table), counted over distinct values and over training occurrences (a collision of a
frequent value costs more); `whole` is the share of values all of whose rows are shared
(with one probe this equals `any`, with k probes a value keeps a private row unless all k
collide). Then the load of the table's rows: how many distinct (feature, value) pairs read
each row (max, mean, mean over used rows) and the share of rows nobody reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from unified_embedding.bench.runs import make_config
from unified_embedding.bench.tables import require_row_table, slot_reads
from unified_embedding.data import CTRData
from unified_embedding.data.jagged import gather_jagged
from unified_embedding.embeddings import build_embedding
from unified_embedding.train import prepare


@dataclass
class FeatureCollisions:
    feature: str
    values: int  # distinct training values
    slots: int  # probes / chunks the feature reads per value
    within: float  # share of values sharing a row with another value of the same feature
    across: float  # share of values sharing a row with a value of another feature
    any: float  # share of values sharing some row with any other value
    whole: float  # share of values all of whose rows are shared
    within_weighted: float  # the same, weighted by training occurrences
    across_weighted: float
    any_weighted: float


@dataclass
class CollisionReport:
    dataset: str
    method: str
    budget: str
    budget_params: int
    num_parameters: int
    table_rows: int
    chunk_dim: int
    features: list[FeatureCollisions]
    load_max: int
    load_mean: float
    load_mean_used: float
    empty_rows: float  # share of rows no training value reads
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def format(self) -> str:
        """A plain-text table (what `ue inspect` prints)."""
        lines = [
            (
                f"{self.dataset} / {self.method} at budget {self.budget} ({self.budget_params:,} parameters): "
                f"{self.num_parameters:,} parameters, table of {self.table_rows:,} rows x {self.chunk_dim}"
            ),
            "",
            "collisions per feature: share of distinct training values (and of training occurrences) whose rows are shared",
        ]
        header = (
            f"{'feature':<18}{'values':>9}{'slots':>6}{'within':>9}{'across':>9}{'any':>9}{'whole':>9}"
            f"   {'within·occ':>10}{'across·occ':>11}{'any·occ':>9}"
        )
        lines += [header, "-" * len(header)]
        for f in self.features:
            lines.append(
                f"{f.feature:<18}{f.values:>9,}{f.slots:>6}{f.within:>9.3f}{f.across:>9.3f}{f.any:>9.3f}{f.whole:>9.3f}"
                f"   {f.within_weighted:>10.3f}{f.across_weighted:>11.3f}{f.any_weighted:>9.3f}"
            )
        lines += [
            "",
            (
                f"row load (distinct feature values per row): max {self.load_max:,}, mean {self.load_mean:.2f}, "
                f"mean over used rows {self.load_mean_used:.2f}, empty rows {self.empty_rows:.1%}"
            ),
        ]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _occurrences(data: CTRData, rows: np.ndarray, name: str, vocabulary: np.ndarray) -> np.ndarray:
    """How often each vocabulary value occurs in `rows` (aligned with the sorted vocabulary)."""
    if name in data.categorical:
        ids = np.asarray(data.categorical[name][rows])
    else:
        ids, _ = gather_jagged(*data.multivalent[name], rows)
    values, counts = np.unique(ids, return_counts=True)
    if not np.array_equal(values, vocabulary):
        raise AssertionError(f"vocabulary of {name!r} does not match its training values")
    return counts.astype(np.float64)


@torch.no_grad()
def inspect_collisions(
    dataset: str,
    method: str,
    budget: str | int,
    *,
    data_dir: str | None = None,
    method_options: dict[str, Any] | None = None,
    split: str = "random",
    split_seed: int = 0,
    on_bad_rows: str = "raise",
    max_rows: int | None = None,
) -> CollisionReport:
    """Collisions of `method` sized to `budget` over the training values of `dataset` (no training needed)."""
    config = make_config(
        dataset=dataset, method=method, budget=str(budget), data_dir=data_dir, split=split, split_seed=split_seed,
        on_bad_rows=on_bad_rows, method_options=dict(method_options or {}), max_rows=max_rows,
    )  # fmt: skip
    prepared = prepare(config)
    embedding = require_row_table(
        build_embedding(
            method, prepared.features, prepared.budget, vocabularies=prepared.vocabularies, **config.method_options
        )
    )
    reads = slot_reads(embedding, prepared.vocabularies)
    names = list(reads.features)
    sizes = [len(prepared.vocabularies[name]) for name in names]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    # Every (row, feature, value) read, once (a value whose probes meet in one row counts once).
    row_parts, value_parts = [], []
    for s, rows in enumerate(reads.rows):
        f = int(reads.slot_feature[s])
        row_parts.append(rows)
        value_parts.append(offsets[f] + np.arange(len(rows), dtype=np.int64))
    row_of = np.concatenate(row_parts)
    value_of = np.concatenate(value_parts)  # global value index
    total_values = int(offsets[-1])
    pairs = np.unique(row_of * total_values + value_of)
    rows_u, values_u = pairs // total_values, pairs % total_values
    features_u = np.searchsorted(offsets, values_u, side="right") - 1
    load = np.bincount(rows_u, minlength=reads.num_rows)  # distinct values per row
    key = rows_u * len(names) + features_u
    per_row_feature = np.bincount(key, minlength=reads.num_rows * len(names))
    same = per_row_feature[key]  # values of this value's feature in this row (itself included)
    other = load[rows_u] - same  # values of other features in this row
    within_any = np.zeros(total_values, dtype=bool)
    across_any = np.zeros(total_values, dtype=bool)
    np.logical_or.at(within_any, values_u, same >= 2)
    np.logical_or.at(across_any, values_u, other >= 1)
    shared_reads = np.zeros(total_values, dtype=np.int64)
    all_reads = np.zeros(total_values, dtype=np.int64)
    np.add.at(shared_reads, values_u, load[rows_u] >= 2)
    np.add.at(all_reads, values_u, 1)
    whole = shared_reads == all_reads
    features = []
    for f, name in enumerate(names):
        part = slice(offsets[f], offsets[f + 1])
        weight = _occurrences(prepared.data, prepared.split.train, name, np.asarray(prepared.vocabularies[name]))
        within, across = within_any[part], across_any[part]
        either = within | across

        def share(mask: np.ndarray, w: np.ndarray | None = None) -> float:
            if not len(mask):
                return 0.0
            return float(np.average(mask, weights=w)) if w is not None else float(mask.mean())

        features.append(
            FeatureCollisions(
                feature=name, values=sizes[f], slots=int((reads.slot_feature == f).sum()),
                within=share(within), across=share(across), any=share(either), whole=share(whole[part]),
                within_weighted=share(within, weight), across_weighted=share(across, weight),
                any_weighted=share(either, weight),
            )
        )  # fmt: skip
    used = load[load > 0]
    notes = []
    if method == "full":
        notes.append("full keeps one row per training value, so only unseen values (sharing the OOV row) collide")
    return CollisionReport(
        dataset=dataset, method=method, budget=str(budget), budget_params=prepared.budget,
        num_parameters=embedding.num_parameters(), table_rows=reads.num_rows, chunk_dim=reads.chunk_dim,
        features=features, load_max=int(load.max()) if len(load) else 0, load_mean=float(load.mean()),
        load_mean_used=float(used.mean()) if len(used) else 0.0, empty_rows=float((load == 0).mean()), notes=notes,
    )  # fmt: skip
