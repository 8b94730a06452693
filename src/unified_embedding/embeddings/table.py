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

`storage="int8"` or `"int4"` (every table method takes it, e.g. `--method-option
storage=int8`) stores rows as integer codes with a float32 scale per row (quantization.py):
the forward then gathers the touched rows once, fake-quantises them, and pools them; the
budget of such a table is read as 4*budget bytes, for every subclass at once, by wrapping
each subclass's `from_budget` (`__init_subclass__`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unified_embedding.batch import Batch
from unified_embedding.embeddings.base import EmbeddingMethod, Vocabularies, as_tensor, require_dense, uniform_init
from unified_embedding.embeddings.quantization import (
    Storage,
    check_storage,
    fake_quantize_rows,
    sized_in_bytes,
    table_bytes,
)
from unified_embedding.features import FeatureSet, Pooling
from unified_embedding.fused import RowOptimizer, RowOptimizerKind, fused_embedding_bag
from unified_embedding.hashing import keys_to_rows, salt, salted_keys
from unified_embedding.memory import zeros_on_huge_pages

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


def feature_region(feature: str, base: int, size: int, chunks: int, *, vocabulary: bool) -> tuple[list[Slot], int]:
    """Slots of a feature that owns `size` wide rows of `chunks` chunks each, from row `base`.

    All chunks of a wide row share one salt, so they move together: chunk j of index r is
    row base + chunks * r + j. Returns the slots and the number of table rows used.
    """
    feature_salt = salt(feature, 0)
    slots = [Slot(feature, feature_salt, base + j, chunks, size, vocabulary) for j in range(chunks)]
    return slots, size * chunks


