"""Double hashing, and its frequency-based hybrid (Zhang et al., RecSys 2020).

Value v of feature f reads one row from each of two hashed tables, under two independent
hashes, and the rows are summed (`combine="sum"`, the default) or concatenated (each table
then holds half the width, `combine="concat"`). Two values share a vector only if they
collide in both tables, so two tables of M/2 rows behave, for collisions, much like one
table of about (M/2)^2 / 2 rows at the cost of M rows.

The paper's hybrid (`frequency=True`) gives the most frequent values a dedicated,
collision-free row each and double-hashes the long tail. Which values are frequent is a
training-split statistic the vocabularies do not carry (a vocabulary lists the ids seen,
sorted by id, not by count), so the hybrid takes it explicitly: `frequent_ids` maps a
feature to its ids, most frequent first, and `frequent_fraction` of the budget buys
dedicated rows from the top of those lists (split across features by cardinality).
The trainer computes them from the training split (`uses_id_frequencies`), so
`ue train --method double_hash --method-option frequency=true` runs the hybrid; from
Python, `frequency=True` without `frequent_ids` is a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Self

import numpy as np
import torch
from torch import Tensor

from unified_embedding.embeddings.base import BudgetError, Vocabularies, as_tensor, register
from unified_embedding.embeddings.hash_family import (
    DEFAULT_DIM,
    Allocation,
    Expansion,
    HashSharingEmbedding,
    Layout,
    allocation_shares,
    common_chunk,
    family_salt,
    feature_widths,
    region_sizes,
    split_budget,
)
from unified_embedding.features import FeatureSet
from unified_embedding.hashing import salted_keys

Combine = Literal["sum", "concat"]
FrequentIds = Mapping[str, np.ndarray | Tensor | Sequence[int]]  # ids of a feature, most frequent first

DEFAULT_FREQUENT_FRACTION = 0.5


@register
class DoubleHashEmbedding(HashSharingEmbedding):
    """Two hashed tables per feature (or two shared by all features); a value's rows are combined.

    `rows` counts the rows of both tables together (an int for every feature or for the
    shared pair, or a mapping of feature to rows); the first table gets the odd row. Rows
    are `dim` wide with `combine="sum"` and `dim / 2` wide with `combine="concat"`.
    `frequent_ids` (optional) maps features to the ids that get a dedicated full-width row.
    """

    uses_id_frequencies = True

    name = "double_hash"
    description = (
        "double hashing: each value sums (or concatenates) rows of two hashed tables; optional frequency hybrid"
    )
    paper = (
        "Zhang et al., Model Size Reduction Using Frequency Based Double Hashing for Recommender Systems, RecSys 2020"
    )

    def __init__(
        self,
        features: FeatureSet,
        rows: int | Mapping[str, int],
        dim: int = DEFAULT_DIM,
        *,
        shared: bool = False,
        combine: Combine = "sum",
        frequent_ids: FrequentIds | None = None,
        **options,
    ) -> None:
        widths = feature_widths(features, dim)
        chunk, halves = _chunking(widths, combine)
        sizes = region_sizes(features, rows, shared, "rows")
        if any(size < 2 for size in sizes.values()):
            raise ValueError(f"double hashing needs at least two rows (one per table) for every feature, got {sizes}")
        layout = Layout(features, 2 if combine == "sum" else 1)
        tables = {name: (size - size // 2, size // 2) for name, size in sizes.items()}
        if shared:
            first = next(iter(tables.values()))
            shared_bases = (layout.region(first[0]), layout.region(first[1]))
        for name, width in widths.items():
            parts = width // chunk // halves  # chunks of one table row
            for i in range(2):
                size = tables[name][i]
                base = shared_bases[i] if shared else layout.region(size * parts)
                summand = i if combine == "sum" else 0
                layout.read_rows(summand, name, f"double_hash/{i}", base, size, parts, shared=shared)
        frequent = _frequent_rows(features, layout, widths, chunk, frequent_ids)
        super().__init__(features, layout, chunk, **options)
        self.shared, self.combine, self.rows = shared, combine, sizes
        self.frequency = frequent is not None
        self.frequent_counts: dict[str, int] = {}
        if frequent is not None:
            self.frequent_counts, keys, rows_of_keys = frequent
            # Persistent: a checkpoint carries which ids own dedicated rows.
            self.register_buffer("frequent_keys", keys)
            self.register_buffer("frequent_rows", rows_of_keys)
            salts = [_frequent_salt(name) for name in features.sparse_names]
            self.register_buffer("frequent_salt", torch.tensor(salts, dtype=torch.int64), persistent=False)

    def rows_and_weights(self, x: Expansion) -> tuple[Tensor, Tensor | None]:
        rows, _ = super().rows_and_weights(x)
        if not self.frequency or self.frequent_keys.numel() == 0:
            return rows, None
        keys = salted_keys(x.values, self.frequent_salt[x.value_feature])
        position = torch.searchsorted(self.frequent_keys, keys).clamp_(max=self.frequent_keys.numel() - 1)
        found = (self.frequent_keys[position] == keys)[x.occurrence]
        dedicated = self.frequent_rows[position][x.occurrence] + self.lookup_chunk[x.lookup_of]
        rows = torch.where(found, dedicated, rows)
        # A frequent value's vector is its dedicated row alone: the second summand reads it with weight 0.
        second = found & (self.lookup_summand[x.lookup_of] > 0)
        return rows, (~second).to(self.weight.dtype)

    # ---------------------------------------------------------------- budget

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        dim: int = DEFAULT_DIM,
        shared: bool = False,
        combine: Combine = "sum",
        allocation: Allocation = "proportional",
        frequency: bool = False,
        frequent_ids: FrequentIds | None = None,
        frequent_fraction: float = DEFAULT_FREQUENT_FRACTION,
        **options,
    ) -> Self:
        """Two tables of (nearly) equal rows per feature, split by cardinality (or equally), or one shared pair.

        With `frequency=True`, up to `frequent_fraction` of the budget first buys dedicated
        rows for the top of each feature's `frequent_ids` (ids most frequent first); the rest
        goes to the hashed tables. `frequent_ids` is ignored when `frequency` is False.
        """
        widths = feature_widths(features, dim)
        chunk, halves = _chunking(widths, combine)
        names = features.sparse_names
        units = {name: widths[name] // halves for name in names}  # parameters of one hashed row
        hashed_minimum = 2 * (chunk if shared else sum(units.values()))
        if budget < hashed_minimum:
            raise BudgetError(f"{cls.name} needs at least {hashed_minimum:,} parameters (a row in each of its two "
                              f"tables{'' if shared else ' for every feature'}); budget {budget:,}")  # fmt: skip
        dedicated = None
        if frequency:
            dedicated = _dedicated_ids(
                features, budget - hashed_minimum, frequent_ids, frequent_fraction, widths, allocation, budget
            )
        left = budget - sum(len(ids) * widths[name] for name, ids in (dedicated or {}).items())
        if shared:
            rows: int | dict[str, int] = left // chunk
        else:
            shares = allocation_shares(features, allocation, cls.name)
            rows = split_budget(left, shares, units, dict.fromkeys(names, 2), method=cls.name)
        return cls(features, rows, dim, shared=shared, combine=combine, frequent_ids=dedicated, **options)

    def extra_repr(self) -> str:
        hybrid = f", frequent={sum(self.frequent_counts.values())}" if self.frequency else ""
        return f"{super().extra_repr()}, combine={self.combine}, shared={self.shared}{hybrid}"


def _chunking(widths: dict[str, int], combine: Combine) -> tuple[int, int]:
    """(chunk width, tables per output vector): concatenation splits every vector in two halves."""
    chunk = common_chunk(widths)
    if combine == "sum":
        return chunk, 1
    if combine != "concat":
        raise ValueError(f"combine must be 'sum' or 'concat', got {combine!r}")
    odd = [name for name, width in widths.items() if width % 2]
    if odd:
        raise ValueError(f"combine='concat' gives each table half of a vector; features {odd} have odd widths")
    if chunk % 2:
        raise ValueError(f"combine='concat' needs widths whose common divisor is even, got {chunk}")
    return chunk // 2, 2


def _frequent_rows(
    features: FeatureSet, layout: Layout, widths: dict[str, int], chunk: int, frequent_ids: FrequentIds | None
) -> tuple[dict[str, int], Tensor, Tensor] | None:
    """Dedicated full-width rows, after the hashed tables, for the given ids of each feature.

    Returns the ids per feature, and the sorted salted keys of all of them with the first
    row of each (chunk j of its vector is that row + j).
    """
    if frequent_ids is None:
        return None
    unknown = sorted(set(frequent_ids) - set(features.sparse_names))
    if unknown:
        raise ValueError(f"frequent_ids given for unknown features {unknown}")
    counts, keys, rows = {}, [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)]
    for name in features.sparse_names:
        ids = unique_in_order(frequent_ids.get(name, ()))
        counts[name] = ids.numel()
        if ids.numel():
            parts = widths[name] // chunk
            base = layout.region(ids.numel() * parts)
            keys.append(salted_keys(ids, torch.full_like(ids, _frequent_salt(name))))
            rows.append(base + parts * torch.arange(ids.numel()))
    keys, rows = torch.cat(keys), torch.cat(rows)
    order = torch.argsort(keys)
    keys, rows = keys[order], rows[order]
    if keys.numel() > 1 and bool((keys[1:] == keys[:-1]).any()):
        raise ValueError("two frequent ids share a 64-bit key; rename a feature to change its salt")
    return counts, keys, rows


def _frequent_salt(feature: str) -> int:
    return family_salt(feature, "double_hash", "frequent")


def unique_in_order(ids) -> Tensor:
    """int64 ids without repeats, each at its first position (frequency rank is kept)."""
    ids = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else ids
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    _, first = np.unique(ids, return_index=True)
    return as_tensor(ids[np.sort(first)])


def _dedicated_ids(
    features: FeatureSet,
    available: int,
    frequent_ids: FrequentIds | None,
    fraction: float,
    widths: dict[str, int],
    allocation: Allocation,
    budget: int,
) -> dict[str, Tensor]:
    """The top ids of each feature that get dedicated rows within `fraction` of the budget."""
    if frequent_ids is None:
        raise ValueError(
            "double_hash frequency=True needs frequent_ids: for each feature, its training-split ids, most "
            "frequent first (`ue train` computes them; from Python, see data.ids_by_frequency)"
        )
    if not 0 <= fraction < 1:
        raise ValueError(f"frequent_fraction must be in [0, 1), got {fraction!r}")
    unknown = sorted(set(frequent_ids) - set(features.sparse_names))
    if unknown:
        raise ValueError(f"frequent_ids given for unknown features {unknown}")
    ranked = {name: unique_in_order(ids) for name, ids in frequent_ids.items()}
    ranked = {name: ranked[name] for name in features.sparse_names if name in ranked and ranked[name].numel()}
    if not ranked:
        return {}
    shares = allocation_shares(features, allocation, "double_hash")
    shares = {name: shares[name] for name in ranked}
    spend = min(int(fraction * budget), available)
    counts = split_budget(spend, shares, {name: widths[name] for name in ranked}, dict.fromkeys(ranked, 0),
                          method="double_hash")  # fmt: skip
    return {name: ranked[name][: counts[name]] for name in ranked}
