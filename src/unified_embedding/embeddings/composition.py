"""What the composition and factorisation methods (qr, tt_rec, low_rank, pq) share.

These methods do not store one row per value: they build a value's vector from a few
learned pieces (two partial rows, three tensor-train cores, a narrow row and a
projection). They share one pipeline, `ComposedEmbedding`:

1. every (feature, value) gets an *index* h_f(v) mod N_f in the feature's index range
   [0, N_f), by the library's salted hash (no vocabulary, so ids never seen in training are
   handled by construction). With `shared=True` all features hash into one range with
   their own salts: the multiplexed variant of Coleman et al. (2023);
2. the method builds the vector of each *distinct* (feature, index) the batch reads
   (`compose`): a batch's ids repeat heavily (frappe: ~10k values, ~2k distinct), and the
   backward of a composition (batched matrix products for tt_rec) costs per vector built;
3. those vectors are pooled per (feature, example) bag, sum or mean as the feature asks,
   in one `embedding_bag` that reads them as a small table, and the method may map the
   pooled bags once more (`project`: linear maps commute with pooling).

The index range N_f is the method's own capacity (q*m for qr, n1*n2*n3 for tt_rec, the
narrow table's rows for low_rank), sized by the budget, so every stored parameter can be
reached and the budget never pays for rows no index reads. (pq is rows of one table, so it
is a `SlotTableEmbedding` and uses only the budget helpers below.)
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from unified_embedding.batch import Batch
from unified_embedding.embeddings.base import EmbeddingMethod, require_one_width
from unified_embedding.embeddings.table import slot_values
from unified_embedding.features import FeatureSet, Pooling
from unified_embedding.hashing import hash_to_rows, salt

Allocation = Literal["sqrt", "proportional", "equal"]


@dataclass(frozen=True)
class Bags:
    """A batch's ids grouped by feature (FeatureSet order), then by example."""

    values: Tensor  # [V] int64 ids
    feature: Tensor  # [V] position of each value's feature in the FeatureSet's sparse features
    offsets: Tensor  # [F*B + 1] bag f*B + b (feature f of example b) is values[offsets[i]:offsets[i+1]]


def feature_bags(batch: Batch, names: Sequence[str]) -> Bags:
    """The batch's values of features `names`, in that order, with their bag offsets (one slot per feature)."""
    values, offsets, feature = slot_values(batch, names, torch.arange(len(names), device=batch.values.device))
    return Bags(values, feature, offsets)


def pool(table: Tensor, rows: Tensor, bags: Bags, mean: Tensor, batch_size: int) -> Tensor:
    """[F, B, W]: bag sums (means, for features flagged in `mean`) of `table` [U, W] rows `rows` [V].

    An empty bag (a multivalent feature with no values) pools to zeros.
    """
    lengths = torch.diff(bags.offsets)
    scale = torch.where(mean.repeat_interleave(batch_size), 1.0 / lengths.clamp(min=1), 1.0).to(table.dtype)
    pooled = F.embedding_bag(
        rows, table, bags.offsets, mode="sum", per_sample_weights=torch.repeat_interleave(scale, lengths),
        include_last_offset=True,
    )  # fmt: skip
    return pooled.view(mean.numel(), batch_size, table.shape[1])


