"""Multi-granular quantised embeddings, MGQE (Kang et al., "Learning Multi-granular Quantized
Embeddings for Large-Vocab Categorical Features in Recommender Systems", WWW 2020).

DPQ (dpq.py) with fewer centroids for infrequent values: a feature's values are split into
frequency tiers, and the tail tier may pick only the first K_f / 2**`tail_drop` centroids of
each of the feature's codebooks, the head tier all K_f (the paper's nested codebooks, one
codebook shared by the tiers). A tail value's codes then take `tail_drop` fewer bits, so for
the same bytes the head gets more centroids than DPQ could give every value: the paper's
point is that rare values have too little data to use a fine quantisation anyway.

Tiers come from the training split's frequencies (`frequent_ids`, which the trainer passes):
the `head_fraction` most frequent values of each feature are the head; the rest, and the
feature's OOV entry (unseen ids are rare by definition), the tail. Without `frequent_ids`
every value is in the head and MGQE is DPQ.
"""

from __future__ import annotations

import math
from typing import Self

from unified_embedding.embeddings.base import Vocabularies, register
from unified_embedding.embeddings.double_hash import FrequentIds
from unified_embedding.embeddings.dpq import DEFAULT_CODEBOOKS, DPQEmbedding, allocate_bits
from unified_embedding.embeddings.full import DEFAULT_DIM, vocabulary_sizes
from unified_embedding.features import FeatureSet

#: share of each feature's values in the head tier (the paper's tiers follow a long tail)
DEFAULT_HEAD_FRACTION = 0.25
#: the tail uses half the head's centroids: one bit fewer per code. Chosen on the validation
#: splits (DCNv2, 0.1x): one bit fewer gave 0.9483 on frappe and 0.7875 on movielens-100k,
#: two bits fewer 0.9347 and 0.7902
DEFAULT_TAIL_DROP = 1


def head_counts(sizes: dict[str, int], fraction: float, frequent_ids: FrequentIds | None) -> dict[str, int]:
    """Values of each feature in the head tier: all without frequencies, else ceil(fraction * listed ids)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"head_fraction must be in (0, 1], got {fraction!r}")
    if frequent_ids is None:
        return dict(sizes)
    return {name: min(n - 1, math.ceil(fraction * len(frequent_ids.get(name, ())))) for name, n in sizes.items()}


@register
class MGQEEmbedding(DPQEmbedding):
    """DPQ whose infrequent values pick among fewer centroids (cheaper codes); see the module docstring."""

    name = "mgqe"
    description = "multi-granular quantised embeddings: DPQ with fewer centroids for infrequent values"
    paper = (
        "Kang et al., Learning Multi-granular Quantized Embeddings for Large-Vocab Categorical Features "
        "in Recommender Systems, WWW 2020"
    )
    uses_id_frequencies = True

    def __init__(
        self,
        features: FeatureSet,
        vocabularies: Vocabularies,
        bits: int | dict[str, int],
        codebooks: int = DEFAULT_CODEBOOKS,
        dim: int = DEFAULT_DIM,
        *,
        frequent_ids: FrequentIds | None = None,
        head_fraction: float = DEFAULT_HEAD_FRACTION,
        tail_drop: int = DEFAULT_TAIL_DROP,
        **options,
    ) -> None:
        if tail_drop < 0:
            raise ValueError(f"tail_drop must be >= 0, got {tail_drop}")
        super().__init__(features, vocabularies, bits, codebooks, dim, **options)
        heads = head_counts(vocabulary_sizes(features.sparse_names, vocabularies), head_fraction, frequent_ids)
        if frequent_ids is not None:
            head_size = self.index_size.new_tensor([heads[name] for name in features.sparse_names])
            head = self.frequency_rank(frequent_ids) < head_size[self.id_feature]
            self.id_bits = self.id_bits.where(head, (self.id_bits - tail_drop).clamp(min=1))
        self.head_fraction, self.tail_drop = head_fraction, tail_drop
        self.head_counts = heads

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        codebooks: int = DEFAULT_CODEBOOKS,
        dim: int = DEFAULT_DIM,
        frequent_ids: FrequentIds | None = None,
        head_fraction: float = DEFAULT_HEAD_FRACTION,
        tail_drop: int = DEFAULT_TAIL_DROP,
        **options,
    ) -> Self:
        """Head bits per feature (`allocate_bits`, the tail `tail_drop` bits fewer) within 4 * budget bytes."""
        sizes = vocabulary_sizes(features.sparse_names, vocabularies)
        heads = head_counts(sizes, head_fraction, frequent_ids)
        tiers = {name: [(heads[name], 0), (n - heads[name], tail_drop)] for name, n in sizes.items()}
        bits = allocate_bits(tiers, 4 * budget, codebooks, dim, cls.name)
        return cls(features, vocabularies, bits, codebooks, dim, frequent_ids=frequent_ids,
                   head_fraction=head_fraction, tail_drop=tail_drop, **options)  # fmt: skip
