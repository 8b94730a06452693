"""AutoDim (Zhao et al., "AutoDim: Field-aware Embedding Dimension Search in Recommender
Systems", WWW 2021), with the retrained table held to a budget.

Stage "search": every field f has one collisionless table per candidate width c (default
1, 2, 4, 8, 16 = D), each followed by a learned projection P_{f,c} (c x D, no bias; the
identity for c = D) to the common width D. The field's vector is the mixture
sum_c softmax(alpha_f)_c * e_{f,c} P_{f,c}, with architecture weights alpha_f trained by
the task loss alongside everything else. We use a plain softmax with a temperature,
softmax(alpha_f / `temperature`), not the paper's Gumbel-softmax: deterministic, and the
temperature is what lets the choice sharpen at all in a short training (Adam moves alpha by
about the learning rate per step; at temperature 1 the weights of a Frappe trial stayed within
0.196..0.204 of each other, and their argmax was noise). We also use one-level optimisation on the training data (the paper updates alpha on
validation batches, bi-level, DARTS-style): deterministic, and the validation split stays
for early stopping only. The paper's batch normalisation of each projected candidate is left
out: the projections are initialised so that every candidate starts with the spread of a
`full` row (as in mixed_dim).

Stage "retrain": each field keeps only its chosen candidate (its table and projection, as
trained in the search; the others are zeroed and no longer stored) and trains on. The choice
is the argmax of alpha_f. When the argmax widths do not fit the budget, fields are narrowed
one candidate at a time, each time the one whose narrowing gives up the least log
architecture weight per parameter saved, until the table fits, and then widened back towards
their argmax where the room left allows; run.json records both the argmax and the widths
retrained.

Counting. A field at width c < D stores its n_f x c table and its c x D projection, or their
n_f x D product when that is smaller (a deployment folds them); at c = D, its table. The
budget bounds that retrained size. The search supernet is far larger (every candidate's table
and projection: about 31/16 of `full`) and may exceed the budget during the search: it is
training state. `num_parameters()` is the retrained size at the widths the method would
choose from its current architecture weights (before any training: the widest that fit,
narrowing from D), and after the search, at the widths chosen.

Layout: the candidates' tables of a field are one row of `full`'s table, sum(candidates)
wide, so the search's forward is one gather plus one batched matmul per field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Self

import torch
from torch import Tensor, nn

from unified_embedding.batch import Batch
from unified_embedding.embeddings.base import BudgetError, Vocabularies, register, require_one_width
from unified_embedding.embeddings.full import DEFAULT_DIM, FullEmbedding, vocabulary_sizes
from unified_embedding.features import FeatureSet

DEFAULT_CANDIDATES = (1, 2, 4, 8, 16)
#: softmax temperature of the architecture weights (see the module docstring)
DEFAULT_TEMPERATURE = 0.05


def field_cost(rows: int, width: int, dim: int) -> int:
    """Stored words of a field at `width`: table plus projection, or the folded n x D table if smaller."""
    return rows * dim if width >= dim else min(rows * width + width * dim, rows * dim)


def widest_argmax(log_weights: Tensor) -> Tensor:
    """Each field's most weighted candidate; of equal weights (as before training), the widest."""
    last = log_weights.shape[1] - 1
    return last - log_weights.flip(1).argmax(dim=1)


