"""The machinery shared by the hash-sharing family: hash_embedding, hashednet, robe, double_hash.

Each of these methods stores its weights in one [num_rows, chunk_dim] table (chunk_dim is 1
for the methods that hash single coordinates: hashednet, robe) and builds every feature's
vector from two kinds of parts:

- a *probe* hashes every value of one feature once, under its own salt, to r in [0, size);
- a *lookup* turns its probe's r into one row of the table, row = base + stride * ((r + shift)
  mod size), and fills one chunk (chunk_dim columns) of its feature's vector with it.

Lookups come in `k` *summands*, each holding one lookup per output chunk, in output order:
chunk q of the output is the sum over summands of lookup (i, q), every value weighted by a
per-value scalar the method chooses (importance weights, random signs, or nothing), and a
multivalent feature's values pooled by sum or mean. The forward pass is, for every method,
one vectorised hash per probe and one pooled gather (`embedding_bag`) over all lookups,
features and examples.

`shared=False` gives every feature its own region of rows (split across features by
cardinality, like `hashing`); `shared=True` lets all features read one region, told apart
only by their salts (the multiplexed variant compared against in the Unified Embedding paper).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unified_embedding.batch import Batch
from unified_embedding.embeddings.base import BudgetError, EmbeddingMethod, Vocabularies, uniform_init
from unified_embedding.embeddings.composition import allocation_weights
from unified_embedding.embeddings.full import DEFAULT_DIM
from unified_embedding.embeddings.hashed import Allocation
from unified_embedding.embeddings.table import DEFAULT_INIT_SCALE
from unified_embedding.features import FeatureSet, Pooling
from unified_embedding.hashing import keys_to_rows, salt, salted_keys

__all__ = [
    "DEFAULT_DIM",
    "Allocation",
    "Expansion",
    "HashSharingEmbedding",
    "Layout",
    "allocation_shares",
    "common_chunk",
    "family_salt",
    "feature_widths",
    "flat_array_sizes",
    "random_signs",
    "region_sizes",
    "split_budget",
]


def family_salt(feature: str, *parts: object) -> int:
    """The salt of one hash of a feature, e.g. ("robe", 2) for its third block: stable forever."""
    return salt(feature, "/".join(str(part) for part in parts))  # type: ignore[arg-type]


def feature_widths(features: FeatureSet, dim: int) -> dict[str, int]:
    """Each sparse feature's output width: its FeatureSpec's `dim`, else `dim`."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    return {f.name: f.dim or dim for f in features.sparse}


def allocation_shares(features: FeatureSet, allocation: Allocation, method: str) -> dict[str, int]:
    """Integer shares of the budget per feature: cardinality + 1 ("proportional") or 1 ("equal")."""
    return {name: int(weight) for name, weight in allocation_weights(features, allocation, method).items()}


def split_budget(
    budget: int, weights: Mapping[str, int], units: Mapping[str, int], minimum: Mapping[str, int], *, method: str
) -> dict[str, int]:
    """Counts n_f (rows, or weights) per feature with sum(n_f * units[f]) <= budget, n_f >= minimum[f].

    What is left above the minimums is shared in proportion to `weights` (exact integer
    arithmetic, floors first), then the leftover goes one unit at a time to the features with
    the largest remainders until no unit fits: less than min(units) of the budget is unused.
    """
    floor = sum(minimum[name] * units[name] for name in weights)
    if budget < floor:
        raise BudgetError(f"{method} needs at least {floor:,} parameters here; budget {budget:,}")
    spare, total = budget - floor, sum(weights.values())
    if total < 1:
        raise ValueError("allocation weights must sum to at least 1")
    counts, remainders = {}, {}
    for name, weight in weights.items():
        whole, part = divmod(spare * weight, total * units[name])
        counts[name] = minimum[name] + whole
        remainders[name] = part / (total * units[name])
    left = budget - sum(counts[name] * units[name] for name in counts)
    order = sorted(counts, key=lambda name: remainders[name], reverse=True)
    while any(units[name] <= left for name in order):
        for name in order:
            if units[name] <= left:
                counts[name] += 1
                left -= units[name]
    return counts


