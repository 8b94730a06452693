"""The quotient-remainder trick (Shi et al., KDD 2020): a value's vector from two small tables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unified_embedding.embeddings.base import BudgetError, Vocabularies, register
from unified_embedding.embeddings.composition import (
    Allocation,
    ComposedEmbedding,
    allocation_weights,
    apportion,
    factor_std,
    per_feature,
    regions,
)
from unified_embedding.embeddings.full import DEFAULT_DIM
from unified_embedding.embeddings.table import DEFAULT_INIT_SCALE
from unified_embedding.features import FeatureSet

Operation = Literal["mult", "add", "concat"]


@register
class QREmbedding(ComposedEmbedding):
    """Value v of feature f reads row i // m_f of a quotient table and row i % m_f of a remainder table.

    i = h_f(v) mod (q_f * m_f) is the value's index, q_f and m_f the two tables' rows. The
    quotient and remainder are a complementary partition of the index range (the paper's
    QR trick): two values with equal quotients share their Q row, two with equal remainders
    share their R row, and only equal indices share both, so q + m rows give q * m distinct
    vectors. The rows are combined by `operation`, the paper's operation-based
    compositions: "mult" (element-wise product, the paper's default), "add", or "concat"
    (each table then dim / 2 wide, so the width stays dim).

    Differences from the paper, on purpose: the paper's index is a category's position in
    its vocabulary with q = ceil(N / m); here the index is a hash into the whole q x m grid,
    so no vocabulary is needed, unseen ids get vectors, and every stored row is reachable
    whatever the budget. Q and R start Gaussian at one scale, for "mult" the square root of
    a plain row's (`composition.factor_std`; DLRM's reference QREmbeddingBag draws both from
    Uniform(sqrt(1/N), 1), so its products start near 0.25). A multivalent feature pools the
    per-value products (that reference pools Q and R first and multiplies the two bags,
    which is not the sum of the values' vectors).

    `shared=True`: one Q and one R table for all features, each feature hashing into the one
    q x m grid with its own salt (the multiplexed variant).
    """

    name = "qr"
    description = "quotient-remainder trick: a hashed index's quotient and remainder rows combined (mult/add/concat)"
    paper = (
        "Shi et al., Compositional Embeddings Using Complementary Partitions for "
        "Memory-Efficient Recommendation Systems, KDD 2020"
    )

    def __init__(
        self,
        features: FeatureSet,
        quotient_rows: int | Mapping[str, int],
        remainder_rows: int | Mapping[str, int],
        dim: int = DEFAULT_DIM,
        operation: Operation = "mult",
        *,
        shared: bool = False,
        sparse: bool = False,
        init_scale: float = DEFAULT_INIT_SCALE,
    ) -> None:
        if operation not in ("mult", "add", "concat"):
            raise ValueError(f"operation must be 'mult', 'add' or 'concat', got {operation!r}")
        if operation == "concat" and dim % 2:
            raise ValueError(f"operation 'concat' joins two halves; dim must be even, got {dim}")
        names = features.sparse_names
        q = per_feature(quotient_rows, names, "quotient rows")
        m = per_feature(remainder_rows, names, "remainder rows")
        super().__init__(features, [a * b for a, b in zip(q, m, strict=True)], dim, shared=shared)
        self.operation = operation
        self.sparse = sparse
        width = dim // 2 if operation == "concat" else dim
        q_base, q_total = regions(q, shared)
        r_base, r_total = regions(m, shared)
        self.quotient = nn.Parameter(torch.empty(q_total, width))
        self.remainder = nn.Parameter(torch.empty(r_total, width))
        # mult: two equal-scale factors (see factor_std); add, concat: each part a plain row's scale
        std = factor_std(init_scale, factors=2 if operation == "mult" else 1)
        nn.init.normal_(self.quotient, std=std)
        nn.init.normal_(self.remainder, std=std)
        self.register_buffer("remainder_size", torch.tensor(m), persistent=False)
        self.register_buffer("quotient_base", torch.tensor(q_base), persistent=False)
        self.register_buffer("remainder_base", torch.tensor(r_base), persistent=False)
        self.quotient_rows = dict(zip(names, q, strict=True))
        self.remainder_rows = dict(zip(names, m, strict=True))

    def compose(self, index: Tensor, feature: Tensor) -> Tensor:
        m = self.remainder_size[feature]
        q_rows = F.embedding(self.quotient_base[feature] + index // m, self.quotient, sparse=self.sparse)
        r_rows = F.embedding(self.remainder_base[feature] + index % m, self.remainder, sparse=self.sparse)
        if self.operation == "mult":
            return q_rows * r_rows
        if self.operation == "add":
            return q_rows + r_rows
        return torch.cat([q_rows, r_rows], dim=1)

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        dim: int = DEFAULT_DIM,
        operation: Operation = "mult",
        shared: bool = False,
        allocation: Allocation = "sqrt",
        **options,
    ) -> Self:
        """All the budget's rows, each feature's split evenly: q = ceil(rows / 2), m = floor(rows / 2).

        The even split maximises the index range q * m for q + m rows. Per feature, rows are
        shared by `allocation` (default sqrt(cardinality + 1), which gives every feature the
        same q * m per value). Less than one row of budget is left over.
        """
        width = dim // 2 if operation == "concat" else dim
        features_count = 1 if shared else len(features.sparse)
        rows = budget // width
        if rows < 2 * features_count:
            raise BudgetError(
                f"qr needs at least {2 * width * features_count:,} parameters (one quotient and one remainder row "
                f"of width {width} {'in the shared tables' if shared else 'per feature'}); budget {budget:,}"
            )
        if shared:
            q: int | dict[str, int] = (rows + 1) // 2
            m: int | dict[str, int] = rows // 2
        else:
            split = apportion(rows, allocation_weights(features, allocation, cls.name), minimum=2)
            q = {name: (r + 1) // 2 for name, r in split.items()}
            m = {name: r // 2 for name, r in split.items()}
        return cls(features, q, m, dim, operation, shared=shared, **options)
