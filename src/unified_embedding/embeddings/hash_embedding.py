"""Hash embeddings (Svenstrup, Hansson & Winther, NeurIPS 2017).

Value v of feature f is represented by k component vectors drawn by k hash functions from
a pool of B shared vectors, and by k importance weights p(v) that are themselves found by
hashing v into a table of K rows of k weights (the paper's dictionary-free variant):

    e(v) = sum_i p_i(v) * pool[h_i(v)]

Two values collide completely only if all k components and the weight row collide, so
with the same parameters each value gets a (nearly) unique vector, and the model learns
through p which component matters for which value. Parameters: B * d (pool) + K * k
(importance weights), both counted by `num_parameters()`.

Choices made here (the paper leaves them open or tunes them per task):

- the component hashes h_i are hashes of the value itself, independent of the weight hash
  (the paper composes h_i = D2_i(D1(v)), which makes all values of one weight row share
  their components too: strictly fewer distinct vectors for the same parameters);
- `importance_fraction=0.5` of the budget goes to the importance weights, so with k = 2 and
  d = 16 the weight table has 8x more rows than the pool (the paper asks for K much larger
  than B);
- importance weights start uniform(-1, 1), the pool uniform(-0.05, 0.05) like every table
  here; `append_weights=True` also concatenates the (pooled) p(v) to the output, as the
  paper's optional variant does (the output of each feature is then d + k wide).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unified_embedding.embeddings.base import BudgetError, Vocabularies, register
from unified_embedding.embeddings.hash_family import (
    DEFAULT_DIM,
    Allocation,
    Expansion,
    HashSharingEmbedding,
    Layout,
    allocation_shares,
    common_chunk,
    family_salt,
    feature_widths,
    region_sizes,
    split_budget,
)
from unified_embedding.features import FeatureSet
from unified_embedding.hashing import keys_to_rows, salted_keys

DEFAULT_NUM_HASHES = 2  # the paper: "we typically use k = 2"
DEFAULT_IMPORTANCE_FRACTION = 0.5
IMPORTANCE_INIT = 1.0


@register
class HashEmbedding(HashSharingEmbedding):
    """A pool of `pool_rows` vectors and `weight_rows` importance rows per feature (or shared by all).

    Sizes are ints (every feature's, or the shared one) or mappings of feature to size. A
    feature's vector is `dim` wide (or its FeatureSpec's `dim`); in a shared pool, features
    of different widths read chunks of their common divisor, each chunk hashed on its own.
    """

    name = "hash_embedding"
    description = "hash embeddings: k hashed components from a shared pool, mixed by hashed importance weights"
    paper = "Svenstrup, Hansson & Winther, Hash Embeddings for Efficient Word Representations, NeurIPS 2017"

    def __init__(
        self,
        features: FeatureSet,
        pool_rows: int | Mapping[str, int],
        weight_rows: int | Mapping[str, int],
        dim: int = DEFAULT_DIM,
        num_hashes: int = DEFAULT_NUM_HASHES,
        *,
        shared: bool = False,
        append_weights: bool = False,
        **options,
    ) -> None:
        k = _check_num_hashes(num_hashes)
        widths = feature_widths(features, dim)
        chunk = common_chunk(widths)
        pools = region_sizes(features, pool_rows, shared, "pool_rows")
        weights = region_sizes(features, weight_rows, shared, "weight_rows")
        layout = Layout(features, k)
        shared_pool = layout.region(next(iter(pools.values()))) if shared else 0
        for name, width in widths.items():
            parts = width // chunk
            base = shared_pool if shared else layout.region(pools[name] * parts)
            for i in range(k):
                layout.read_rows(i, name, f"hash_embedding/{i}", base, pools[name], parts, shared=shared)
        super().__init__(features, layout, chunk, **options)
        names = features.sparse_names
        bases, start = [], 0
        for name in names:
            bases.append(0 if shared else start)
            start += 0 if shared else weights[name]
        total = next(iter(weights.values())) if shared else start
        self.importance = nn.Parameter(torch.empty(total, k))
        with torch.no_grad():
            self.importance.uniform_(-IMPORTANCE_INIT, IMPORTANCE_INIT)
        self.register_buffer("importance_base", torch.tensor(bases, dtype=torch.int64), persistent=False)
        self.register_buffer("importance_size", torch.tensor([weights[n] for n in names]), persistent=False)
        self.register_buffer(
            "importance_salt", torch.tensor([family_salt(n, "hash_embedding", "importance") for n in names]),
            persistent=False,
        )  # fmt: skip
        self.num_hashes, self.shared, self.append_weights = k, shared, append_weights
        self.pool_rows, self.weight_rows = pools, weights
        if append_weights:
            self._out_dims = {name: width + k for name, width in self._out_dims.items()}

    def importance_rows(self, x: Expansion) -> Tensor:
        """Row of the importance table of every value of the batch."""
        if "importance_rows" not in x.cache:
            feature = x.value_feature
            keys = salted_keys(x.values, self.importance_salt[feature])
            x.cache["importance_rows"] = self.importance_base[feature] + keys_to_rows(
                keys, self.importance_size[feature]
            )
        return x.cache["importance_rows"]

    def rows_and_weights(self, x: Expansion) -> tuple[Tensor, Tensor | None]:
        rows, _ = super().rows_and_weights(x)
        p = F.embedding(self.importance_rows(x), self.importance, sparse=self.sparse)  # [values, k]
        return rows, p[x.occurrence, self.lookup_summand[x.lookup_of]]

    def finish(self, output: Tensor, x: Expansion) -> Tensor:
        if not self.append_weights:
            return output
        offsets = x.value_offsets
        bags = torch.cat([offsets[:, :-1].reshape(-1), offsets[-1:, -1]])
        scale = self._mean_scale(bags, self.feature_mean, x.batch_size) if self._any_mean else None
        pooled = F.embedding_bag(
            self.importance_rows(x), self.importance, bags, mode="sum", per_sample_weights=scale,
            include_last_offset=True, sparse=self.sparse,
        ).view(len(self.features.sparse), x.batch_size, self.num_hashes)  # fmt: skip
        parts, start = [], 0
        for f, width in enumerate(self._out_dims.values()):
            vector = width - self.num_hashes
            parts += [output[:, start : start + vector], pooled[f]]
            start += vector
        return torch.cat(parts, dim=1)

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        dim: int = DEFAULT_DIM,
        num_hashes: int = DEFAULT_NUM_HASHES,
        importance_fraction: float = DEFAULT_IMPORTANCE_FRACTION,
        shared: bool = False,
        allocation: Allocation = "proportional",
        **options,
    ) -> Self:
        """About `importance_fraction` of the budget to importance weights, the rest to the pool.

        Per feature (`shared=False`) both are split by cardinality (or equally, `allocation`),
        pool rows first; the leftover goes to importance rows, so less than k parameters of
        the budget are unused.
        """
        k = _check_num_hashes(num_hashes)
        if not 0 < importance_fraction < 1:
            raise ValueError(f"importance_fraction must be in (0, 1), got {importance_fraction!r}")
        widths = feature_widths(features, dim)
        if shared:
            chunk = common_chunk(widths)
            if budget < chunk + k:
                raise BudgetError(f"{cls.name} needs at least {chunk + k:,} parameters (one pool row and one "
                                  f"row of importance weights); budget {budget:,}")  # fmt: skip
            pool = min(max(1, int(budget * (1 - importance_fraction)) // chunk), (budget - k) // chunk)
            return cls(features, pool, (budget - pool * chunk) // k, dim, k, shared=True, **options)
        names = features.sparse_names
        minimum = sum(widths.values()) + k * len(names)
        if budget < minimum:
            raise BudgetError(f"{cls.name} needs at least {minimum:,} parameters (one pool row and one row of "
                              f"importance weights per feature); budget {budget:,}")  # fmt: skip
        shares = allocation_shares(features, allocation, cls.name)
        ones = dict.fromkeys(names, 1)
        pool_budget = min(max(int(budget * (1 - importance_fraction)), sum(widths.values())), budget - k * len(names))
        pools = split_budget(pool_budget, shares, widths, ones, method=cls.name)
        left = budget - sum(pools[name] * widths[name] for name in names)
        weights = split_budget(left, shares, dict.fromkeys(names, k), ones, method=cls.name)
        return cls(features, pools, weights, dim, k, shared=False, **options)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.num_hashes}, shared={self.shared}"


def _check_num_hashes(num_hashes: int) -> int:
    if isinstance(num_hashes, bool) or not isinstance(num_hashes, int) or num_hashes < 1:
        raise ValueError(f"num_hashes must be a positive integer, got {num_hashes!r}")
    return num_hashes
