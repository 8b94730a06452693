"""Unified Embedding (Coleman et al., NeurIPS 2023) and feature multiplexing, its one-probe case."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, Self

from unified_embedding.embeddings.base import BudgetError, Vocabularies, register
from unified_embedding.embeddings.full import DEFAULT_DIM, vocabulary_sizes
from unified_embedding.embeddings.table import Slot, SlotTableEmbedding, feature_region
from unified_embedding.features import FeatureSet
from unified_embedding.hashing import salt

ProbeRule = int | Mapping[str, int] | Literal["log"]

#: 8-wide chunks, 2 probes: 4x4 and 2x8 (the same width) were no better on validation beyond seed
#: noise over five datasets at 0.1x and 0.25x (docs/methods.md)
DEFAULT_CHUNK_DIM = 8
DEFAULT_PROBES = 2
MAX_LOG_PROBES = 4


def probe_counts(features: FeatureSet, probes: ProbeRule) -> dict[str, int]:
    """k_f for every sparse feature: its FeatureSpec's `probes`, else the rule.

    The "log" rule gives wider vectors to features with more values,
    k_f = clamp(round(log10(cardinality)), 1, 4): 2-31 values get 1 probe, 32-316 get 2,
    317-3,162 get 3, more get 4; a feature with many values has more to say, and the
    extra probes also make its vector less likely to collide in every chunk at once.
    """
    counts = {}
    for f in features.sparse:
        if f.probes is not None:
            counts[f.name] = f.probes
        elif probes == "log":
            if f.cardinality is None:
                raise ValueError(f"the 'log' probe rule needs the cardinality of feature {f.name!r}")
            counts[f.name] = min(MAX_LOG_PROBES, max(1, round(math.log10(max(f.cardinality, 1)))))
        elif isinstance(probes, Mapping):
            counts[f.name] = int(probes.get(f.name, 1))
        elif isinstance(probes, int) and not isinstance(probes, bool):
            counts[f.name] = probes
        else:
            raise ValueError(f"probes must be an int, a mapping of feature to int, or 'log'; got {probes!r}")
        if counts[f.name] < 1:
            raise ValueError(f"feature {f.name!r} needs at least one probe, got {counts[f.name]}")
    return counts


def collisionless_parameters(
    features: FeatureSet, chunk_dim: int, counts: Mapping[str, int], vocabularies: Vocabularies | None
) -> int:
    """Parameters of the small exact tables of features that opted out of the shared table."""
    sizes = vocabulary_sizes([f.name for f in features.sparse if f.collisionless], vocabularies)
    return sum(size * counts[name] * chunk_dim for name, size in sizes.items())


@register
class UnifiedEmbedding(SlotTableEmbedding):
    """All features share one table of `num_rows` rows of width `chunk_dim`.

    Feature f reads k_f rows, row j chosen by a hash salted with (f, j), and concatenates
    them: its width is k_f * chunk_dim. Collisions happen across features too; the model
    learns to separate them (the paper's multiplexing result). Features marked
    `collisionless` get an exact table of their own instead, placed after the shared rows.
    """

    name = "unified"
    description = "one shared hashed table; feature f concatenates k_f probes (multi-size, multi-probe multiplexing)"
    paper = "Coleman et al., Unified Embedding: Battle-Tested Feature Representations for Web-Scale ML Systems, NeurIPS 2023"

    def __init__(
        self,
        features: FeatureSet,
        num_rows: int,
        chunk_dim: int = DEFAULT_CHUNK_DIM,
        probes: ProbeRule = DEFAULT_PROBES,
        *,
        vocabularies: Vocabularies | None = None,
        **table_options,
    ) -> None:
        if num_rows < 1:
            raise ValueError(f"the shared table needs at least one row, got {num_rows}")
        counts = probe_counts(features, probes)
        slots: list[Slot] = []
        used = num_rows
        for f in features.sparse:
            if f.collisionless:
                size = vocabulary_sizes([f.name], vocabularies)[f.name]
                region, rows = feature_region(f.name, used, size, counts[f.name], vocabulary=True)
                slots += region
                used += rows
            else:
                slots += [Slot(f.name, salt(f.name, j), 0, 1, num_rows, False) for j in range(counts[f.name])]
        super().__init__(features, slots, used, chunk_dim, vocabularies=vocabularies, **table_options)
        self.num_rows = num_rows
        self.probes = counts

    @classmethod
    def shared_rows(
        cls, features: FeatureSet, budget: int, chunk_dim: int, probes: ProbeRule, vocabularies: Vocabularies | None
    ) -> int:
        """Rows of the shared table that fit in `budget` after the collisionless tables."""
        exact = collisionless_parameters(features, chunk_dim, probe_counts(features, probes), vocabularies)
        rows = (budget - exact) // chunk_dim
        if rows < 1:
            raise BudgetError(
                f"{cls.name} needs at least {exact + chunk_dim:,} parameters "
                f"({exact:,} in collisionless tables and one shared row); budget {budget:,}"
            )
        return rows

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        chunk_dim: int = DEFAULT_CHUNK_DIM,
        probes: ProbeRule = DEFAULT_PROBES,
        **options,
    ) -> Self:
        rows = cls.shared_rows(features, budget, chunk_dim, probes, vocabularies)
        return cls(features, rows, chunk_dim, probes, vocabularies=vocabularies, **options)


@register
class MultiplexedEmbedding(UnifiedEmbedding):
    """Feature multiplexing: one shared table, one probe per feature, width `dim`."""

    name = "multiplexed"
    description = "feature multiplexing: one shared hashed table, one probe per feature"
    paper = UnifiedEmbedding.paper

    def __init__(
        self,
        features: FeatureSet,
        num_rows: int,
        dim: int = DEFAULT_DIM,
        *,
        vocabularies: Vocabularies | None = None,
        **table_options,
    ) -> None:
        wider = [f.name for f in features.sparse if f.probes not in (None, 1)]
        if wider:
            raise ValueError(f"multiplexed uses one probe per feature; features {wider} ask for more (use 'unified')")
        super().__init__(features, num_rows, dim, 1, vocabularies=vocabularies, **table_options)

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        dim: int = DEFAULT_DIM,
        **options,
    ) -> Self:
        rows = cls.shared_rows(features, budget, dim, 1, vocabularies)
        return cls(features, rows, dim, vocabularies=vocabularies, **options)
