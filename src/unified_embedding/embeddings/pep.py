"""Plug-in Embedding Pruning, PEP (Liu et al., "Learnable Embedding Sizes for Recommender
Systems", ICLR 2021), held to an exact budget.

PEP keeps `full`'s collisionless table V but reads it through learnable soft thresholds,

    w = sign(v) * relu(|v| - g(s)),   g(s) = sigmoid(s)        (the paper's reparameterisation)

with s per feature or per (feature, dimension) (`granularity`; the paper's best is the
latter). Weights below their threshold are exactly zero, and s is trained by the task loss
alongside V, so each feature learns how many of its weights, and which, it can spare.

The budget. PEP reaches a sparsity by training, not by construction; to *end* within a
budget we add a hard cap: only the `keep` largest-magnitude effective weights of the whole
table are read, the rest are zeroed as well. During training `keep` falls from the whole
table to its final value over the first `prune_steps` training forwards (the cubic
schedule of Zhu & Gupta, 2017, so weights earn their place before the cut; the paper's
sparsity also grows gradually); in evaluation the cap is always the final `keep`. The cap's
mask is straight-through (Bengio et al., 2013): the forward reads the capped table, the
backward passes gradients to the capped-off weights too, so a weight that would help keeps
learning and can win its place back from one that stopped helping (weights under their soft
threshold still get no gradient, as in the paper; on frappe at 0.1x this lifted test AUC
from 0.9241 to 0.9435, on movielens-100k it moved it from 0.7651 to 0.7616). So every model
that is evaluated, checkpointed or deployed has at most `keep` non-zero weights, at any
epoch, whatever the thresholds learned: the budget holds by construction.

Counting (`num_parameters`): what a deployment stores is the non-zero effective weights,
one float32 each, plus where they are: one int32 position each, or a bitmap of the whole
table (one bit per weight, in 32-bit words), whichever is smaller. The thresholds are folded
into the stored values and are not stored. So num_parameters() = nnz + min(nnz, ceil(N/32))
32-bit words (num_bytes = 4x that), computed from the current weights with the final cap:
it never exceeds the budget, before or after training. The trainer's dense copy of V (N
floats) and s are training state, not the model's size; run.json's num_embedding_params,
taken after training, is the deployed count.

What to expect: Adam moves s by about the learning rate per step, so over the few hundred
steps of our small datasets g(s) stays near its initial value and the cap does most of the
pruning (global magnitude pruning of V through PEP's reparameterisation); the learned
thresholds matter over the long trainings of the paper. The cap ranks weights across the
whole table, so it may drop low-cardinality features wholesale when their weights are
small (frappe's daytime and weekday, without the straight-through mask); ranking each
weight against its own feature's RMS kept every feature but scored lower in a trial
(frappe 0.1x, before straight-through and the models' dropout: 0.9295 against 0.9332).

Retraining (`retrain=True`, the paper's lottery-ticket step): a second training stage,
"retrain", fixes the mask of the weights the first stage kept (the final cap's non-zeros),
restarts those weights from their original initial values (replayed from the generator's
state, initial.py, not stored) and trains them with the mask fixed and no thresholds; the
stored count is then the mask's non-zeros plus their positions, as before. It is off by
default: with DCNv2 at 0.1x it moved validation AUC from 0.9618 to 0.9617 on Frappe and from
0.7924 to 0.7949 on MovieLens-100K (test 0.9648 and 0.7803), while validation log loss got
worse on both (0.228 -> 0.266, 0.542 -> 0.545) and training took about twice as long.

Not reproduced: the paper's search over many target sparsities (one run here is one budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unified_embedding.embeddings.base import BudgetError, Vocabularies, register, require_one_width
from unified_embedding.embeddings.full import DEFAULT_DIM, FullEmbedding
from unified_embedding.embeddings.initial import capture_rng_state, replay_uniform
from unified_embedding.features import FeatureSet

Granularity = Literal["feature", "feature_dimension"]

#: Uniform(+-0.001): small, so a weight's magnitude when the cap ranks it reflects what training
#: taught it rather than its random draw (at `full`'s 0.05 the cap kept many untouched initial
#: weights of rare ids; frappe 0.1x test AUC 0.9399 at 0.05 against 0.9435 at 0.001)
DEFAULT_INIT_SCALE = 0.001
#: s at initialisation: g(s) = sigmoid(-12) ~ 6e-6, well under the init scale: PEP starts dense
DEFAULT_THRESHOLD_INIT = -12.0
#: training forwards over which the cap falls to `keep` (a few epochs of our small datasets)
DEFAULT_PRUNE_STEPS = 200
#: bits per word of the bitmap index
WORD_BITS = 32
#: whether the lottery-ticket retrain stage runs by default (off: see the module docstring)
RETRAIN_DEFAULT = False


def stored_words(kept: int, total: int) -> int:
    """32-bit words a deployment stores for `kept` non-zeros of `total` weights: values plus positions or bitmap."""
    return kept + min(kept, math.ceil(total / WORD_BITS))


def largest_keep(budget: int, total: int) -> int:
    """The most non-zeros (at most `total`) whose `stored_words` fit `budget`; 0 if none does."""
    bitmap = math.ceil(total / WORD_BITS)
    with_positions = min(budget // 2, bitmap, total)
    with_bitmap = min(budget - bitmap, total) if budget - bitmap > bitmap else 0
    return max(with_positions, with_bitmap)


def soft_threshold(weight: Tensor, threshold: Tensor) -> Tensor:
    """sign(v) * relu(|v| - t): exact zeros below the threshold, shrunk towards zero above it."""
    return torch.sign(weight) * F.relu(weight.abs() - threshold)


@register
class PEPEmbedding(FullEmbedding):
    """`full`'s table read through learned soft thresholds and a hard cap of `keep` non-zero weights."""

    name = "pep"
    dense_only_because = "trains its thresholds with dense gradients"
    #: its search or pruning decides which float32 weights are stored; codes would need their own
    quantisable = False
    description = (
        "learnable embedding pruning: full table with learned soft thresholds, capped at the budget's non-zeros"
    )
    paper = "Liu et al., Learnable Embedding Sizes for Recommender Systems, ICLR 2021"
    transforms_rows = True

    def __init__(
        self,
        features: FeatureSet,
        vocabularies: Vocabularies,
        keep: int,
        dim: int = DEFAULT_DIM,
        *,
        granularity: Granularity = "feature_dimension",
        prune_steps: int = DEFAULT_PRUNE_STEPS,
        threshold_init: float = DEFAULT_THRESHOLD_INIT,
        straight_through: bool = True,
        retrain: bool = RETRAIN_DEFAULT,
        **table_options,
    ) -> None:
        require_one_width(features, f"pep prunes one table of width {dim}", ValueError, dim=dim)
        if granularity not in ("feature", "feature_dimension"):
            raise ValueError(f"granularity must be 'feature' or 'feature_dimension', got {granularity!r}")
        if keep < 1 or prune_steps < 0:
            raise ValueError(f"pep needs keep >= 1 and prune_steps >= 0, got {keep} and {prune_steps}")
        table_options.setdefault("init_scale", DEFAULT_INIT_SCALE)
        initial_state = capture_rng_state()  # the table is the next draw (retrain replays it)
        super().__init__(features, vocabularies, dim=dim, **table_options)
        self.init_scale = table_options["init_scale"]
        if retrain:
            self.stages = ("train", "retrain")
            # Persistent: a checkpoint of the retrain stage carries its fixed mask and the stage.
            self.register_buffer("initial_state", initial_state)
            self.register_buffer("kept", torch.ones_like(self.weight, dtype=torch.bool))
            self.register_buffer("retraining", torch.zeros((), dtype=torch.bool))
        self.retrain = retrain
        self.keep = min(keep, self.weight.numel())
        self.prune_steps = prune_steps
        self.granularity = granularity
        self.straight_through = straight_through
        columns = dim if granularity == "feature_dimension" else 1
        self.threshold = nn.Parameter(torch.full((len(features.sparse), columns), float(threshold_init)))
        # Each feature's rows are one contiguous region (one slot per feature): row -> feature.
        self.register_buffer(
            "row_feature", torch.repeat_interleave(self.slot_feature, self.slot_size), persistent=False
        )
        # Training forwards so far: drives the cap's schedule, and resumes with a checkpoint.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    @property
    def in_retrain(self) -> bool:
        return self.retrain and bool(self.retraining)

    def effective_table(self) -> Tensor:
        """The whole table as read before the cap: sign(v) * relu(|v| - g(s)); in retrain, v on the fixed mask."""
        if self.in_retrain:
            return self.weight * self.kept
        return soft_threshold(self.weight, torch.sigmoid(self.threshold)[self.row_feature])

    def current_keep(self) -> int:
        """The cap now: `keep` in evaluation; falling cubically from the whole table during training."""
        if not self.training or self.prune_steps == 0:
            return self.keep
        remaining = max(0.0, 1 - int(self.step) / self.prune_steps)
        return self.keep + math.floor((self.weight.numel() - self.keep) * remaining**3)

    @torch.no_grad()
    def cutoff(self, keep: int) -> Tensor:
        """A magnitude such that at most `keep` effective weights of the table lie strictly above it."""
        magnitudes = self.effective_table().abs().flatten()
        drop = magnitudes.numel() - keep
        return magnitudes.new_zeros(()) if drop <= 0 else torch.kthvalue(magnitudes, drop).values

    def read_rows(self, rows: Tensor, slot_of: Tensor, bag_offsets: Tensor) -> Tensor:
        if self.in_retrain:
            return super().read_rows(rows, slot_of, bag_offsets) * self.kept[rows]
        thresholds = torch.sigmoid(self.threshold)[self.slot_feature[slot_of]]
        pruned = soft_threshold(super().read_rows(rows, slot_of, bag_offsets), thresholds)
        limit = self.cutoff(self.current_keep())
        if self.training:
            self.step += 1
        capped = pruned * (pruned.abs() > limit)
        # Straight through the cap (optional): weights below it still learn, and can win back a place.
        return pruned + (capped - pruned).detach() if self.straight_through else capped

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The table, not the learned thresholds."""
        return [p for p in self.parameters() if p is not self.threshold]

    @torch.no_grad()
    def begin_stage(self, stage: str, validation_auc: Callable[[], float]) -> dict[str, Any]:
        """Lottery ticket: fix the trained table's non-zeros as the mask and restart them from their initial values."""
        if stage != "retrain" or not self.retrain:
            raise ValueError(f"pep has no stage {stage!r} (stages: {self.stages})")
        kept = self.effective_table().abs() > self.cutoff(self.keep)
        self.kept.copy_(kept)
        self.weight.copy_(replay_uniform(self.initial_state, self.weight.shape, self.init_scale) * kept)
        self.retraining.fill_(True)
        rows_kept = kept.any(dim=1)
        names = self.features.sparse_names
        return {
            "kept_weights": int(kept.sum()),
            "pruned_weights": int((~kept).sum()),
            "kept_rows": {name: int(rows_kept[self.row_feature == f].sum()) for f, name in enumerate(names)},
            "pruned_rows": {name: int((~rows_kept)[self.row_feature == f].sum()) for f, name in enumerate(names)},
        }

    @torch.no_grad()
    def num_nonzero(self) -> int:
        """Non-zero weights of the deployed (evaluation-mode) table."""
        if self.in_retrain:
            return int(self.kept.sum())
        return int((self.effective_table().abs() > self.cutoff(self.keep)).sum())

    def num_parameters(self) -> int:
        """32-bit words a deployment stores: non-zeros plus their positions (or a bitmap); see the module docstring."""
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
        require_one_width(features, "pep.from_budget prunes one table of width dim")
        keep = largest_keep(budget, FullEmbedding.parameter_count(features, vocabularies, dim))
        if keep < 1:
            raise BudgetError(
                f"pep needs at least {stored_words(1, 1)} parameters (one weight and its position); budget {budget:,}"
            )
        return cls(features, vocabularies, keep, dim=dim, **options)