def slot_values(batch: Batch, names: Sequence[str], slot_feature: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every (slot, example, value) id in slot-major order, the [S*B+1] bag offsets, and each id's slot.

    Slot s reads feature names[slot_feature[s]]; bag s*B + b holds that feature's ids of example b.
    (Slot-major is TorchRec's KeyedJaggedTensor order, one key per slot.)
    """
    batch_size, device = batch.batch_size, batch.values.device
    if batch.single_valued:  # no offsets to follow
        by_feature = batch.values.view(len(batch.keys), batch_size)
        slots = slot_feature.numel()
        if batch.keys != tuple(names) or slots != len(names) or not bool((slot_feature == torch.arange(slots)).all()):
            by_feature = by_feature[[_key_position(batch.keys, name) for name in names]][slot_feature]
        bag_offsets = torch.arange(slots * batch_size + 1, device=device)
        slot_of = torch.arange(slots, device=device).repeat_interleave(batch_size)
        return by_feature.reshape(-1), bag_offsets, slot_of
    offsets = batch.feature_offsets()
    if batch.keys != tuple(names):
        offsets = offsets[[_key_position(batch.keys, name) for name in names]]
    per_slot = offsets[slot_feature]  # [S, B+1]
    counts = per_slot[:, -1] - per_slot[:, 0]
    slot_starts = torch.cumsum(counts, 0) - counts
    slot_of = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    position = torch.arange(slot_of.numel(), device=device) - (slot_starts - per_slot[:, 0])[slot_of]
    bag_offsets = (per_slot[:, :-1] - per_slot[:, :1] + slot_starts[:, None]).reshape(-1)
    bag_offsets = torch.cat([bag_offsets, counts.sum().reshape(1)])
    return batch.values[position], bag_offsets, slot_of


def example_major(bag_offsets: Tensor, slots: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """Reorder slot-major bags (s*B + b) to example-major (b*S + s): the lookup order and new offsets.

    Pooling in example-major order writes each example's slots side by side, so the pooled
    [B*S, d] rows already are the [B, S*d] output: permuting the int64 lookups is far cheaper
    than transposing the float output.
    """
    device = bag_offsets.device
    total = int(bag_offsets[-1])
    lengths = torch.diff(bag_offsets).view(slots, batch_size).t().reshape(-1)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    starts = bag_offsets[:-1].view(slots, batch_size).t().reshape(-1)
    order = torch.repeat_interleave(starts - offsets[:-1], lengths, output_size=total)
    return order + torch.arange(total, device=device), offsets


def _key_position(keys: tuple[str, ...], name: str) -> int:
    try:
        return keys.index(name)
    except ValueError:
        raise KeyError(f"the batch has no sparse feature {name!r}; it has {', '.join(keys)}") from None


class SlotTableEmbedding(EmbeddingMethod):
    """A [num_rows, chunk_dim] table read through slots; subclasses only choose the slots."""

    #: True when a subclass's `read_rows` changes the rows it reads (so the forward must call it)
    transforms_rows: ClassVar[bool] = False
    #: False when a subclass stores only float32 rows (it prunes or searches which to keep)
    quantisable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "from_budget" in vars(cls):
            cls.from_budget = classmethod(sized_in_bytes(vars(cls)["from_budget"].__func__))

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
        storage: Storage = "fp32",
    ) -> None:
        super().__init__(features)
        self.storage = check_storage(storage)
        if storage != "fp32" and not self.quantisable:
            raise ValueError(f"{self.name} stores float32 rows; quantised storage is not supported")
        require_dense(self, sparse)
        names = features.sparse_names
        slot_features = [s.feature for s in slots]
        if slot_features != sorted(slot_features, key=names.index) or set(slot_features) != set(names):
            raise ValueError("slots must cover every sparse feature, grouped in feature order")
        self.chunk_dim = chunk_dim
        self.sparse = sparse
        self.row_optimizer: RowOptimizer | None = None
        self.weight = nn.Parameter(zeros_on_huge_pages(num_rows, chunk_dim))
        self.init_scale = init_scale
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
        self._build_wide_rows(slots, num_rows)

    def _build_wide_rows(self, slots: Sequence[Slot], num_rows: int) -> None:
        """Which slot holds chunk 0 of each slot's wide row (`feature_region`), and how many wide rows there are.

        Quantised storage keeps one scale per wide row (a feature's whole vector), not per chunk.
        """
        leaders: list[int] = []
        self.num_wide_rows = num_rows
        for i, s in enumerate(slots):
            lead = leaders[-1] if leaders else 0
            first = slots[lead]
            same_row = (first.feature, first.salt, first.stride, first.size) == (s.feature, s.salt, s.stride, s.size)
            if i and same_row and 0 < s.base - first.base == i - lead < s.stride:
                leaders.append(lead)
                self.num_wide_rows -= s.size  # its rows are chunks of the leader's rows
            else:
                leaders.append(i)
        self._chunked = leaders != list(range(len(slots)))
        self.register_buffer("slot_leader", torch.tensor(leaders, dtype=torch.int64), persistent=False)

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
        values, bag_offsets, slot_of = slot_values(batch, self.features.sparse_names, self.slot_feature)
        if batch.single_valued:  # values are [S, B]: per-slot settings broadcast instead of being gathered
            values = values.view(self.slot_feature.numel(), batch.batch_size)

            def per_lookup(setting: Tensor) -> Tensor:
                return setting[:, None]
        else:

            def per_lookup(setting: Tensor) -> Tensor:
                return setting[slot_of]

        keys = salted_keys(values, per_lookup(self.slot_salt))
        size = per_lookup(self.slot_size)
        index = keys_to_rows(keys, size)
        if self._has_vocabulary:
            index = torch.where(per_lookup(self.slot_vocabulary), self._vocabulary_lookup(keys, size), index)
        rows = index.mul_(per_lookup(self.slot_stride)).add_(per_lookup(self.slot_base))
        return rows.view(-1), bag_offsets, slot_of

    def _vocabulary_lookup(self, keys: Tensor, size: Tensor) -> Tensor:
        """Each key's vocabulary index, or its slot's last index (size - 1) when it has none."""
        table = self.vocabulary_keys
        position = torch.searchsorted(table, keys).clamp_(max=max(table.numel() - 1, 0))
        found = table[position] == keys
        return torch.where(found, self.vocabulary_index[position], size - 1)

    def fuse_optimizer(self, kind: RowOptimizerKind, lr: float, **options) -> list[RowOptimizer]:
        """Update the table inside backward (fused.py); the caller's torch optimizer must skip `weight`."""
        if self.storage != "fp32" or self.transforms_rows or self.sparse:
            raise ValueError(
                f"{self.name}: the fused update needs a plain float32 table read as stored "
                f"(storage={self.storage!r}, sparse={self.sparse})"
            )
        self.row_optimizer = RowOptimizer(kind, self.weight, lr, **options)
        return [self.row_optimizer]

    def forward(self, batch: Batch) -> Tensor:
        rows, bag_offsets, slot_of = self.slot_rows(batch)
        slots, batch_size = self.slot_feature.numel(), batch.batch_size
        reads_table = self.storage == "fp32" and not self.transforms_rows
        if batch.single_valued and reads_table:  # one row per bag: transposing the rows is the reorder
            example_rows, offsets, weights = rows.view(slots, batch_size).t().reshape(-1), bag_offsets, None
        else:
            order, offsets = example_major(bag_offsets, slots, batch_size)
            weights = self._mean_weights(bag_offsets, batch_size)[order] if self._any_mean else None
            example_rows = rows[order]
        if self.row_optimizer is not None:
            pooled = fused_embedding_bag(
                example_rows, offsets, self.row_optimizer, weights, one_per_bag=batch.single_valued
            )
        elif reads_table:
            pooled = F.embedding_bag(
                example_rows, self.weight, offsets, mode="sum", per_sample_weights=weights,
                include_last_offset=True, sparse=self.sparse,
            )  # fmt: skip
        else:  # pool the rows as read (gathered once, then quantised or transformed)
            table = self.read_rows(rows, slot_of, bag_offsets)
            pooled = F.embedding_bag(
                order, table, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True
            )
        return pooled.view(batch_size, -1)

    def read_rows(self, rows: Tensor, slot_of: Tensor, bag_offsets: Tensor) -> Tensor:
        """Table rows `rows` (read by slots `slot_of`) as the model sees them: [len(rows), chunk_dim].

        Fake-quantised under int8/int4 storage, so training sees what a deployment reads.
        """
        gathered = F.embedding(rows, self.weight, sparse=self.sparse)
        if self.storage == "fp32":
            return gathered
        wide_rows = self._wide_row_of(slot_of, bag_offsets) if self._chunked else None
        return fake_quantize_rows(gathered, self.storage, wide_rows)

    def _wide_row_of(self, slot_of: Tensor, bag_offsets: Tensor) -> Tensor:
        """For every row read, the position (in `rows`) of chunk 0 of the same wide row.

        Every chunk slot of a feature reads the feature's ids in the same order, so the k-th
        row of a chunk slot and the k-th row of its leader slot belong to one wide row.
        """
        num_slots = self.slot_feature.numel()
        starts = bag_offsets[torch.arange(num_slots, device=slot_of.device) * ((bag_offsets.numel() - 1) // num_slots)]
        position = torch.arange(slot_of.numel(), device=slot_of.device) - starts[slot_of]
        return starts[self.slot_leader[slot_of]] + position

    def num_bytes(self) -> int:
        """The table as stored (float32, or codes plus a scale per wide row), plus 4 bytes per other word
        `num_parameters` counts (so a subclass that counts what it stores differently, pruned weights
        or an id map, needs no override here)."""
        others = self.num_parameters() - self.weight.numel()
        return table_bytes(self.weight.numel(), self.num_wide_rows, self.storage) + 4 * others

    def _mean_weights(self, bag_offsets: Tensor, batch_size: int) -> Tensor:
        """1/len for each value of a mean-pooled bag (an empty bag stays a zero vector)."""
        lengths = torch.diff(bag_offsets)
        scale = 1.0 / lengths.clamp(min=1).to(self.weight.dtype)
        is_mean = self.slot_mean.repeat_interleave(batch_size)
        scale = torch.where(is_mean, scale, torch.ones_like(scale))
        return torch.repeat_interleave(scale, lengths)
