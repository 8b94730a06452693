"""OptEmbed (Lyu et al., "OptEmbed: Learning Optimal Embedding Table for Click-through Rate
Prediction", CIKM 2022, arXiv 2208.04482), held to a budget on the retrained table.

`full`'s collisionless table of width D, trained in two stages, with a search in between:

1. "supernet": a row is read only while its L1 norm exceeds its field's learnable threshold
   t_f (the unit step's gradient passed straight through, so t_f learns from the task loss;
   the paper's regulariser `sparsity` * sum_f exp(-t_f) pushes thresholds up). Each training
   batch samples a width w_f uniformly from 1..D per field and reads only the first w_f
   dimensions of the field's rows, so every narrower width is trained as a sub-network of
   the one table (the supernet). It is validated at full width.
2. the search, at the start of "retrain" (`begin_stage`): an evolutionary search of the
   per-field widths (random initial population plus the uniform fallback below; the best
   `parents` candidates breed by uniform crossover and per-field mutation), each candidate
   scored by the network's validation AUC with the supernet's weights.
3. "retrain": the found widths and kept rows fixed (buffers, so checkpoints restore them);
   pruned rows and dimensions beyond a field's width read zero, the kept ones train on from
   the supernet's weights.

The budget. The paper has none; here the retrained table must fit it. A candidate's stored
size is sum over kept rows of their field's width, plus the index that says which rows are
kept: one int32 row position per kept row or a bitmap over all N rows, whichever is smaller
(none when every row is kept). When the rows above their thresholds do not fit at a
candidate's widths, every field's threshold is raised by the same amount, the smallest that
fits (rows are dropped by their margin over their threshold, smallest first), so every
candidate the search scores fits and the search trades widths against rows on validation AUC.
The chosen shift is added to the thresholds, so after the search a row is kept exactly when
its L1 norm exceeds its field's threshold.

Counting. `num_parameters()` is the stored size of the table the method would deploy from
its current state: after the search, the retrained table (exact); before it, the fallback
that every search candidate must beat: every row kept at the widest uniform width within the
budget (what `full` would store). The supernet itself is training state: a D-wide table and
F thresholds, which may exceed the budget. Because the fallback must fit, the smallest budget
is one column per vocabulary row, as for `full`.

The model sees D columns per field throughout (out_dims never change): narrower widths read
as zero columns, which is what a deployment pads them with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Self

import torch
from torch import Tensor, nn

from unified_embedding.embeddings.base import BudgetError, Vocabularies, register, require_one_width
from unified_embedding.embeddings.full import DEFAULT_DIM, FullEmbedding, vocabulary_sizes
from unified_embedding.features import FeatureSet

#: weight of the threshold regulariser sum_f exp(-t_f) in the training loss
DEFAULT_SPARSITY = 1e-4
#: evolutionary search: candidates per generation, generations, and the best kept as parents
DEFAULT_POPULATION = 16
DEFAULT_GENERATIONS = 8
DEFAULT_PARENTS = 6
#: probability that a child's field width is redrawn
DEFAULT_MUTATION = 0.1
WORD_BITS = 32


def row_index_words(kept: int, total: int) -> int:
    """32-bit words saying which of `total` rows are kept: positions or a bitmap, the smaller; none if all are."""
    return 0 if kept >= total else min(kept, math.ceil(total / WORD_BITS))


def rows_within_budget(margins: Tensor, costs: Tensor, budget: int) -> tuple[Tensor, int]:
    """The rows kept under `budget`: those with positive margin, largest margin first, while they fit.

    Returns a bool mask over rows and the stored size (values plus row index).
    """
    order = torch.argsort(margins, descending=True, stable=True)
    above = int((margins > 0).sum())
    spent = torch.cumsum(costs[order], 0)
    counts = torch.arange(1, len(order) + 1)
    index = torch.where(counts >= len(order), 0, torch.minimum(counts, torch.tensor(-(-len(order) // WORD_BITS))))
    fits = (spent + index <= budget) & (counts <= above)
    kept_count = int(fits.nonzero().max()) + 1 if bool(fits.any()) else 0
    kept = torch.zeros_like(margins, dtype=torch.bool)
    kept[order[:kept_count]] = True
    size = (int(spent[kept_count - 1]) if kept_count else 0) + row_index_words(kept_count, len(order))
    return kept, size


@register
class OptEmbedding(FullEmbedding):
    """`full` with learned per-field row-pruning thresholds and searched per-field widths."""

    name = "optembed"
    dense_only_because = "trains its thresholds with dense gradients"
    #: its search or pruning decides which float32 weights are stored; codes would need their own
    quantisable = False
    description = (
        "OptEmbed: learned row-pruning thresholds, per-field widths by evolutionary search, then retrain in budget"
    )
    paper = "Lyu et al., OptEmbed: Learning Optimal Embedding Table for Click-through Rate Prediction, CIKM 2022"
    stages = ("supernet", "retrain")
    transforms_rows = True

    def __init__(
        self,
        features: FeatureSet,
        vocabularies: Vocabularies,
        budget: int,
        dim: int = DEFAULT_DIM,
        *,
        sparsity: float = DEFAULT_SPARSITY,
        population: int = DEFAULT_POPULATION,
        generations: int = DEFAULT_GENERATIONS,
        parents: int = DEFAULT_PARENTS,
        mutation: float = DEFAULT_MUTATION,
        **table_options,
    ) -> None:
        require_one_width(features, f"optembed searches widths within one table of width {dim}", ValueError, dim=dim)
        if not (population >= 2 and generations >= 1 and 1 <= parents <= population and 0 <= mutation <= 1):
            raise ValueError(
                "optembed needs population >= 2, generations >= 1, 1 <= parents <= population, mutation in [0, 1]"
            )
        super().__init__(features, vocabularies, dim=dim, **table_options)
        rows = self.weight.shape[0]
        fallback = min(dim, budget // rows)
        if fallback < 1:
            raise BudgetError(
                f"optembed needs at least {rows:,} parameters (one column per vocabulary row); budget {budget:,}"
            )
        self.budget, self.dim, self.sparsity = budget, dim, sparsity
        self.population, self.generations, self.parents, self.mutation = population, generations, parents, mutation
        self.threshold = nn.Parameter(torch.zeros(len(features.sparse)))
        self.register_buffer(
            "row_feature", torch.repeat_interleave(self.slot_feature, self.slot_size), persistent=False
        )
        # Persistent: the deployed (retrained) structure, and whether the search has fixed it.
        self.register_buffer("widths", torch.full((len(features.sparse),), fallback, dtype=torch.int64))
        self.register_buffer("kept", torch.ones(rows, dtype=torch.bool))
        self.register_buffer("searched", torch.zeros((), dtype=torch.bool))

    # ---------------------------------------------------------------- forward

    def read_rows(self, rows: Tensor, slot_of: Tensor, bag_offsets: Tensor) -> Tensor:
        gathered = super().read_rows(rows, slot_of, bag_offsets)
        feature = self.slot_feature[slot_of]
        if bool(self.searched):
            keep, widths = self.kept[rows].to(gathered.dtype), self.widths
        else:
            margin = gathered.abs().sum(dim=1) - self.thresholds()[feature]
            keep = (margin > 0).to(gathered.dtype)
            if self.training:  # straight through the unit step: d keep / d margin = 1
                keep = keep + margin - margin.detach()
            widths = self._sampled_widths() if self.training else torch.full_like(self.widths, self.dim)
        columns = torch.arange(self.dim, device=gathered.device) < widths[feature][:, None]
        return gathered * keep[:, None] * columns

    def thresholds(self) -> Tensor:
        """t_f, at least 0: a norm is never negative, so a negative threshold keeps every row, as 0 does.

        Without the floor, the field whose threshold the task loss drove below zero (Frappe's
        items, to -0.22) kept all its rows whatever the budget's shift, and the shift pruned
        every row of the small fields instead (val AUC 0.9434 after retrain).
        """
        return self.threshold.clamp(min=0)

    def _sampled_widths(self) -> Tensor:
        """One width per field, uniform in 1..D: this batch's sub-network of the supernet."""
        return torch.randint(1, self.dim + 1, self.widths.shape, device=self.widths.device)

    def extra_loss(self) -> Tensor | None:
        """The paper's push on thresholds, sum_f exp(-t_f), during the supernet stage only."""
        if bool(self.searched) or not self.sparsity:
            return None
        return self.sparsity * torch.exp(-self.threshold).sum()

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The table, not the thresholds."""
        return [self.weight]

    # ---------------------------------------------------------------- search

    @torch.no_grad()
    def margins(self) -> Tensor:
        """Each row's L1 norm over its field's threshold (full width): positive rows are kept."""
        return self.weight.abs().sum(dim=1) - self.thresholds()[self.row_feature]

    @torch.no_grad()
    def fit(self, widths: Tensor) -> tuple[Tensor, int]:
        """The kept rows and stored size of a candidate: rows above threshold, cut to the budget."""
        return rows_within_budget(self.margins(), widths[self.row_feature], self.budget)

    @torch.no_grad()
    def begin_stage(self, stage: str, validation_auc: Callable[[], float]) -> dict[str, Any]:
        """Search the widths on validation AUC, fix them and the kept rows, zero the rest."""
        if stage != "retrain":
            raise ValueError(f"optembed has no stage {stage!r} (stages: {self.stages})")
        best, scores = self._evolve(validation_auc)
        kept, size = self.fit(best)
        margins = self.margins()
        shift = self._threshold_shift(margins, kept)
        self.threshold.copy_(self.thresholds() + shift)
        self.widths.copy_(best)
        self.kept.copy_(kept)
        self.searched.fill_(True)
        columns = torch.arange(self.dim) < best[self.row_feature][:, None]
        self.weight.mul_(columns & kept[:, None])
        names = self.features.sparse_names
        return {
            "widths": {name: int(best[f]) for f, name in enumerate(names)},
            "kept_rows": {name: int(kept[self.row_feature == f].sum()) for f, name in enumerate(names)},
            "pruned_rows": {name: int((~kept)[self.row_feature == f].sum()) for f, name in enumerate(names)},
            "threshold_shift": shift,
            "stored_parameters": size,
            "search_val_auc": scores[tuple(best.tolist())],
            "candidates_evaluated": len(scores),
        }

    @staticmethod
    def _threshold_shift(margins: Tensor, kept: Tensor) -> float:
        """The common raise of every threshold that keeps exactly `kept`: halfway to the best dropped row."""
        if bool(kept.all()) or not bool(kept.any()):
            return 0.0
        lowest_kept, highest_dropped = float(margins[kept].min()), float(margins[~kept].max())
        return max(0.0, (lowest_kept + highest_dropped) / 2)

    def _evolve(self, validation_auc: Callable[[], float]) -> tuple[Tensor, dict[tuple[int, ...], float]]:
        """The best widths found, and every scored candidate's validation AUC."""
        fields = self.widths.numel()
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        scores: dict[tuple[int, ...], float] = {}

        def score(candidate: Tensor) -> float:
            key = tuple(candidate.tolist())
            if key not in scores:
                self.kept.copy_(self.fit(candidate)[0])
                self.widths.copy_(candidate)
                scores[key] = validation_auc()
            return scores[key]

        def random_widths(count: int) -> list[Tensor]:
            return list(torch.randint(1, self.dim + 1, (count, fields), generator=generator))

        fallback = self.widths.clone()
        self.searched.fill_(True)  # score candidates as they would be retrained
        population = [fallback, *random_widths(self.population - 1)]
        for generation in range(self.generations):
            ranked = sorted(population, key=score, reverse=True)
            if generation + 1 == self.generations:
                break
            parents = ranked[: self.parents]
            children = []
            for _ in range(self.population - self.parents):
                pick = torch.randint(len(parents), (2,), generator=generator)
                mix = torch.rand(fields, generator=generator) < 0.5
                child = torch.where(mix, parents[int(pick[0])], parents[int(pick[1])])
                redraw = torch.rand(fields, generator=generator) < self.mutation
                children.append(torch.where(redraw, random_widths(1)[0], child))
            population = parents + children
        self.searched.fill_(False)
        best = max(scores, key=scores.get)
        return torch.tensor(best, dtype=torch.int64), scores

    # ---------------------------------------------------------------- size

    @torch.no_grad()
    def num_parameters(self) -> int:
        """Stored words of the deployed table: kept rows at their field's width, plus the row index."""
        kept = int(self.kept.sum())
        values = int(self.widths[self.row_feature][self.kept].sum())
        return values + row_index_words(kept, self.kept.numel())

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
        """The supernet at width `dim`; its search is bound to `budget` (see the module docstring)."""
        require_one_width(features, "optembed.from_budget searches widths up to dim")
        rows = sum(vocabulary_sizes(features.sparse_names, vocabularies).values())
        if budget < rows:
            raise BudgetError(
                f"optembed needs at least {rows:,} parameters (one column per vocabulary row); budget {budget:,}"
            )
        return cls(features, vocabularies, budget, dim=dim, **options)
