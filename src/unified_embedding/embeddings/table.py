"""The shared machinery of every method that stores rows in one table: slots and one gather.

A *slot* is one chunk of one feature's output: feature f with output width k_f * d owns
k_f slots. Each slot maps a value id to an index r in [0, size), by hashing or by an exact
vocabulary lookup (with a last, out-of-vocabulary index), and reads row
`base + stride * r` of a single [num_rows, d] table. With that one rule:

- per-feature collisionless tables (`full`) are vocabulary slots over disjoint regions,
- the hashing trick (`hashing`) is hashed slots over disjoint regions,
- feature multiplexing and Unified Embedding are hashed slots over one shared region with
  a different salt per (feature, probe),

and every method's forward is the same single vectorised pass: expand ids to slots, hash
(or look up), and one `embedding_bag` over all slots, features and examples at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unified_embedding.batch import Batch
from unified_embedding.embeddings.base import EmbeddingMethod, Vocabularies, as_tensor, uniform_init
from unified_embedding.features import FeatureSet, Pooling
from unified_embedding.hashing import keys_to_rows, salt, salted_keys

#: Uniform(-0.05, 0.05): the scale used by Google's Unified Embedding tutorial and Keras'
#: default embedding initialiser; trains well with Adam at lr 1e-3 on our datasets.
DEFAULT_INIT_SCALE = 0.05


@dataclass(frozen=True)
class Slot:
    """One chunk of one feature: which rows it may read and how it picks one."""

    feature: str
    salt: int
    base: int
    stride: int
    size: int
    vocabulary: bool


def feature_region(
    feature: str, base: int, size: int, chunks: int, *, vocabulary: bool
) -> tuple[list[Slot], int]:
    """Slots of a feature that owns `size` wide rows of `chunks` chunks each, from row `base`.

    All chunks of a wide row share one salt, so they move together: chunk j of index r is
    row base + chunks * r + j. Returns the slots and the number of table rows used.
    """
    feature_salt = salt(feature, 0)
    slots = [Slot(feature, feature_salt, base + j, chunks, size, vocabulary) for j in range(chunks)]
    return slots, size * chunks


class SlotTableEmbedding(EmbeddingMethod):
    """A [num_rows, chunk_dim] table read through slots; subclasses only choose the slots."""

    def __init__(
        self,
        features: FeatureSet,
        slots: Sequence[Slot],
        num_rows: int,
        chunk_dim: int,
        *,
        vocabularies: Vocabularies | None = None,
        init_scale: float = DEFAULT_INIT_SCALE,
        sparse: bool = False,
    ) -> None:
        super().__init__(features)
        names = features.sparse_names
        slot_features = [s.feature for s in slots]
        if slot_features != sorted(slot_features, key=names.index) or set(slot_features) != set(names):
            raise ValueError("slots must cover every sparse feature, grouped in feature order")
        self.chunk_dim = chunk_dim
        self.sparse = sparse
        self.weight = nn.Parameter(torch.empty(num_rows, chunk_dim))
        uniform_init(self.weight, init_scale)
        self._out_dims = {name: chunk_dim * slot_features.count(name) for name in names}
        index = {name: i for i, name in enumerate(names)}
        pooled_mean = {f.name for f in features.sparse if f.pooling is Pooling.MEAN}
        self.register_buffer("slot_feature", torch.tensor([index[s.feature] for s in slots]), persistent=False)
        self.register_buffer("slot_salt", torch.tensor([s.salt for s in slots], dtype=torch.int64), persistent=False)
        self.register_buffer("slot_base", torch.tensor([s.base for s in slots]), persistent=False)
        self.register_buffer("slot_stride", torch.tensor([s.stride for s in slots]), persistent=False)
        self.register_buffer("slot_size", torch.tensor([s.size for s in slots]), persistent=False)
        self.register_buffer("slot_vocabulary", torch.tensor([s.vocabulary for s in slots]), persistent=False)
        self.register_buffer("slot_mean", torch.tensor([s.feature in pooled_mean for s in slots]), persistent=False)
        self._any_mean = bool(pooled_mean)
        self._build_vocabulary_index(slots, vocabularies)
        for s in slots:
            if s.base < 0 or s.base + s.stride * (s.size - 1) >= num_rows:
                raise ValueError(f"slot of feature {s.feature!r} reads rows outside the table of {num_rows}")

    def _build_vocabulary_index(self, slots: Sequence[Slot], vocabularies: Vocabularies | None) -> None:
        """One sorted array of salted keys for every vocabulary feature: one searchsorted per batch."""
        keys, positions = [], []
        for name in dict.fromkeys(s.feature for s in slots if s.vocabulary):
            if vocabularies is None or name not in vocabularies:
                raise ValueError(f"feature {name!r} needs a vocabulary (ids seen in the training split)")
            ids = torch.unique(as_tensor(vocabularies[name]))
            size = next(s.size for s in slots if s.feature == name)
            if ids.numel() + 1 != size:
                raise ValueError(f"feature {name!r}: vocabulary of {ids.numel()} ids needs {ids.numel() + 1} indices")
            keys.append(salted_keys(ids, torch.full_like(ids, salt(name, 0))))
            positions.append(torch.arange(ids.numel()))
        self._has_vocabulary = bool(keys)
        all_keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64)
        order = torch.argsort(all_keys)
        all_keys = all_keys[order]
        if all_keys.numel() > 1 and bool((all_keys[1:] == all_keys[:-1]).any()):
            raise ValueError("two vocabulary entries share a 64-bit key; rename a feature to change its salt")
        # Persistent: a checkpoint carries its vocabularies, so evaluation never re-derives them.
        self.register_buffer("vocabulary_keys", all_keys)
        self.register_buffer("vocabulary_index", (torch.cat(positions) if positions else all_keys)[order])

    @property
    def out_dims(self) -> dict[str, int]:
        return dict(self._out_dims)

    def slot_rows(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Rows read for every (slot, example, value), bag offsets of [S*B] bags, and slot of each row."""
        offsets = batch.feature_offsets()
        if batch.keys != self.features.sparse_names:
            offsets = offsets[[self._key_position(batch.keys, name) for name in self.features.sparse_names]]
        per_slot = offsets[self.slot_feature]  # [S, B+1]
        counts = per_slot[:, -1] - per_slot[:, 0]
        slot_starts = torch.cumsum(counts, 0) - counts
        slot_of = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        position = torch.arange(slot_of.numel(), device=counts.device) - (slot_starts - per_slot[:, 0])[slot_of]
        keys = salted_keys(batch.values[position], self.slot_salt[slot_of])
        index = keys_to_rows(keys, self.slot_size[slot_of])
        if self._has_vocabulary:
            index = torch.where(self.slot_vocabulary[slot_of], self._vocabulary_lookup(keys, slot_of), index)
        rows = self.slot_base[slot_of] + self.slot_stride[slot_of] * index
        bag_offsets = (per_slot[:, :-1] - per_slot[:, :1] + slot_starts[:, None]).reshape(-1)
        bag_offsets = torch.cat([bag_offsets, counts.sum().reshape(1)])
        return rows, bag_offsets, slot_of

    def _vocabulary_lookup(self, keys: Tensor, slot_of: Tensor) -> Tensor:
        table = self.vocabulary_keys
        position = torch.searchsorted(table, keys).clamp_(max=max(table.numel() - 1, 0))
        found = table[position] == keys
        return torch.where(found, self.vocabulary_index[position], self.slot_size[slot_of] - 1)

    @staticmethod
    def _key_position(keys: tuple[str, ...], name: str) -> int:
        try:
            return keys.index(name)
        except ValueError:
            raise KeyError(f"the batch has no sparse feature {name!r}; it has {', '.join(keys)}") from None

    def forward(self, batch: Batch) -> Tensor:
        rows, bag_offsets, _ = self.slot_rows(batch)
        weights = self._mean_weights(bag_offsets, batch.batch_size) if self._any_mean else None
        pooled = F.embedding_bag(
            rows, self.weight, bag_offsets, mode="sum", per_sample_weights=weights,
            include_last_offset=True, sparse=self.sparse,
        )  # fmt: skip
        slots = self.slot_feature.numel()
        return pooled.view(slots, batch.batch_size, self.chunk_dim).transpose(0, 1).reshape(batch.batch_size, -1)

    def _mean_weights(self, bag_offsets: Tensor, batch_size: int) -> Tensor:
        """1/len for each value of a mean-pooled bag (an empty bag stays a zero vector)."""
        lengths = torch.diff(bag_offsets)
        scale = 1.0 / lengths.clamp(min=1).to(self.weight.dtype)
        is_mean = self.slot_mean.repeat_interleave(batch_size)
        scale = torch.where(is_mean, scale, torch.ones_like(scale))
        return torch.repeat_interleave(scale, lengths)