def fit_choice(
    log_weights: Tensor, rows: Sequence[int], candidates: Sequence[int], dim: int, budget: int
) -> tuple[list[int], int]:
    """Candidate index per field: the argmax, narrowed until the stored size fits (see the module docstring).

    Raises BudgetError when even the narrowest candidates do not fit.
    """
    choice = [int(i) for i in widest_argmax(log_weights)]
    costs = [[field_cost(n, c, dim) for c in candidates] for n in rows]
    size = sum(costs[f][i] for f, i in enumerate(choice))
    while size > budget:
        steps = []  # (log weight lost per parameter saved, field, narrower choice)
        for f, i in enumerate(choice):
            cheaper = [j for j in range(i) if costs[f][j] < costs[f][i]]  # a folded width may cost the same
            if cheaper:
                j = cheaper[-1]
                steps.append((float(log_weights[f, i] - log_weights[f, j]) / (costs[f][i] - costs[f][j]), f, j))
        if not steps:
            floor = sum(c[0] for c in costs)
            raise BudgetError(
                f"autodim needs at least {floor:,} parameters (every feature at width {candidates[0]} with its "
                f"projection); budget {budget:,}"
            )
        _, field, narrower = min(steps)
        size -= costs[field][choice[field]] - costs[field][narrower]
        choice[field] = narrower
    return rewiden(choice, size, widest_argmax(log_weights).tolist(), log_weights, costs, budget)


def rewiden(
    choice: list[int], size: int, argmax: list[int], log_weights: Tensor, costs: list[list[int]], budget: int
) -> tuple[list[int], int]:
    """Widen narrowed fields back towards their argmax where room is left, most log weight regained per parameter
    first: narrowing one field at a time can overshoot, freeing room that a field narrowed earlier can use."""
    while True:
        steps = [
            (-float(log_weights[f, j] - log_weights[f, i]) / max(costs[f][j] - costs[f][i], 1), f, j)
            for f, i in enumerate(choice)
            for j in range(i + 1, argmax[f] + 1)
            if log_weights[f, j] > log_weights[f, i] and size + costs[f][j] - costs[f][i] <= budget
        ]
        if not steps:
            return choice, size
        _, field, wider = min(steps)
        size += costs[field][wider] - costs[field][choice[field]]
        choice[field] = wider