class ComposedEmbedding(EmbeddingMethod):
    """Hashed index per (feature, value) -> `compose` -> pooled bags -> `project`.

    Every feature's output has the same width `dim`; subclasses own the parameters and
    the per-feature layout of their pieces (`index_sizes[f]` is feature f's index range).
    """

    def __init__(self, features: FeatureSet, index_sizes: Sequence[int], dim: int, *, shared: bool) -> None:
        super().__init__(features)
        check_uniform_width(features, dim)
        if len(index_sizes) != len(features.sparse) or min(index_sizes) < 1:
            raise ValueError(f"every sparse feature needs an index range of at least 1, got {list(index_sizes)}")
        self.dim = dim
        self.shared = check_shared(shared)
        names = features.sparse_names
        self.register_buffer(
            "feature_salt", torch.tensor([salt(n, 0) for n in names], dtype=torch.int64), persistent=False
        )
        self.register_buffer("index_size", torch.tensor(list(index_sizes), dtype=torch.int64), persistent=False)
        # start of each feature's indices in one key space (all 0 when shared)
        offsets = regions(list(index_sizes), shared)[0]
        self.register_buffer("index_offset", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        mean = [f.pooling is Pooling.MEAN for f in features.sparse]
        self.register_buffer("feature_mean", torch.tensor(mean, dtype=torch.bool), persistent=False)

    @property
    def out_dims(self) -> dict[str, int]:
        return {name: self.dim for name in self.features.sparse_names}

    def indices(self, bags: Bags) -> Tensor:
        """h_f(v) mod N_f for every value: the index the method composes a vector for."""
        return hash_to_rows(bags.values, self.feature_salt[bags.feature], self.index_size[bags.feature])

    def forward(self, batch: Batch) -> Tensor:
        bags = feature_bags(batch, self.features.sparse_names)
        # one key per distinct vector: shared features with equal indices read the same one
        keys = self.indices(bags) + self.index_offset[bags.feature]
        unique, rows = torch.unique(keys, return_inverse=True)
        feature = torch.searchsorted(self.index_offset, unique, right=True) - 1
        table = self.compose(unique - self.index_offset[feature], feature)
        pooled = self.project(pool(table, rows, bags, self.feature_mean, batch.batch_size))
        return pooled.transpose(0, 1).reshape(batch.batch_size, -1)

    @abstractmethod
    def compose(self, index: Tensor, feature: Tensor) -> Tensor:
        """[U, W] vectors of indices `index` [U] of features `feature` [U].

        With `shared=True` every feature reads the same pieces, and `feature` is any one of them.
        """

    def project(self, pooled: Tensor) -> Tensor:
        """[F, B, dim] from the pooled [F, B, W] vectors; identity when `compose` is already `dim` wide."""
        return pooled


def factor_std(init_scale: float, factors: int, terms: int = 1) -> float:
    """Std of each of `factors` equal-scale Gaussian factors whose products, summed over
    `terms`, have the std of a plain table row's Uniform(-init_scale, init_scale) start.

    A product of k independent zero-mean factors of std sigma, summed over M terms, has std
    sqrt(M) * sigma^k. Equal scales matter under Adam, whose steps have about the same size
    for every parameter: a factor that started near 1 next to one near 0.03 would barely
    move relative to its size, and the composition would train like its small factor alone.
    """
    return (init_scale / math.sqrt(3) / math.sqrt(terms)) ** (1 / factors)


def check_uniform_width(features: FeatureSet, dim: int) -> None:
    """These methods give every feature the same width; a FeatureSpec asking otherwise is an error."""
    if dim < 1:
        raise ValueError(f"dim must be at least 1, got {dim}")
    require_one_width(features, f"this method gives every feature width {dim}", ValueError, dim=dim)


def check_shared(shared: object) -> bool:
    """`shared` must be a real bool: a string such as "false" from a command line would read as true."""
    if not isinstance(shared, bool):
        raise TypeError(f"shared must be True or False, got {shared!r}")
    return shared


def index_targets(features: FeatureSet, method: str) -> dict[str, int]:
    """cardinality + 1 per feature (its training values plus one for unseen ids): the range to cover."""
    unknown = [f.name for f in features.sparse if f.cardinality is None]
    if unknown:
        raise ValueError(f"{method} sizes its pieces by feature cardinality; missing for {unknown}")
    return {f.name: f.cardinality + 1 for f in features.sparse}


def allocation_weights(features: FeatureSet, rule: Allocation, method: str) -> dict[str, float]:
    """How a per-feature method shares its budget: by sqrt(cardinality + 1), cardinality + 1, or equally.

    "sqrt" suits methods whose capacity grows faster than their parameters (qr: q*m index
    pairs from q + m rows; pq: K^D codeword combinations from D*K rows): features keep the
    same capacity per value, and small features are not squeezed to a single row as
    proportional shares squeeze them at small budgets.
    """
    if rule == "equal":
        return {name: 1.0 for name in features.sparse_names}
    targets = index_targets(features, method)
    if rule == "sqrt":
        return {name: math.sqrt(n) for name, n in targets.items()}
    if rule == "proportional":
        return {name: float(n) for name, n in targets.items()}
    raise ValueError(f"allocation must be 'sqrt', 'proportional' or 'equal', got {rule!r}")


def apportion(total: int, weights: Mapping[str, float], minimum: int = 1) -> dict[str, int]:
    """Split `total` units over features: `minimum` each, the rest proportional to `weights`.

    Shares are floored and the leftover units go to the largest remainders (Hamilton's
    method), so the parts sum to exactly `total`. Requires total >= minimum * len(weights).
    """
    spare = total - minimum * len(weights)
    if spare < 0:
        raise ValueError(f"cannot give {len(weights)} features {minimum} units each out of {total}")
    weight_sum = sum(weights.values())
    share = {name: spare * w / weight_sum for name, w in weights.items()}
    parts = {name: minimum + int(s) for name, s in share.items()}
    left = total - sum(parts.values())
    for name in sorted(share, key=lambda n: share[n] - int(share[n]), reverse=True)[:left]:
        parts[name] += 1
    return parts


def regions(sizes: Sequence[int], shared: bool) -> tuple[list[int], int]:
    """Start row of each feature's piece in one stacked table, and the table's rows.

    Per-feature pieces are stacked one after another; shared pieces are one region that
    every feature reads from row 0 (all sizes must then be equal).
    """
    if shared:
        if len(set(sizes)) != 1:
            raise ValueError(f"a shared piece has one size for every feature, got {list(sizes)}")
        return [0] * len(sizes), sizes[0]
    return [0, *accumulate(sizes)][:-1], sum(sizes)


def per_feature(sizes: int | Mapping[str, int], names: Sequence[str], what: str) -> list[int]:
    """One size per feature, in order, from a mapping or one int for every feature."""
    if not isinstance(sizes, Mapping):
        return [int(sizes)] * len(names)
    missing = [name for name in names if name not in sizes]
    if missing:
        raise ValueError(f"no {what} given for features {missing}")
    return [int(sizes[name]) for name in names]
