"""AutoSrh (Kong et al., "AutoSrh: An Embedding Dimensionality Search Framework for Tabular
Data Prediction", TKDE 2022), with the retrained table held to a budget.

`full`'s collisionless table of width D. Each field's ids are split into `buckets` groups of
equal size by training-split frequency (most frequent first; the out-of-vocabulary row joins
the rarest), and the D dimensions into groups of `group_size`. Every (field, bucket,
dimension group) has a soft selection weight alpha, initialised to 1, that scales those
dimensions of those rows:

    e'_v = e_v * alpha[f, bucket(v)]      (expanded over each group's dimensions)

Stage "search" trains alpha with the task loss plus an L1 penalty, `sparsity` * sum |alpha|
(each weighted by the share of the table's rows it scales, so a weight over many rows must
earn more), which drives the weights of groups the model can spare towards zero. Stage
"retrain" prunes: (bucket, group) pairs are kept by importance per stored parameter, largest
first, while the stored table fits the budget (a pair that does not fit is skipped for
smaller ones: a knapsack's greedy fill), after one floor: every field keeps its most important
group in its most frequent bucket. A field's first dimension is worth far more than any
estimate from small changes says: without the floor, Frappe's item (4,082 ids, the feature its
labels turn on: negatives are other items in the same context) kept no dimension at 0.01x
and 0.03x, and the retrained model scored AUC 0.49 and 0.50. A budget below the floors is
refused, as `full` refuses one below a column per id.

A pair's importance is its saliency, (alpha * dL/dalpha)^2 summed over the search's steps
(Molchanov et al., 2019): the squared first-order estimate of the loss change if the pair were
pruned, an empirical-Fisher stand-in for the second-order change. Near a minimum the signed
first-order term averages out, so its magnitude |alpha * dL/dalpha| (Molchanov et al., 2017,
used before package 0.2.2) mostly measures gradient noise: at 0.1x it gave Frappe's item one
dimension, validation AUC 0.9290 (MovieLens-100K 0.7860), where the squared form gives it
five, 0.9422 (0.7931); at 0.3x, 0.9468 -> 0.9533 and 0.8010 -> 0.8004. Both beat |alpha|
alone: Adam moves alpha by about the learning rate per step, so over the few hundred steps
of our small datasets alpha stays within a few tenths of 1 and ranked pairs almost at random
(a Frappe trial pruned every dimension of the most frequent users), and the weights'
magnitudes do not compare across fields (ranking by |alpha| times mean |e| pruned every
item).

Alpha is folded into the kept weights and the pruned dimensions are zeroed, and the kept ones
train on with the selection fixed (a buffer, so checkpoints restore it). A bucket other than
a field's most frequent may keep no group: its ids then read zero vectors.

The frequency ranks come from the trainer (`uses_id_frequencies`, as for double_hash's
hybrid). Without them (from Python, `frequent_ids=None`) every id of a field is in its first
bucket: the search then selects dimension groups per field only.

Counting. The retrained table stores, for each (field, bucket), its rows at the width of its
kept groups; a deployment lays each field's rows out by frequency bucket, so it also stores
each bucket's row count (one word per field and bucket) and which groups each bucket keeps
(one bit per (field, bucket, group)). `num_parameters()` is that size for the current
selection: before the search, the greedy fit of uniform weights (frequent buckets, then lower
groups, first), and exactly the retrained size after it. The search's alpha is training state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Self

import numpy as np
import torch
from torch import Tensor, nn

from unified_embedding.embeddings.base import BudgetError, Vocabularies, as_tensor, register, require_one_width
from unified_embedding.embeddings.full import DEFAULT_DIM, FullEmbedding, vocabulary_sizes
from unified_embedding.features import FeatureSet

FrequentIds = Mapping[str, np.ndarray | Tensor]  # ids of a feature, most frequent first

DEFAULT_BUCKETS = 4
#: dimensions per selectable group: single dimensions, the finest choice, against pairs raised DCNv2's
#: validation AUC at 0.1x on Frappe (0.9379 -> 0.9398) and MovieLens-100K (0.7879 -> 0.7933)
DEFAULT_GROUP_SIZE = 1
#: weight of the L1 penalty on the selection weights during the search
DEFAULT_SPARSITY = 1e-3
WORD_BITS = 32


def row_buckets(names: list[str], vocabularies: Vocabularies, frequent_ids: FrequentIds | None, buckets: int) -> Tensor:
    """The frequency bucket of every row of `full`'s table (rows: each field's sorted vocabulary, then OOV)."""
    parts = []
    for name in names:
        ids = torch.unique(as_tensor(vocabularies[name]))
        bucket = torch.zeros(ids.numel() + 1, dtype=torch.int64)
        if frequent_ids is not None and name in frequent_ids:
            ranked = as_tensor(frequent_ids[name])
            position = torch.searchsorted(ids, ranked).clamp_(max=max(ids.numel() - 1, 0))
            known = ids[position] == ranked if ids.numel() else torch.zeros_like(ranked, dtype=torch.bool)
            rank = torch.full((ids.numel(),), ids.numel(), dtype=torch.int64)  # ids never ranked: rarest
            rank[position[known]] = torch.arange(ranked.numel())[known]
            bucket[:-1] = torch.clamp(rank * buckets // max(ids.numel(), 1), max=buckets - 1)
            bucket[-1] = buckets - 1
        parts.append(bucket)
    return torch.cat(parts)


def overhead_words(cells: int, groups: int) -> int:
    """Words a deployment stores besides rows: a row count per (field, bucket) and a bitmap of kept groups."""
    return cells + math.ceil(cells * groups / WORD_BITS)


def floor_cells(cell_rows: Tensor, buckets: int) -> Tensor:
    """Each field's most frequent non-empty bucket: the cell that keeps a group whatever the ranking.

    Every field has one (its out-of-vocabulary row is in its last bucket).
    """
    filled = cell_rows.view(-1, buckets) > 0
    return torch.arange(filled.shape[0]) * buckets + filled.to(torch.int8).argmax(dim=1)


def floor_size(cell_rows: Tensor, buckets: int, groups: int, group_size: int) -> int:
    """The smallest selection: one group of every field's floor cell, plus bucket sizes and a bitmap."""
    rows = int(cell_rows[floor_cells(cell_rows, buckets)].sum())
    return overhead_words(cell_rows.numel(), groups) + rows * group_size


