"""DeepLight's embedding pruning (Deng et al., "DeepLight: Deep Lightweight Feature
Interactions for Accelerating CTR Predictions in Ad Serving", WSDM 2021).

DeepLight trains a dense model and prunes it *gradually*: every few steps the smallest
weights by magnitude are masked out, the sparsity rising from zero to its target over a
schedule, so the remaining weights adapt to each cut before the next (the paper prunes the
embedding table, the DNN and the field-pair matrix this way; the embedding part is here).
A pruned weight is zero in the mask and in the table and gets no more gradient, so it stays
pruned: the mask only tightens. The schedule is the cubic one DeepLight uses (Zhu & Gupta,
2017): after t steps the table keeps

    keep_t = keep + (N - keep) * (1 - t / prune_steps) ** 3

of its N weights, updated every `prune_every` steps in `after_step`, reaching the target
`keep` (the budget's non-zeros) at `prune_steps`.

The budget at every evaluated point: until the schedule ends the training mask keeps more
than `keep` weights, so the evaluation-mode forward also caps the table at its `keep` largest
masked weights. Whatever epoch is evaluated, checkpointed or deployed, at most `keep` weights
are non-zero. Counting is PEP's (pep.py): non-zeros plus their positions or a bitmap of the
table, whichever is smaller, in 32-bit words, of the evaluation-mode table.

The table starts at a plain table's scale: the dense phase trains it before the first cuts
(PEP's smaller start, 0.001, scored validation AUC 0.9358 on frappe against 0.9436).
"""

from __future__ import annotations

import math
from typing import Self

import torch
from torch import Tensor, nn

from unified_embedding.embeddings.base import BudgetError, Vocabularies, register, uniform_init
from unified_embedding.embeddings.full import DEFAULT_DIM, FullEmbedding
from unified_embedding.embeddings.pep import largest_keep, stored_words
from unified_embedding.embeddings.per_id import PerIdEmbedding
from unified_embedding.embeddings.table import DEFAULT_INIT_SCALE
from unified_embedding.features import FeatureSet

#: optimizer steps until the target sparsity: many epochs of our small datasets (frappe has 68
#: steps an epoch, movielens-100k 78). Chosen on the validation splits (DCNv2, 0.1x), frappe /
#: movielens-100k: 200 steps 0.9436 / 0.7828, 500 steps 0.9507 / 0.7842, 1000 steps 0.9553 / 0.7923,
#: 2000 steps 0.9477 / 0.7695 (early stopping then picks epochs still far from the target, which the
#: evaluation-mode cap cuts at once)
DEFAULT_PRUNE_STEPS = 1000
#: steps between two cuts
DEFAULT_PRUNE_EVERY = 10


def scheduled_keep(keep: int, total: int, step: int, prune_steps: int) -> int:
    """Weights kept after `step` steps: cubic from `total` down to `keep` at `prune_steps`."""
    remaining = max(0.0, 1 - step / prune_steps) if prune_steps else 0.0
    return keep + math.floor((total - keep) * remaining**3)


def top_magnitudes(weights: Tensor, keep: int) -> Tensor:
    """Mask of (at most) the `keep` largest-magnitude non-zero weights."""
    magnitudes = weights.abs().flatten()
    drop = magnitudes.numel() - keep
    if drop <= 0:
        return weights != 0
    return (weights.abs() > torch.kthvalue(magnitudes, drop).values) & (weights != 0)


@register
class DeepLightEmbedding(PerIdEmbedding):
    """`full`'s table gradually magnitude-pruned to the budget's non-zeros; see the module docstring."""

    name = "deeplight"
    description = "gradual magnitude pruning of a full table to the budget's non-zeros (counted with their index)"
    paper = (
        "Deng et al., DeepLight: Deep Lightweight Feature Interactions for Accelerating CTR Predictions "
        "in Ad Serving, WSDM 2021"
    )

    def __init__(
        self,
        features: FeatureSet,
        vocabularies: Vocabularies,
        keep: int,
        dim: int = DEFAULT_DIM,
        *,
        prune_steps: int = DEFAULT_PRUNE_STEPS,
        prune_every: int = DEFAULT_PRUNE_EVERY,
        init_scale: float = DEFAULT_INIT_SCALE,
        sparse: bool = False,
    ) -> None:
        super().__init__(features, vocabularies, dim, sparse=sparse)
        if keep < 1 or prune_steps < 0 or prune_every < 1:
            raise ValueError(f"deeplight needs keep >= 1, prune_steps >= 0, prune_every >= 1; got "
                             f"{keep}, {prune_steps}, {prune_every}")  # fmt: skip
        self.weight = nn.Parameter(torch.empty(self.num_ids, dim))
        uniform_init(self.weight, init_scale)
        self.keep = min(keep, self.weight.numel())
        self.prune_steps, self.prune_every = prune_steps, prune_every
        # Persistent: the mask and the schedule's position resume with a checkpoint.
        self.register_buffer("mask", torch.ones(self.num_ids, dim, dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def masked(self) -> Tensor:
        return self.weight * self.mask

    def deployed(self) -> Tensor:
        """[N, dim] the table as evaluated and deployed: the masked table capped at `keep` non-zeros."""
        table = self.masked()
        return table * top_magnitudes(table.detach(), self.keep)

    def compose(self, index: Tensor, feature: Tensor) -> Tensor:
        ids = index + self.index_offset[feature]
        if self.training:
            return self.weight[ids] * self.mask[ids]
        return self.deployed()[ids]

    @torch.no_grad()
    def after_step(self) -> None:
        """Advance the schedule; every `prune_every` steps (and at its end) cut to its current keep."""
        self.step += 1
        step, end = int(self.step), max(self.prune_steps, 1)  # prune_steps=0: cut at once, after step 1
        if step <= end and (step % self.prune_every == 0 or step == end):
            keep = scheduled_keep(self.keep, self.weight.numel(), step, self.prune_steps)
            self.mask &= top_magnitudes(self.masked(), keep)
        self.weight.mul_(self.mask)  # pruned weights stay zero (Adam's momentum would revive them)

    @torch.no_grad()
    def num_nonzero(self) -> int:
        return int((self.deployed() != 0).sum())

    def num_parameters(self) -> int:
        """32-bit words a deployment stores: non-zeros plus their positions (or a bitmap), as pep counts."""
        return stored_words(self.num_nonzero(), self.weight.numel())

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
        """`full` at width `dim`, pruned to the most non-zeros whose storage fits the budget."""
        keep = largest_keep(budget, FullEmbedding.parameter_count(features, vocabularies, dim))
        if keep < 1:
            raise BudgetError(
                f"deeplight needs at least {stored_words(1, 1)} parameters (one weight and its position); "
                f"budget {budget:,}"
            )
        return cls(features, vocabularies, keep, dim=dim, **options)
