"""TT-Rec (Yin et al., MLSys 2021): each embedding table stored as three tensor-train cores."""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from typing import Self

import torch
from torch import Tensor, nn

from unified_embedding.embeddings.base import BudgetError, Vocabularies, register, require_dense
from unified_embedding.embeddings.composition import ComposedEmbedding, factor_std, index_targets, regions
from unified_embedding.embeddings.full import DEFAULT_DIM
from unified_embedding.embeddings.table import DEFAULT_INIT_SCALE
from unified_embedding.features import FeatureSet

Shape = tuple[int, int, int]


def dim_factors(dim: int) -> Shape:
    """dim = d1 * d2 * d3, as even as possible, the smallest factor in the middle.

    The middle core costs n2 * d2 * R^2 parameters and the outer ones n * d * R, so the
    small factor goes where the rank is squared. 16 -> (4, 2, 2).
    """
    triples = [
        sorted((a, b, dim // (a * b)), reverse=True)
        for a in range(1, dim + 1) if dim % a == 0
        for b in range(1, dim // a + 1) if dim // a % b == 0
    ]  # fmt: skip
    large, middle, small = min(triples, key=lambda t: (t[0], -t[2]))
    return large, small, middle


def row_factors(rows: int) -> Shape:
    """The smallest balanced (n1, n2, n3) with n1 * n2 * n3 >= rows (the paper factors rows evenly)."""
    side = max(1, round(rows ** (1 / 3)))
    while side**3 < rows:
        side += 1
    n = [side, side, side]
    for k in range(3):
        while n[k] > 1 and math.prod(n) // n[k] * (n[k] - 1) >= rows:
            n[k] -= 1
    n.sort(reverse=True)
    return n[0], n[2], n[1]


def core_parameters(n: Shape, d: Shape, rank: int) -> int:
    """Parameters of cores [n1, d1, R], [n2, R, d2, R], [n3, R, d3]."""
    return n[0] * d[0] * rank + n[1] * d[1] * rank * rank + n[2] * d[2] * rank


@register
class TTRecEmbedding(ComposedEmbedding):
    """Each feature's [n1*n2*n3, d1*d2*d3] table is a tensor train of three cores with rank R.

    A value's index i = h_f(v) mod n1*n2*n3 (see composition) is written in mixed radix,
    i = (i1 * n2 + i2) * n3 + i3, and its row is the tensor-train contraction

        row[j1, j2, j3] = sum_{a, b} G1[i1, j1, a] * G2[i2, a, j2, b] * G3[i3, b, j3],

    computed for every distinct index of the batch at once as two batched matrix products.
    The cores start Gaussian with std (s / R)^(1/3) (`composition.factor_std`), so a
    reconstructed entry has std s, the std of the plain tables' Uniform(-0.05, 0.05) start
    (TT-Rec likewise samples the cores so that the reconstructed rows, not each core, have
    the intended distribution).

    Like qr, the index is a hash into the cores' whole n1*n2*n3 range instead of a
    vocabulary position, so no vocabulary is needed and every core row is reachable.
    `shared=True`: one set of cores for all features (one tensor-train table of all
    features' rows, each feature hashing into it with its own salt).
    """

    name = "tt_rec"
    dense_only_because = "trains dense tensor-train cores"
    description = "TT-Rec: each table as three tensor-train cores; a row is a contraction of three core slices"
    paper = "Yin et al., TT-Rec: Tensor Train Compression for Deep Learning Recommendation Model Embeddings, MLSys 2021"

    def __init__(
        self,
        features: FeatureSet,
        shapes: Shape | Mapping[str, Shape],
        rank: int,
        dim: int = DEFAULT_DIM,
        *,
        shared: bool = False,
        sparse: bool = False,
        init_scale: float = DEFAULT_INIT_SCALE,
    ) -> None:
        require_dense(self, sparse)
        names = features.sparse_names
        if isinstance(shapes, Mapping):
            missing = [name for name in names if name not in shapes]
            if missing:
                raise ValueError(f"no core shape given for features {missing}")
            n = [tuple(shapes[name]) for name in names]
        else:
            n = [tuple(shapes)] * len(names)
        if rank < 1 or any(len(s) != 3 or min(s) < 1 for s in n):
            raise ValueError(f"tt_rec needs rank >= 1 and three positive row factors per feature; got {rank}, {n}")
        super().__init__(features, [math.prod(s) for s in n], dim, shared=shared)
        self.rank = rank
        self.dims = d = dim_factors(dim)
        self.shapes = dict(zip(names, n, strict=True))
        bases, totals = zip(*(regions([s[k] for s in n], shared) for k in range(3)), strict=True)
        std = factor_std(init_scale, factors=3, terms=rank * rank)
        self.core1 = nn.Parameter(torch.randn(totals[0], d[0] * rank) * std)
        self.core2 = nn.Parameter(torch.randn(totals[1], rank * d[1] * rank) * std)
        self.core3 = nn.Parameter(torch.randn(totals[2], rank * d[2]) * std)
        self.register_buffer("radix", torch.tensor([(s[1], s[2]) for s in n]), persistent=False)
        self.register_buffer("core_base", torch.tensor(bases).T.contiguous(), persistent=False)

    def compose(self, index: Tensor, feature: Tensor) -> Tensor:
        n2, n3 = self.radix[feature].unbind(1)
        base = self.core_base[feature]
        i1, i2, i3 = index // (n2 * n3), (index // n3) % n2, index % n3
        (d1, d2, d3), rank = self.dims, self.rank
        first = self.core1[base[:, 0] + i1].view(-1, d1, rank)
        middle = self.core2[base[:, 1] + i2].view(-1, rank, d2 * rank)
        last = self.core3[base[:, 2] + i3].view(-1, rank, d3)
        partial = torch.bmm(first, middle).view(-1, d1 * d2, rank)
        return torch.bmm(partial, last).view(-1, self.dim)

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        dim: int = DEFAULT_DIM,
        shared: bool = False,
        **options,
    ) -> Self:
        """The largest rank at which every table still covers its cardinality + 1 rows.

        Each table (one per feature, or one of all features' rows when shared) first gets
        the smallest balanced factorisation n1 * n2 * n3 >= cardinality + 1, the paper's
        shape; the rank is the largest that fits, capped where rank stops adding
        expressiveness (a TT of an [n, d] table needs no rank above min(n1*d1, n3*d3)).
        The parameters left over widen the outer cores' row factors, a table at a time,
        the least-covered first, so less than min(d1, d3) * R parameters stay unused. If
        not even rank 1 covers every table, the rank is 1 and the tables shrink below
        their cardinality (hashing then collides); the floor is d1 + d2 + d3 parameters per
        table (all row factors 1).
        """
        d = dim_factors(dim)
        targets = index_targets(features, cls.name)
        if shared:
            targets = {"shared": sum(targets.values())}
        shapes = {name: row_factors(rows) for name, rows in targets.items()}
        rank_cap = max(min(n[0] * d[0], n[2] * d[2]) for n in shapes.values())
        rank = 0
        while rank < rank_cap and sum(core_parameters(n, d, rank + 1) for n in shapes.values()) <= budget:
            rank += 1
        if rank == 0:
            rank, shapes = 1, {name: (1, 1, 1) for name in targets}
            floor = sum(core_parameters(n, d, 1) for n in shapes.values())
            if floor > budget:
                raise BudgetError(
                    f"tt_rec needs at least {floor:,} parameters (rank-1 cores with one row per factor, "
                    f"{sum(d)} per {'shared table' if shared else 'feature'}); budget {budget:,}"
                )
        shapes = _widen(shapes, targets, d, rank, budget - sum(core_parameters(n, d, rank) for n in shapes.values()))
        return cls(features, shapes["shared"] if shared else shapes, rank, dim, shared=shared, **options)


def _widen(shapes: dict[str, Shape], targets: Mapping[str, int], d: Shape, rank: int, spare: int) -> dict[str, Shape]:
    """Spend `spare` parameters on outer-core rows, always for the table with the fewest rows per target row."""
    shapes = dict(shapes)
    queue = [(math.prod(n) / targets[name], name) for name, n in shapes.items()]
    heapq.heapify(queue)
    while queue:
        _, name = heapq.heappop(queue)
        n1, n2, n3 = shapes[name]
        options = [((n1 + 1, n2, n3), d[0] * rank), ((n1, n2, n3 + 1), d[2] * rank)]
        if n3 < n1:  # grow the smaller outer factor first: the table stays balanced
            options.reverse()
        for grown, cost in options:
            if cost <= spare:
                shapes[name], spare = grown, spare - cost
                heapq.heappush(queue, (math.prod(grown) / targets[name], name))
                break
    return shapes
