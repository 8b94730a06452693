"""What the per-id compressors (dpq, mgqe, alpt, deeplight, adaembed) share: an exact id index.

These methods keep something per training-split value (a code, a low-precision row, a
pruned row, a dedicated-row assignment), so unlike the hashed compositions they index each
feature's vocabulary exactly, as `full` does: value v of feature f gets its position in
f's vocabulary, and every id unseen in training gets f's last index (one out-of-vocabulary
entry per feature). Feature f's indices [0, N_f) then sit at [offset_f, offset_f + N_f) of
one *global id* range [0, N), N = sum N_f, over which the methods keep their per-id state.

The rest of the pipeline (distinct indices of a batch -> `compose` -> pooled bags) is
`ComposedEmbedding`'s, so these methods pay for the vectors a batch reads, not the table.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unified_embedding.embeddings.base import Vocabularies, as_tensor, require_dense
from unified_embedding.embeddings.composition import Bags, ComposedEmbedding
from unified_embedding.embeddings.double_hash import FrequentIds, unique_in_order
from unified_embedding.embeddings.full import vocabulary_sizes
from unified_embedding.features import FeatureSet
from unified_embedding.hashing import salt, salted_keys


class PerIdEmbedding(ComposedEmbedding):
    """`ComposedEmbedding` over each feature's exact vocabulary index, with one OOV index per feature."""

    dense_only_because = "trains its per-id state (codes, step sizes, masks or assignments) with dense gradients"

    def __init__(self, features: FeatureSet, vocabularies: Vocabularies | None, dim: int, *, sparse: bool = False):
        require_dense(self, sparse)
        sizes = vocabulary_sizes(features.sparse_names, vocabularies)
        super().__init__(features, list(sizes.values()), dim, shared=False)
        self.num_ids = sum(sizes.values())
        keys, ids = [], []
        for f, name in enumerate(features.sparse_names):
            values = torch.unique(as_tensor(vocabularies[name]))
            keys.append(salted_keys(values, torch.full_like(values, salt(name, 0))))
            ids.append(int(self.index_offset[f]) + torch.arange(values.numel()))
        keys_all, order = torch.sort(torch.cat(keys))
        if keys_all.numel() > 1 and bool((keys_all[1:] == keys_all[:-1]).any()):
            raise ValueError("two vocabulary entries share a 64-bit key; rename a feature to change its salt")
        # Persistent: a checkpoint carries its vocabularies, as `full`'s does.
        self.register_buffer("vocabulary_keys", keys_all)
        self.register_buffer("vocabulary_ids", torch.cat(ids)[order])
        self.register_buffer("id_feature", torch.repeat_interleave(self.index_size), persistent=False)

    def global_ids(self, values: Tensor, feature: Tensor) -> Tensor:
        """Global id of each value of feature `feature`: its vocabulary position, or its feature's OOV id."""
        keys = salted_keys(values, self.feature_salt[feature])
        oov = self.index_offset[feature] + self.index_size[feature] - 1
        if self.vocabulary_keys.numel() == 0:
            return oov
        position = torch.searchsorted(self.vocabulary_keys, keys).clamp_(max=self.vocabulary_keys.numel() - 1)
        found = self.vocabulary_keys[position] == keys
        return torch.where(found, self.vocabulary_ids[position], oov)

    def indices(self, bags: Bags) -> Tensor:
        return self.global_ids(bags.values, bags.feature) - self.index_offset[bags.feature]

    def frequency_rank(self, frequent_ids: FrequentIds | None) -> Tensor:
        """[N] rank of each global id among its feature's ids, most frequent first (0).

        `frequent_ids` maps features to training ids, most frequent first (the trainer's
        `ids_by_frequency`). Ids it does not list, and the OOV ids, rank after all listed ones
        (by their vocabulary position); without `frequent_ids`, every id ranks by position.
        """
        unknown = sorted(set(frequent_ids or {}) - set(self.features.sparse_names))
        if unknown:
            raise ValueError(f"frequent_ids given for unknown features {unknown}")
        rank = torch.arange(self.num_ids) - self.index_offset[self.id_feature] + self.num_ids
        for f, name in enumerate(self.features.sparse_names):
            ranked = unique_in_order((frequent_ids or {}).get(name, ()))
            if ranked.numel():
                ids = self.global_ids(ranked, torch.full_like(ranked, f))
                known = ids != self.index_offset[f] + self.index_size[f] - 1
                rank[ids[known]] = torch.arange(ranked.numel())[known]
        return rank

    def segments(self, ids: Tensor) -> list[tuple[int, Tensor]]:
        """Sorted global ids split by feature: (feature position, that feature's ids) for each present feature."""
        counts = torch.bincount(self.id_feature[ids], minlength=len(self.features.sparse)).tolist()
        parts = torch.split(torch.arange(ids.numel(), device=ids.device), counts)
        return [(f, part) for f, part in enumerate(parts) if part.numel()]