@register
class AutoDimEmbedding(FullEmbedding):
    """Per-field choice among candidate widths by softmax architecture weights, then retrain at the choice."""

    name = "autodim"
    dense_only_because = "trains its projections and architecture weights with dense gradients"
    #: its search or pruning decides which float32 weights are stored; codes would need their own
    quantisable = False
    description = "AutoDim: softmax architecture weights choose each field's width among candidates; retrain in budget"
    paper = "Zhao et al., AutoDim: Field-aware Embedding Dimension Search in Recommender Systems, WWW 2021"
    stages = ("search", "retrain")

    def __init__(
        self,
        features: FeatureSet,
        vocabularies: Vocabularies,
        budget: int,
        dim: int = DEFAULT_DIM,
        *,
        candidates: Sequence[int] = DEFAULT_CANDIDATES,
        temperature: float = DEFAULT_TEMPERATURE,
        **table_options,
    ) -> None:
        candidates = sorted({int(c) for c in candidates})
        if not candidates or candidates[0] < 1 or candidates[-1] > dim:
            raise ValueError(f"autodim candidates must be widths in [1, {dim}], got {candidates}")
        if not temperature > 0:
            raise ValueError(f"autodim's temperature must be positive, got {temperature}")
        require_one_width(features, f"autodim projects every feature to one width ({dim})", ValueError)
        super().__init__(features, vocabularies, dim=sum(candidates), **table_options)
        self.dim, self.candidates, self.budget, self.temperature = dim, candidates, budget, temperature
        self.rows = list(vocabulary_sizes(features.sparse_names, vocabularies).values())
        fields = len(self.rows)
        self.alpha = nn.Parameter(torch.zeros(fields, len(candidates)))
        # Learned projections of the narrower candidates; the D-wide one (if a candidate) reads as is.
        narrow = [c for c in candidates if c < dim]
        fan_in = torch.tensor([float(c) for c in narrow for _ in range(c)])
        self.projection = nn.Parameter((torch.rand(fields, len(fan_in), dim) * 2 - 1) * torch.sqrt(3 / fan_in)[:, None])
        column_candidate = torch.repeat_interleave(torch.arange(len(candidates)), torch.tensor(candidates))
        self.register_buffer("column_candidate", column_candidate, persistent=False)
        # Persistent: the retrain stage's choice, and whether the search has fixed it.
        choice, _ = fit_choice(self.alpha.detach(), self.rows, candidates, dim, budget)
        self.register_buffer("choice", torch.tensor(choice, dtype=torch.int64))
        self.register_buffer("searched", torch.zeros((), dtype=torch.bool))

    @property
    def out_dims(self) -> dict[str, int]:
        return {name: self.dim for name in self.features.sparse_names}

    def mixture(self) -> Tensor:
        """[F, candidates]: softmax(alpha) in the search, one-hot of the choice after it."""
        if bool(self.searched):
            return nn.functional.one_hot(self.choice, len(self.candidates)).to(self.alpha.dtype)
        return torch.softmax(self.alpha / self.temperature, dim=1)

    def blocks(self) -> Tensor:
        """[F, sum(candidates), D]: every candidate's projection, scaled by its mixture weight."""
        fields = self.alpha.shape[0]
        parts = [self.projection]
        if self.candidates[-1] == self.dim:
            parts.append(torch.eye(self.dim).expand(fields, self.dim, self.dim))
        return torch.cat(parts, dim=1) * self.mixture()[:, self.column_candidate, None]

    def forward(self, batch: Batch) -> Tensor:
        pooled = super().forward(batch)  # [B, F * sum(candidates)]: every candidate's vector, pooled
        fields = self.alpha.shape[0]
        mixed = torch.einsum("bfk,fkd->bfd", pooled.view(batch.batch_size, fields, -1), self.blocks())
        return mixed.reshape(batch.batch_size, fields * self.dim)

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The tables, not the projections or architecture weights."""
        return [self.weight]

    @torch.no_grad()
    def begin_stage(self, stage: str, validation_auc: Callable[[], float]) -> dict[str, Any]:
        """Fix each field's argmax candidate (narrowed to the budget) and drop the others."""
        if stage != "retrain":
            raise ValueError(f"autodim has no stage {stage!r} (stages: {self.stages})")
        log_weights = torch.log_softmax(self.alpha / self.temperature, dim=1)
        choice, size = fit_choice(log_weights, self.rows, self.candidates, self.dim, self.budget)
        self.choice.copy_(torch.tensor(choice))
        self.searched.fill_(True)
        self.weight.mul_(self.column_candidate == self.choice[self.row_feature()][:, None])
        names = self.features.sparse_names
        return {
            "argmax_widths": {n: self.candidates[int(i)] for n, i in zip(names, widest_argmax(log_weights), strict=True)},
            "widths": {n: self.candidates[i] for n, i in zip(names, choice, strict=True)},
            "architecture_weights": {n: [round(float(p), 4) for p in row] for n, row in zip(names, log_weights.exp(), strict=True)},
            "stored_parameters": size,
        }  # fmt: skip

    def row_feature(self) -> Tensor:
        """The field of every table row (each field's rows are one contiguous region)."""
        return torch.repeat_interleave(self.slot_feature, self.slot_size)

    def num_parameters(self) -> int:
        """Stored words of the retrained table at the current choice (see the module docstring)."""
        return sum(
            field_cost(n, self.candidates[int(i)], self.dim) for n, i in zip(self.rows, self.choice, strict=True)
        )

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        dim: int = DEFAULT_DIM,
        candidates: Sequence[int] = DEFAULT_CANDIDATES,
        **options,
    ) -> Self:
        """The search supernet; its retrained table is bound to `budget` (BudgetError below the narrowest choice)."""
        require_one_width(features, "autodim.from_budget projects every feature to dim")
        rows = vocabulary_sizes(features.sparse_names, vocabularies).values()
        floor = sum(field_cost(n, min(candidates), dim) for n in rows)
        if budget < floor:
            raise BudgetError(
                f"autodim needs at least {floor:,} parameters (every feature at width {min(candidates)} with its "
                f"projection); budget {budget:,}"
            )
        return cls(features, vocabularies, budget, dim=dim, candidates=candidates, **options)