def select_groups(
    importance: Tensor, cell_rows: Tensor, buckets: int, group_size: int, budget: int
) -> tuple[Tensor, int]:
    """Kept [cells, groups] pairs and their size: each field's floor (the most important group of
    its most frequent bucket), then by importance (per parameter), largest first, each while it fits.

    Ties go to the earlier (cell, group): frequent buckets and lower groups first.
    """
    cells, groups = importance.shape
    size = floor_size(cell_rows, buckets, groups, group_size)
    costs = (cell_rows[:, None] * group_size).expand(cells, groups).reshape(-1)
    kept = torch.zeros(cells, groups, dtype=torch.bool)
    floors = floor_cells(cell_rows, buckets)
    kept[floors, importance[floors].argmax(dim=1)] = True
    kept = kept.view(-1)
    for pair in torch.argsort(-importance.reshape(-1), stable=True).tolist():
        if not kept[pair] and 0 < int(costs[pair]) <= budget - size:  # an empty bucket keeps nothing
            kept[pair] = True
            size += int(costs[pair])
    return kept.view(cells, groups), size


@register
class AutoSrhEmbedding(FullEmbedding):
    """`full` with soft selection of dimension groups per frequency bucket; pruned to the budget, retrained."""

    name = "autosrh"
    dense_only_because = "trains its selection weights with dense gradients"
    #: its search or pruning decides which float32 weights are stored; codes would need their own
    quantisable = False
    description = "AutoSrh: soft selection of dimension groups per frequency bucket, pruned to the budget, retrained"
    paper = "Kong et al., AutoSrh: An Embedding Dimensionality Search Framework for Tabular Data Prediction, TKDE 2022"
    stages = ("search", "retrain")
    transforms_rows = True
    uses_id_frequencies = True

    def __init__(
        self,
        features: FeatureSet,
        vocabularies: Vocabularies,
        budget: int,
        dim: int = DEFAULT_DIM,
        *,
        frequent_ids: FrequentIds | None = None,
        buckets: int = DEFAULT_BUCKETS,
        group_size: int = DEFAULT_GROUP_SIZE,
        sparsity: float = DEFAULT_SPARSITY,
        **table_options,
    ) -> None:
        require_one_width(features, f"autosrh selects dimensions of one table of width {dim}", ValueError, dim=dim)
        if buckets < 1 or group_size < 1 or dim % group_size:
            raise ValueError(
                f"autosrh needs buckets >= 1 and a group_size dividing dim {dim}, got {buckets}, {group_size}"
            )
        super().__init__(features, vocabularies, dim=dim, **table_options)
        self.budget, self.dim, self.buckets, self.group_size, self.sparsity = budget, dim, buckets, group_size, sparsity
        fields, groups = len(features.sparse), dim // group_size
        row_feature = torch.repeat_interleave(self.slot_feature, self.slot_size)
        # Persistent: which selection weight scales each row, from the training split's frequencies.
        self.register_buffer(
            "row_cell", row_feature * buckets + row_buckets(features.sparse_names, vocabularies, frequent_ids, buckets)
        )
        self.register_buffer("cell_rows", torch.bincount(self.row_cell, minlength=fields * buckets), persistent=False)
        smallest = floor_size(self.cell_rows, buckets, groups, group_size)
        if budget < smallest:
            raise BudgetError(f"autosrh needs at least {smallest:,} parameters (one dimension group of every "
                              f"field's most frequent bucket, plus bucket sizes and a group bitmap); budget {budget:,}")  # fmt: skip
        self.alpha = nn.Parameter(torch.ones(fields * buckets, groups))
        kept, _ = select_groups(self.alpha.detach(), self.cell_rows, buckets, group_size, budget)
        # Persistent: the retrain stage's selection, and whether the search has fixed it.
        self.register_buffer("kept", kept)
        self.register_buffer("searched", torch.zeros((), dtype=torch.bool))
        self.register_buffer("saliency", torch.zeros_like(self.alpha))

    def read_rows(self, rows: Tensor, slot_of: Tensor, bag_offsets: Tensor) -> Tensor:
        gathered = super().read_rows(rows, slot_of, bag_offsets)
        selection = self.kept.to(gathered.dtype) if bool(self.searched) else self.alpha
        return gathered * selection[self.row_cell[rows]].repeat_interleave(self.group_size, dim=1)

    def extra_loss(self) -> Tensor | None:
        """L1 on the selection weights during the search, each weighted by its share of the rows."""
        if bool(self.searched) or not self.sparsity:
            return None
        share = self.cell_rows.to(self.alpha.dtype) / self.cell_rows.sum()
        return self.sparsity * (self.alpha.abs() * share[:, None]).sum()

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The table, not the selection weights."""
        return [self.weight]

    @torch.no_grad()
    def after_step(self) -> None:
        """Accumulate each pair's saliency (alpha * dL/dalpha)^2 over the search's steps."""
        if not bool(self.searched) and self.alpha.grad is not None:
            self.saliency.add_((self.alpha * self.alpha.grad).square())

    @torch.no_grad()
    def begin_stage(self, stage: str, validation_auc: Callable[[], float]) -> dict[str, Any]:
        """Keep the most important (bucket, group) pairs that fit, fold alpha into them, zero the rest."""
        if stage != "retrain":
            raise ValueError(f"autosrh has no stage {stage!r} (stages: {self.stages})")
        per_parameter = self.saliency / (self.cell_rows.clamp(min=1)[:, None] * self.group_size)
        kept, size = select_groups(per_parameter, self.cell_rows, self.buckets, self.group_size, self.budget)
        self.kept.copy_(kept)
        self.searched.fill_(True)
        scale = (self.alpha * kept)[self.row_cell].repeat_interleave(self.group_size, dim=1)
        self.weight.mul_(scale)
        widths = (kept.sum(dim=1) * self.group_size).view(-1, self.buckets)
        rows = self.cell_rows.view(-1, self.buckets)
        names = self.features.sparse_names
        return {
            "widths": {name: widths[f].tolist() for f, name in enumerate(names)},
            "bucket_rows": {name: rows[f].tolist() for f, name in enumerate(names)},
            "stored_parameters": size,
        }

    def num_parameters(self) -> int:
        """Stored words of the retrained table at the current selection (see the module docstring)."""
        cells, groups = self.kept.shape
        values = int((self.kept.sum(dim=1) * self.cell_rows).sum()) * self.group_size
        return values + overhead_words(cells, groups)

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
        """The search table at width `dim`; its retrained selection is bound to `budget`."""
        require_one_width(features, "autosrh.from_budget selects dimensions of one width dim")
        vocabulary_sizes(features.sparse_names, vocabularies)  # a clear error for a missing vocabulary
        return cls(features, vocabularies, budget, dim=dim, **options)
