"""The hashing trick: a hashed table per feature (Weinberger et al., 2009)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, Self

from unified_embedding.embeddings.base import BudgetError, Vocabularies, register
from unified_embedding.embeddings.composition import allocation_weights
from unified_embedding.embeddings.full import DEFAULT_DIM
from unified_embedding.embeddings.table import SlotTableEmbedding, feature_region
from unified_embedding.features import FeatureSet

Allocation = Literal["proportional", "equal"]


@register
class HashingTrickEmbedding(SlotTableEmbedding):
    """Feature f hashes its values into its own table of `rows[f]` rows; no vocabulary needed."""

    name = "hashing"
    description = "hashing trick: one hashed table per feature, rows split by cardinality or equally"
    paper = "Weinberger et al., Feature Hashing for Large Scale Multitask Learning, ICML 2009"

    def __init__(self, features: FeatureSet, rows: Mapping[str, int], dim: int = DEFAULT_DIM, **table_options) -> None:
        widths = {f.name: f.dim or dim for f in features.sparse}
        chunk = math.gcd(*widths.values())
        slots, used = [], 0
        for name in features.sparse_names:
            if rows.get(name, 0) < 1:
                raise ValueError(f"feature {name!r} needs at least one hashed row, got {rows.get(name)}")
            region, size = feature_region(name, used, rows[name], widths[name] // chunk, vocabulary=False)
            slots += region
            used += size
        super().__init__(features, slots, used, chunk, **table_options)
        self.rows = dict(rows)

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        dim: int = DEFAULT_DIM,
        allocation: Allocation = "proportional",
        **options,
    ) -> Self:
        """Split the budget's rows across features by cardinality ("proportional") or equally.

        Shares are floored, then the leftover parameters go one row at a time to the features
        with the largest remainders, so less than one row of budget is left unused.
        """
        widths = {f.name: f.dim or dim for f in features.sparse}
        if budget < sum(widths.values()):
            raise BudgetError(f"hashing needs at least one row per feature: {sum(widths.values()):,} parameters")
        weights = allocation_weights(features, allocation, cls.name)
        total = sum(weights.values())
        spare = budget - sum(widths.values())
        share = {name: spare * weights[name] / total for name in weights}
        rows = {name: 1 + int(share[name] // widths[name]) for name in weights}
        left = budget - sum(rows[n] * widths[n] for n in rows)
        by_remainder = sorted(weights, key=lambda n: share[n] / widths[n] - int(share[n] // widths[n]), reverse=True)
        for name in by_remainder * 2:
            if widths[name] <= left:
                rows[name] += 1
                left -= widths[name]
        return cls(features, rows, dim=dim, **options)
