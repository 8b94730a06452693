"""Collisionless tables: one exact row per training-split value of each feature."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Self

from unified_embedding.embeddings.base import BudgetError, Vocabularies, register
from unified_embedding.embeddings.table import SlotTableEmbedding, feature_region
from unified_embedding.features import FeatureSet

DEFAULT_DIM = 16


def vocabulary_sizes(names: Sequence[str], vocabularies: Vocabularies | None) -> dict[str, int]:
    """Rows per feature: its training-split values plus one out-of-vocabulary row."""
    missing = [name for name in names if vocabularies is None or name not in vocabularies]
    if missing:
        raise ValueError(f"no vocabulary (the ids seen in the training split) for features {missing}")
    return {name: len(vocabularies[name]) + 1 for name in names}


@register
class FullEmbedding(SlotTableEmbedding):
    """One collisionless table per feature; ids unseen in training share one OOV row.

    Every feature has the same width `dim` unless its FeatureSpec sets `dim`; widths must
    then share a common divisor, the chunk width of the single underlying table.
    """

    name = "full"
    description = "collisionless table per feature with one out-of-vocabulary row (the uncompressed baseline)"

    def __init__(self, features: FeatureSet, vocabularies: Vocabularies, dim: int = DEFAULT_DIM, **table_options) -> None:
        sizes = vocabulary_sizes(features.sparse_names, vocabularies)
        widths = {f.name: f.dim or dim for f in features.sparse}
        chunk = math.gcd(*widths.values())
        slots, rows = [], 0
        for name, size in sizes.items():
            region, used = feature_region(name, rows, size, widths[name] // chunk, vocabulary=True)
            slots += region
            rows += used
        super().__init__(features, slots, rows, chunk, vocabularies=vocabularies, **table_options)

    @staticmethod
    def parameter_count(features: FeatureSet, vocabularies: Vocabularies, dim: int = DEFAULT_DIM) -> int:
        """Size of the full method without building it: the reference for `--budget 0.25x`."""
        sizes = vocabulary_sizes(features.sparse_names, vocabularies)
        return sum(size * (features.get(name).dim or dim) for name, size in sizes.items())

    @classmethod
    def from_budget(
        cls, features: FeatureSet, budget: int, *, vocabularies: Vocabularies | None = None, **options
    ) -> Self:
        """The widest uniform `dim` that fits: full cannot share rows, so it can only get narrower."""
        if any(f.dim for f in features.sparse):
            raise BudgetError("full.from_budget chooses one width for all features; remove per-feature dims")
        rows = sum(vocabulary_sizes(features.sparse_names, vocabularies).values())
        dim = budget // rows
        if dim < 1:
            raise BudgetError(f"full needs at least {rows:,} parameters (one column per vocabulary row); budget {budget:,}")
        return cls(features, vocabularies, dim=dim, **options)