@dataclass(frozen=True)
class Probe:
    """One hash of every value of `feature`: r = hash(value, salt) mod size."""

    feature: str
    salt: int
    size: int


@dataclass(frozen=True)
class Lookup:
    """One chunk of one feature's vector: row base + stride * ((r + shift) mod size) of a probe's r."""

    probe: int
    base: int
    stride: int = 1
    shift: int = 0


class Layout:
    """Probes, lookups and table rows of a method, built feature by feature, chunk by chunk.

    Lookups must be added to every summand in output order: all chunks of the first feature,
    then the next feature's, and so on.
    """

    def __init__(self, features: FeatureSet, summands: int) -> None:
        if summands < 1:
            raise ValueError(f"a method needs at least one summand, got {summands}")
        self.features = features
        self.probes: list[Probe] = []
        self.summands: list[list[Lookup]] = [[] for _ in range(summands)]
        self.num_rows = 0

    def region(self, rows: int) -> int:
        """The first row of `rows` new rows at the end of the table."""
        if rows < 1:
            raise ValueError(f"a region needs at least one row, got {rows}")
        base = self.num_rows
        self.num_rows += rows
        return base

    def probe(self, feature: str, size: int, *salt_parts: object) -> int:
        if size < 1:
            raise ValueError(f"feature {feature!r}: a hash needs at least one bucket, got {size}")
        self.probes.append(Probe(feature, family_salt(feature, *salt_parts), int(size)))
        return len(self.probes) - 1

    def read(self, summand: int, probe: int, base: int, stride: int = 1, shift: int = 0) -> None:
        self.summands[summand].append(Lookup(probe, base, stride, shift))

    def read_rows(
        self, summand: int, feature: str, tag: str, base: int, size: int, parts: int, *, shared: bool
    ) -> None:
        """Fill `parts` consecutive chunks of `feature` from a hashed table of `size` rows at `base`.

        A table of the feature's own (`shared=False`) has rows `parts` chunks wide that move
        together, like one row of the hashing trick; a table shared by features of different
        widths has one-chunk rows, so each chunk is hashed on its own.
        """
        if shared and parts > 1:
            for j in range(parts):
                self.read(summand, self.probe(feature, size, tag, j), base)
        else:
            probe = self.probe(feature, size, tag)
            for j in range(parts):
                self.read(summand, probe, base + j, parts)


@dataclass
class Expansion:
    """Every (lookup, value) pair of a batch, and the hashes behind them.

    `values` lists the batch's sparse values feature by feature in the method's feature order
    (`value_offsets[f, b]` is where example b of feature f starts). Probe entries (one per
    probe and value) and lookup entries (one per lookup and value) are both ordered probe by
    probe (lookup by lookup), each over all its feature's values in that order.
    """

    batch_size: int
    values: Tensor  # [V]
    value_feature: Tensor  # [V] feature index of each value
    value_offsets: Tensor  # [F, B+1] into values
    keys: Tensor  # [probe entries] salted 64-bit key of every probe's values
    buckets: Tensor  # [probe entries] r in [0, size) of every probe's values
    lookup_of: Tensor  # [E] lookup of each entry
    entry_probe: Tensor | None  # [E] probe entry of each entry; None where the two coincide
    occurrence_shift: Tensor  # [L] occurrence of entry e is occurrence_shift[lookup_of[e]] + e
    bag_offsets: Tensor  # [L*B + 1]: bag (lookup l, example b) is entries bag_offsets[l*B+b]:...
    cache: dict = field(default_factory=dict)  # what a method computes once per batch and reuses

    def per_entry(self, probe_values: Tensor) -> Tensor:
        """A tensor over probe entries (keys, buckets) read for every lookup entry."""
        return probe_values if self.entry_probe is None else probe_values[self.entry_probe]

    @cached_property
    def occurrence(self) -> Tensor:
        """[E] index into `values` of each entry."""
        entries = torch.arange(self.lookup_of.numel(), device=self.lookup_of.device)
        return self.occurrence_shift[self.lookup_of] + entries


