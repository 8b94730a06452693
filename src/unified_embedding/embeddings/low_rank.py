"""Low-rank (factorised) embeddings: a narrow table times a projection to the output width."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unified_embedding.embeddings.base import BudgetError, Vocabularies, register, require_dense
from unified_embedding.embeddings.composition import (
    ComposedEmbedding,
    apportion,
    factor_std,
    index_targets,
    per_feature,
    regions,
)
from unified_embedding.embeddings.full import DEFAULT_DIM
from unified_embedding.embeddings.table import DEFAULT_INIT_SCALE
from unified_embedding.features import FeatureSet


@register
class LowRankEmbedding(ComposedEmbedding):
    """Value v of feature f: row a_v (width r) of a narrow hashed table, times P_f [r, dim].

    The table a feature would store, [rows, dim], is constrained to rank r: A P with A
    [rows, r] and P [r, dim]. This is the two-layer embedding of MLET (Deng, Ghaemmaghami
    et al. 2023) with its inner width below dim, as in ALBERT's factorised embedding
    (Lan et al. 2020), so it compresses; MLET instead trains with an inner width above dim
    and collapses A P into one table for inference. The projection is applied after pooling,
    which is exact because it is linear: sum_v a_v P = (sum_v a_v) P.

    Value v of feature f reads row h_f(v) mod rows_f of the feature's narrow table (see
    composition). A and P start Gaussian at one scale (`composition.factor_std`), so a
    product starts at the plain tables' scale and both factors learn at the same pace. `shared=True`: one narrow table for all
    features, each hashing into it with its own salt (the multiplexed variant); the
    projections stay per feature, since with one projection every feature's vectors would
    lie in one r-dimensional subspace, and a projection costs only r * dim.
    """

    name = "low_rank"
    dense_only_because = "trains dense projections"
    description = "factorised embedding: a narrow hashed table of width r times a projection r -> dim"
    paper = (
        "Deng, Ghaemmaghami et al., Enhancing Cross-Category Learning in Recommendation Systems with "
        "Multi-Layer Embedding Training (MLET), ACML 2023; Lan et al., ALBERT, ICLR 2020 (factorised embedding)"
    )

    def __init__(
        self,
        features: FeatureSet,
        rows: int | Mapping[str, int],
        rank: int,
        dim: int = DEFAULT_DIM,
        *,
        shared: bool = False,
        sparse: bool = False,
        init_scale: float = DEFAULT_INIT_SCALE,
    ) -> None:
        require_dense(self, sparse)
        if rank < 1:
            raise ValueError(f"low_rank needs rank >= 1, got {rank}")
        names = features.sparse_names
        sizes = per_feature(rows, names, "rows")
        super().__init__(features, sizes, dim, shared=shared)
        self.rank = rank
        self.rows = dict(zip(names, sizes, strict=True))
        bases, total = regions(sizes, shared)
        std = factor_std(init_scale, factors=2, terms=rank)
        self.narrow = nn.Parameter(torch.randn(total, rank) * std)
        self.projection = nn.Parameter(torch.randn(len(names), rank, dim) * std)
        self.register_buffer("row_base", torch.tensor(bases), persistent=False)

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The narrow rows, not the shared projections."""
        return [self.narrow]

    def compose(self, index: Tensor, feature: Tensor) -> Tensor:
        return F.embedding(self.row_base[feature] + index, self.narrow)

    def project(self, pooled: Tensor) -> Tensor:
        return torch.bmm(pooled, self.projection)  # [F, B, r] @ [F, r, dim]

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        dim: int = DEFAULT_DIM,
        shared: bool = False,
        rank: int | None = None,
        **options,
    ) -> Self:
        """The largest rank r <= dim at which every table keeps cardinality + 1 rows (or the given `rank`).

        Each unit of rank costs one column of rows plus `dim` weights of every feature's
        projection. The parameters left at that rank buy more hashed rows (fewer
        collisions), split proportionally to cardinality + 1, so less than r parameters stay
        unused. Below rank 1 with full rows, the rank is 1 and the rows shrink; the floor is
        a 1 x dim projection per feature and one row per table (one when shared).
        """
        targets = index_targets(features, cls.name)
        tables = 1 if shared else len(targets)
        projections = dim * len(targets)
        if rank is None:
            rank = max(1, min(dim, budget // (sum(targets.values()) + projections)))
        elif rank < 1:
            raise ValueError(f"low_rank needs rank >= 1, got {rank}")
        rows = budget // rank - projections
        if rows < tables:
            raise BudgetError(
                f"low_rank needs at least {rank * (tables + projections):,} parameters (a {rank} x {dim} projection "
                f"per feature and one row of width {rank} {'in the shared table' if shared else 'per feature'}); "
                f"budget {budget:,}"
            )
        split = rows if shared else apportion(rows, {name: float(n) for name, n in targets.items()})
        return cls(features, split, rank, dim, shared=shared, **options)
