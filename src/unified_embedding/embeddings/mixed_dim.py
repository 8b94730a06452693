"""Mixed-dimension embeddings (Ginart et al., "Mixed Dimension Embeddings with Application to
Memory-Efficient Recommendation Systems", ISIT 2021).

Every feature keeps a collisionless table (one row per training-split value plus an
out-of-vocabulary row, like `full`), but of its own width d_f, chosen by the paper's
power-law rule with temperature alpha; a narrow table is followed by a learned projection
P_f (d_f x dim, no bias) to the common output width `dim`, so the model sees `full`'s widths.

The rule. The paper sizes a block by its popularity p: d proportional to p^alpha. Here a block
is a feature; each example reads one row of each feature, so a row of a feature with n_f
rows is read with probability about 1/n_f, and

    d_f = clamp(round(d0 * (n_min / n_f) ** alpha), 1, dim),

n_min the smallest table's rows and d0 the base width, the width of that smallest table
(the DLRM reference code's `md_solver` with `d0`). alpha = 0 gives every feature width d0;
alpha = 1 makes width inversely proportional to rows. A projected table costs
n_f * d_f + d_f * dim; when that is no less than a plain `dim`-wide table's n_f * dim, the
feature stores the plain table instead (small vocabularies, where the projection would
dominate), so a feature's cost never falls as d0 grows.

The budget chooses d0: the largest d0 (found by bisection) whose tables and projections fit;
then the parameters left over go, one column at a time, to the features the rule most
under-serves (largest d0 * (n_min/n_f)^alpha - d_f first) while a column fits. At
d0 -> infinity every feature is `dim` wide: `full` exactly.

Layout: one SlotTableEmbedding table whose chunk is the gcd of the widths (often 1), a
feature of width d_f reading d_f / chunk chunks; the projections are one block-diagonal
[sum d_f, F * dim] matrix (identity blocks for unprojected features), so the forward is
still one gather and one matmul. (DLRM's rule also divides rows by the average number of
lookups per example, for multivalent features; FeatureSpec carries no such statistic, so
every feature counts one.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Self

import torch
from torch import Tensor

from unified_embedding.batch import Batch
from unified_embedding.embeddings.base import BudgetError, Vocabularies, register, require_one_width
from unified_embedding.embeddings.full import DEFAULT_DIM, collisionless_layout, vocabulary_sizes
from unified_embedding.embeddings.table import SlotTableEmbedding
from unified_embedding.features import FeatureSet

#: the DLRM reference implementation's default temperature (`--md-temperature 0.3`)
DEFAULT_ALPHA = 0.3
_BISECTION_STEPS = 100


def feature_cost(rows: int, width: int, dim: int) -> int:
    """Parameters of one feature: its table, plus its projection when narrower than `dim`."""
    return rows * width + (width * dim if width < dim else 0)


def stored_width(rows: int, width: int, dim: int) -> int:
    """`width`, or `dim` when a plain `dim`-wide table costs no more than the projected one."""
    return dim if feature_cost(rows, width, dim) >= rows * dim else width


def rule_widths(sizes: Mapping[str, int], d0: float, alpha: float) -> dict[str, float]:
    """The power law before rounding: d0 * (n_min / n_f) ** alpha."""
    smallest = min(sizes.values())
    return {name: d0 * (smallest / rows) ** alpha for name, rows in sizes.items()}


def power_law_widths(sizes: Mapping[str, int], d0: float, alpha: float, dim: int) -> dict[str, int]:
    """Stored widths of every feature for base width d0 (rounded, clamped to [1, dim])."""
    targets = rule_widths(sizes, d0, alpha)
    return {name: stored_width(sizes[name], min(dim, max(1, round(targets[name]))), dim) for name in sizes}


def total_cost(sizes: Mapping[str, int], widths: Mapping[str, int], dim: int) -> int:
    return sum(feature_cost(sizes[name], widths[name], dim) for name in sizes)


def budget_widths(sizes: Mapping[str, int], budget: int, alpha: float, dim: int) -> dict[str, int]:
    """The widths from_budget picks (see the module docstring); BudgetError below the floor."""
    floor = total_cost(sizes, power_law_widths(sizes, 0.0, alpha, dim), dim)
    if budget < floor:
        raise BudgetError(
            f"mixed_dim needs at least {floor:,} parameters (a 1-wide table per feature, one column per "
            f"vocabulary row, plus its projection to {dim}); budget {budget:,}"
        )
    low, high = 0.0, float(dim) * (max(sizes.values()) / min(sizes.values())) ** alpha + 1
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if total_cost(sizes, power_law_widths(sizes, middle, alpha, dim), dim) <= budget:
            low = middle
        else:
            high = middle
    widths = power_law_widths(sizes, low, alpha, dim)
    targets = rule_widths(sizes, low, alpha)
    left = budget - total_cost(sizes, widths, dim)
    while True:
        growable = sorted((w for w in widths if widths[w] < dim), key=lambda n: widths[n] - targets[n])
        for name in growable:
            wider = stored_width(sizes[name], widths[name] + 1, dim)
            extra = feature_cost(sizes[name], wider, dim) - feature_cost(sizes[name], widths[name], dim)
            if extra <= left:
                widths[name], left = wider, left - extra
                break
        else:
            return widths


@register
class MixedDimensionEmbedding(SlotTableEmbedding):
    """Collisionless tables of per-feature widths (power-law rule), each projected to `dim`."""

    name = "mixed_dim"
    dense_only_because = "trains its projections with dense gradients"
    description = "mixed-dimension collisionless tables: width by a power law of cardinality, projected to one width"
    paper = (
        "Ginart et al., Mixed Dimension Embeddings with Application to Memory-Efficient "
        "Recommendation Systems, ISIT 2021"
    )

    def __init__(
        self,
        features: FeatureSet,
        vocabularies: Vocabularies,
        widths: Mapping[str, int],
        dim: int = DEFAULT_DIM,
        **table_options,
    ) -> None:
        if sorted(widths) != sorted(features.sparse_names) or not all(1 <= w <= dim for w in widths.values()):
            raise ValueError(f"mixed_dim needs a width in [1, {dim}] for every sparse feature, got {dict(widths)}")
        require_one_width(features, f"mixed_dim projects every feature to one width ({dim})", ValueError, dim=dim)
        sizes = vocabulary_sizes(features.sparse_names, vocabularies)
        slots, rows, chunk = collisionless_layout(sizes, widths)
        super().__init__(features, slots, rows, chunk, vocabularies=vocabularies, **table_options)
        self.dim = dim
        self.widths = dict(widths)
        self._build_projection()

    def _build_projection(self) -> None:
        """One block-diagonal [sum d_f, F*dim] map: P_f blocks (learned) and identity blocks (d_f = dim)."""
        fixed_rows, fixed_cols, learned_rows, learned_cols = [], [], [], []
        start = 0
        for f, (name, width) in enumerate(self.widths.items()):
            grid_r, grid_c = torch.meshgrid(torch.arange(width), torch.arange(self.dim), indexing="ij")
            if width == self.dim:
                fixed_rows.append(start + torch.arange(width))
                fixed_cols.append(f * self.dim + torch.arange(width))
            else:
                learned_rows.append(start + grid_r.reshape(-1))
                learned_cols.append(f * self.dim + grid_c.reshape(-1))
            start += width
        identity = torch.zeros(start, len(self.widths) * self.dim)
        if fixed_rows:
            identity[torch.cat(fixed_rows), torch.cat(fixed_cols)] = 1.0
        self.register_buffer("identity", identity, persistent=False)
        empty = torch.zeros(0, dtype=torch.int64)
        self.register_buffer("learned_rows", torch.cat(learned_rows) if learned_rows else empty, persistent=False)
        self.register_buffer("learned_cols", torch.cat(learned_cols) if learned_cols else empty, persistent=False)
        # Uniform(+-sqrt(3/d_f)): a projected vector starts with the spread of a `full` row.
        fan_in = torch.tensor([float(w) for w in self.widths.values() for _ in range(w * self.dim) if w < self.dim])
        self.projection = torch.nn.Parameter((torch.rand(fan_in.numel()) * 2 - 1) * torch.sqrt(3 / fan_in))

    def decayed_parameters(self) -> list[torch.nn.Parameter]:
        """The tables, not the projections to the common width."""
        return [p for p in self.parameters() if p is not self.projection]

    @property
    def out_dims(self) -> dict[str, int]:
        return {name: self.dim for name in self.features.sparse_names}

    def forward(self, batch: Batch) -> Tensor:
        narrow = super().forward(batch)  # [B, sum d_f], feature f's d_f columns in feature order
        blocks = self.identity.index_put((self.learned_rows, self.learned_cols), self.projection)
        return narrow @ blocks

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        alpha: float = DEFAULT_ALPHA,
        dim: int = DEFAULT_DIM,
        **options,
    ) -> Self:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0 (0: one width for all), got {alpha}")
        sizes = vocabulary_sizes(features.sparse_names, vocabularies)
        return cls(features, vocabularies, budget_widths(sizes, budget, alpha, dim), dim=dim, **options)