class HashSharingEmbedding(EmbeddingMethod):
    """Base of the hash-sharing methods: a [num_rows, chunk_dim] table read through a `Layout`.

    Subclasses build the layout and may override `rows_and_weights` (rows and per-entry
    weights of every entry) and `finish` (the [B, W] output, before it is returned).
    """

    def __init__(
        self,
        features: FeatureSet,
        layout: Layout,
        chunk_dim: int,
        *,
        init_scale: float = DEFAULT_INIT_SCALE,
        sparse: bool = False,
    ) -> None:
        super().__init__(features)
        names = features.sparse_names
        summands = layout.summands
        if any(len(lookups) != len(summands[0]) for lookups in summands):
            raise ValueError("every summand needs one lookup per output chunk")
        probes = layout.probes
        index = {name: i for i, name in enumerate(names)}
        columns = [probes[lookup.probe].feature for lookup in summands[0]]
        for lookups in summands[1:]:
            if [probes[lookup.probe].feature for lookup in lookups] != columns:
                raise ValueError("the summands of an output chunk must belong to the same feature")
        if columns != sorted(columns, key=index.__getitem__) or set(columns) != set(names):
            raise ValueError("lookups must cover every sparse feature, grouped in feature order")
        for lookups in summands:
            for lookup in lookups:
                size = probes[lookup.probe].size
                if lookup.base < 0 or lookup.shift < 0 or lookup.base + lookup.stride * (size - 1) >= layout.num_rows:
                    raise ValueError(f"a lookup of feature {probes[lookup.probe].feature!r} reads outside the table")
        self.chunk_dim = chunk_dim
        self.sparse = sparse
        self.num_rows = layout.num_rows
        self.weight = nn.Parameter(torch.empty(layout.num_rows, chunk_dim))
        uniform_init(self.weight, init_scale)
        self._summands, self._columns = len(summands), len(columns)
        self._out_dims = {name: chunk_dim * columns.count(name) for name in names}

        lookups = [lookup for group in summands for lookup in group]
        first_column = {name: columns.index(name) for name in names}
        chunk = [q - first_column[name] for q, name in enumerate(columns)] * len(summands)
        pooled_mean = [f.pooling is Pooling.MEAN for f in features.sparse]
        probe_feature = torch.tensor([index[p.feature] for p in probes], dtype=torch.int64)
        lookup_probe = torch.tensor([lookup.probe for lookup in lookups], dtype=torch.int64)

        def buffer(name: str, values) -> None:
            self.register_buffer(name, torch.as_tensor(values), persistent=False)

        buffer("probe_feature", probe_feature)
        buffer("probe_salt", torch.tensor([p.salt for p in probes], dtype=torch.int64))
        buffer("probe_size", torch.tensor([p.size for p in probes], dtype=torch.int64))
        buffer("lookup_probe", lookup_probe)
        buffer("lookup_feature", probe_feature[lookup_probe])
        buffer("lookup_size", self.probe_size[lookup_probe])
        buffer("lookup_base", torch.tensor([lookup.base for lookup in lookups], dtype=torch.int64))
        buffer("lookup_stride", torch.tensor([lookup.stride for lookup in lookups], dtype=torch.int64))
        buffer("lookup_shift", torch.tensor([lookup.shift for lookup in lookups], dtype=torch.int64))
        buffer("lookup_chunk", torch.tensor(chunk, dtype=torch.int64))
        buffer("lookup_summand", torch.arange(len(lookups), dtype=torch.int64) // len(columns))
        buffer("feature_mean", torch.tensor(pooled_mean, dtype=torch.bool))
        self._any_shift = any(lookup.shift for lookup in lookups)
        self._unit_stride = all(lookup.stride == 1 for lookup in lookups)
        # Lookup l reads probe l: lookup entries and probe entries are then the same list.
        self._probe_per_lookup = [lookup.probe for lookup in lookups] == list(range(len(probes)))
        self._any_mean = any(pooled_mean)

    @property
    def out_dims(self) -> dict[str, int]:
        return dict(self._out_dims)

    # ----------------------------------------------------------------------------- forward

    def expand(self, batch: Batch) -> Expansion:
        """Hash every probe's values and list every (lookup, value) entry with its bag."""
        names = self.features.sparse_names
        offsets = batch.feature_offsets()
        if batch.keys != names:
            offsets = offsets[[self._key_position(batch.keys, name) for name in names]]
        first = offsets[:, 0]
        counts = offsets[:, -1] - first
        starts = torch.cumsum(counts, 0) - counts
        device = counts.device
        value_feature = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
        if batch.keys[: len(names)] == names:
            values = batch.values[: int(counts.sum())]  # already feature-major in our order
        else:
            values = batch.values[torch.arange(value_feature.numel(), device=device) + (first - starts)[value_feature]]

        probe_counts = counts[self.probe_feature]
        probe_starts = torch.cumsum(probe_counts, 0) - probe_counts
        probe_of = torch.repeat_interleave(torch.arange(probe_counts.numel(), device=device), probe_counts)
        entries = torch.arange(probe_of.numel(), device=device)
        keys = salted_keys(
            values[(starts[self.probe_feature] - probe_starts)[probe_of] + entries], self.probe_salt[probe_of]
        )
        buckets = keys_to_rows(keys, self.probe_size[probe_of])

        lookup_counts = counts[self.lookup_feature]
        lookup_starts = torch.cumsum(lookup_counts, 0) - lookup_counts
        lookup_of = torch.repeat_interleave(torch.arange(lookup_counts.numel(), device=device), lookup_counts)
        if self._probe_per_lookup:
            entry_probe = None
        else:
            entries = torch.arange(lookup_of.numel(), device=device)
            entry_probe = (probe_starts[self.lookup_probe] - lookup_starts)[lookup_of] + entries
        per_lookup = offsets[self.lookup_feature]
        bag_offsets = (per_lookup[:, :-1] - per_lookup[:, :1] + lookup_starts[:, None]).reshape(-1)
        return Expansion(
            batch_size=batch.batch_size,
            values=values,
            value_feature=value_feature,
            value_offsets=offsets - (first - starts)[:, None],
            keys=keys,
            buckets=buckets,
            lookup_of=lookup_of,
            entry_probe=entry_probe,
            occurrence_shift=starts[self.lookup_feature] - lookup_starts,
            bag_offsets=torch.cat([bag_offsets, lookup_counts.sum().reshape(1)]),
        )

    def rows_and_weights(self, x: Expansion) -> tuple[Tensor, Tensor | None]:
        """Table row of every entry and its weight (None: all ones)."""
        lookup = x.lookup_of
        bucket = x.per_entry(x.buckets)
        if self._any_shift:
            bucket = (bucket + self.lookup_shift[lookup]) % self.lookup_size[lookup]
        if not self._unit_stride:
            bucket = bucket * self.lookup_stride[lookup]
        return bucket + self.lookup_base[lookup], None

    def finish(self, output: Tensor, x: Expansion) -> Tensor:
        return output

    def forward(self, batch: Batch) -> Tensor:
        x = self.expand(batch)
        rows, weights = self.rows_and_weights(x)
        if self._any_mean:
            scale = self._mean_scale(x.bag_offsets, self.feature_mean[self.lookup_feature], x.batch_size)
            weights = scale if weights is None else weights * scale
        pooled = self._pool(rows, weights, x.bag_offsets)
        pooled = pooled.view(self._summands, self._columns, x.batch_size, self.chunk_dim).sum(0)
        output = pooled.permute(1, 0, 2).reshape(x.batch_size, self._columns * self.chunk_dim)
        return self.finish(output, x)

    def _pool(self, rows: Tensor, weights: Tensor | None, bag_offsets: Tensor) -> Tensor:
        """[bags, chunk_dim]: the weighted sum of each bag's rows."""
        if self.chunk_dim == 1 and not self.sparse and rows.device.type == "cpu":
            # One-float rows (hashednet, robe): on CPU, embedding_bag's dense backward sorts all
            # indices and is ~5x slower than a gather whose backward is a scatter-add.
            values = self.weight.view(-1)[rows]
            values = values if weights is None else values * weights
            lengths = torch.diff(bag_offsets)
            bags = torch.repeat_interleave(torch.arange(lengths.numel(), device=rows.device), lengths)
            return torch.zeros(lengths.numel(), dtype=values.dtype).index_add_(0, bags, values).unsqueeze(1)
        return F.embedding_bag(
            rows, self.weight, bag_offsets, mode="sum", per_sample_weights=weights,
            include_last_offset=True, sparse=self.sparse,
        )  # fmt: skip

    def _mean_scale(self, bag_offsets: Tensor, bag_group_mean: Tensor, batch_size: int) -> Tensor:
        """Per entry: 1/len of its bag where the feature is mean-pooled, else 1."""
        lengths = torch.diff(bag_offsets)
        scale = 1.0 / lengths.clamp(min=1).to(self.weight.dtype)
        scale = torch.where(bag_group_mean.repeat_interleave(batch_size), scale, torch.ones_like(scale))
        return torch.repeat_interleave(scale, lengths)

    @staticmethod
    def _key_position(keys: tuple[str, ...], name: str) -> int:
        try:
            return keys.index(name)
        except ValueError:
            raise KeyError(f"the batch has no sparse feature {name!r}; it has {', '.join(keys)}") from None


def common_chunk(widths: Mapping[str, int]) -> int:
    """The widest chunk every feature's width is a multiple of."""
    return math.gcd(*widths.values())


def region_sizes(features: FeatureSet, size: int | Mapping[str, int], shared: bool, what: str) -> dict[str, int]:
    """`what` per feature: one int for every feature (or for the one shared region), or a mapping."""
    names = features.sparse_names
    if isinstance(size, Mapping):
        if shared:
            raise ValueError(f"a shared {what} has one size; got a mapping per feature")
        sizes = {name: size.get(name, 0) for name in names}
    else:
        sizes = dict.fromkeys(names, size)
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"feature {name!r}: {what} must be a positive integer, got {value!r}")
    return sizes


