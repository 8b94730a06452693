"""Collisionless tables: one exact row per training-split value of each feature."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, Self, get_args

import torch
from torch import Tensor

from unified_embedding.batch import Batch
from unified_embedding.embeddings.base import BudgetError, Vocabularies, register, require_one_width, uniform_init
from unified_embedding.embeddings.table import Slot, SlotTableEmbedding, feature_region, slot_values
from unified_embedding.features import FeatureSet
from unified_embedding.hashing import salted_keys
from unified_embedding.memory import zeros_on_huge_pages

#: What `full` does with an id its vocabulary lacks: read the feature's one OOV row, or give it
#: a row of its own the first time a training batch shows it (streaming; memory grows).
Unseen = Literal["oov", "grow"]

DEFAULT_DIM = 16


def vocabulary_sizes(names: Sequence[str], vocabularies: Vocabularies | None) -> dict[str, int]:
    """Rows per feature: its training-split values plus one out-of-vocabulary row."""
    missing = [name for name in names if vocabularies is None or name not in vocabularies]
    if missing:
        raise ValueError(f"no vocabulary (the ids seen in the training split) for features {missing}")
    return {name: len(vocabularies[name]) + 1 for name in names}


@register
class FullEmbedding(SlotTableEmbedding):
    """One collisionless table per feature; ids unseen in training share one OOV row.

    Every feature has the same width `dim` unless its FeatureSpec sets `dim`; widths must
    then share a common divisor, the chunk width of the single underlying table.

    With ``unseen="grow"`` a training forward first gives every id it has no row for a new
    row (initialised like the others) at the end of the table, so a stream's new users get
    rows of their own, as a production system that rebuilds its vocabularies would. Rows
    are allocated in doubling steps (the optimizer's state follows, see `Optimizers`); what
    is counted is the rows in use, which grow past the budget the table was built for: that
    is the memory the choice costs, reported, not hidden. Evaluation never adds rows.
    """

    name = "full"
    description = "collisionless table per feature with one out-of-vocabulary row (the uncompressed baseline)"

    def __init__(
        self, features: FeatureSet, vocabularies: Vocabularies, dim: int = DEFAULT_DIM, *, unseen: Unseen = "oov",
        **table_options,
    ) -> None:  # fmt: skip
        if unseen not in get_args(Unseen):
            raise ValueError(f"unseen must be one of {', '.join(get_args(Unseen))}, got {unseen!r}")
        sizes = vocabulary_sizes(features.sparse_names, vocabularies)
        widths = {f.name: f.dim or dim for f in features.sparse}
        slots, rows, chunk = collisionless_layout(sizes, widths)
        super().__init__(features, slots, rows, chunk, vocabularies=vocabularies, **table_options)
        self.unseen = unseen
        self.grows = unseen == "grow"
        if self.grows and (len(slots) != len(sizes) or self.storage != "fp32" or self.sparse):
            raise ValueError("full with unseen='grow' needs one width for all features, float32 storage, no sparse")
        if self.grows:
            self.register_buffer("rows_used", torch.tensor(rows))

    def fuse_optimizer(self, kind, lr: float, **options):
        if self.grows:
            raise ValueError(
                "full with unseen='grow' reallocates its table, which a fused row optimizer owns; drop fused"
            )
        return super().fuse_optimizer(kind, lr, **options)

    def forward(self, batch: Batch) -> Tensor:
        if self.grows and self.training:
            self._add_rows_for_unseen(batch)
        return super().forward(batch)

    @torch.no_grad()
    def _add_rows_for_unseen(self, batch: Batch) -> None:
        values, _, slot_of = slot_values(batch, self.features.sparse_names, self.slot_feature)
        keys = salted_keys(values, self.slot_salt[slot_of])
        position = torch.searchsorted(self.vocabulary_keys, keys).clamp_(max=self.vocabulary_keys.numel() - 1)
        unseen = self.vocabulary_keys[position] != keys
        if not bool(unseen.any()):
            return
        new_keys, first = _first_occurrences(keys[unseen])
        new_slots = slot_of[unseen][first]
        used = int(self.rows_used)
        rows = torch.arange(used, used + new_keys.numel())
        self._reserve(used + new_keys.numel())
        keys = torch.cat([self.vocabulary_keys, new_keys])
        index = torch.cat([self.vocabulary_index, rows - self.slot_base[new_slots]])  # row = index + base
        order = torch.argsort(keys)
        self.vocabulary_keys, self.vocabulary_index = keys[order], index[order]
        self.rows_used.fill_(used + new_keys.numel())

    def _reserve(self, rows: int) -> None:
        """Room for `rows` rows, doubling the allocation (in place: the Parameter stays the same object)."""
        capacity = self.weight.shape[0]
        if rows <= capacity:
            return
        grown = zeros_on_huge_pages(max(rows, 2 * capacity), self.weight.shape[1])
        grown[:capacity] = self.weight.detach()
        uniform_init(grown[capacity:], self.init_scale)
        self.weight.data = grown

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A checkpoint of a grown table is larger than the table built from the vocabulary: resize first."""
        if self.grows:
            with torch.no_grad():
                self.weight.data = torch.empty_like(state_dict[prefix + "weight"])
            for name in ("vocabulary_keys", "vocabulary_index"):
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def num_parameters(self) -> int:
        """Rows in use (not the allocation's headroom) times their width."""
        return int(self.rows_used) * self.chunk_dim if self.grows else super().num_parameters()

    @staticmethod
    def parameter_count(features: FeatureSet, vocabularies: Vocabularies, dim: int = DEFAULT_DIM) -> int:
        """Size of the full method without building it: the reference for `--budget 0.25x`."""
        sizes = vocabulary_sizes(features.sparse_names, vocabularies)
        return sum(size * (features.get(name).dim or dim) for name, size in sizes.items())

    @classmethod
    def from_budget(
        cls, features: FeatureSet, budget: int, *, vocabularies: Vocabularies | None = None, **options
    ) -> Self:
        """The widest uniform `dim` that fits: full cannot share rows, so it can only get narrower."""
        require_one_width(features, "full.from_budget chooses one width for all features")
        rows = sum(vocabulary_sizes(features.sparse_names, vocabularies).values())
        dim = budget // rows
        if dim < 1:
            raise BudgetError(
                f"full needs at least {rows:,} parameters (one column per vocabulary row); budget {budget:,}"
            )
        return cls(features, vocabularies, dim=dim, **options)


def collisionless_layout(sizes: Mapping[str, int], widths: Mapping[str, int]) -> tuple[list[Slot], int, int]:
    """Slots, row count and chunk width of one table holding every feature's vocabulary in rows of its own.

    Widths become whole chunks of their gcd, so features of different widths share one table
    without sharing a row.
    """
    chunk = math.gcd(*widths.values())
    slots, rows = [], 0
    for name, size in sizes.items():
        region, used = feature_region(name, rows, size, widths[name] // chunk, vocabulary=True)
        slots += region
        rows += used
    return slots, rows, chunk


def _first_occurrences(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct keys in order of first appearance, and where each first appears."""
    distinct, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((distinct.numel(),), keys.numel(), dtype=torch.int64).scatter_reduce_(
        0, inverse, torch.arange(keys.numel()), "amin"
    )
    order = torch.argsort(first)
    return distinct[order], first[order]