def random_signs(keys: Tensor, dtype: torch.dtype) -> Tensor:
    """+1 or -1 from a salted key's lowest bit (the bucket comes from a further mixing round)."""
    return (1 - 2 * (keys & 1)).to(dtype)


def flat_array_sizes(
    features: FeatureSet, budget: int, *, shared: bool, allocation: Allocation, method: str
) -> int | dict[str, int]:
    """Weights of a flat array per feature (split like `hashing`), or of the one shared array: all of `budget`."""
    if shared:
        if budget < 1:
            raise BudgetError(f"{method} needs at least 1 parameter; budget {budget:,}")
        return budget
    names = features.sparse_names
    ones = dict.fromkeys(names, 1)
    return split_budget(budget, allocation_shares(features, allocation, method), ones, ones, method=method)


class FlatArrayEmbedding(HashSharingEmbedding):
    """HashedNet and ROBE: single weights of one flat array (or one per feature), with random signs.

    Both spend exactly the budget (the array is as long as the budget allows) and differ only
    in which positions a vector's coordinates read.
    """

    signed: bool

    def rows_and_weights(self, x: Expansion) -> tuple[Tensor, Tensor | None]:
        rows, _ = super().rows_and_weights(x)
        return rows, random_signs(x.per_entry(x.keys), self.weight.dtype) if self.signed else None

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        dim: int = DEFAULT_DIM,
        shared: bool = False,
        allocation: Allocation = "proportional",
        **options,
    ) -> Self:
        """Exactly `budget` weights: one array, or one per feature split by cardinality (or equally)."""
        feature_widths(features, dim)
        size = flat_array_sizes(features, budget, shared=shared, allocation=allocation, method=cls.name)
        return cls(features, size, dim, shared=shared, **options)
