"""Product quantisation with hashed codes: a value's vector is D codewords, one per codebook."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Self

from unified_embedding.embeddings.base import BudgetError, Vocabularies, register
from unified_embedding.embeddings.composition import (
    Allocation,
    allocation_weights,
    apportion,
    check_shared,
    check_uniform_width,
    per_feature,
    regions,
)
from unified_embedding.embeddings.full import DEFAULT_DIM
from unified_embedding.embeddings.table import Slot, SlotTableEmbedding
from unified_embedding.features import FeatureSet
from unified_embedding.hashing import salt

DEFAULT_CODEBOOKS = 4


@register
class ProductQuantizedEmbedding(SlotTableEmbedding):
    """Value v of feature f: the concatenation of codeword c_j(v) of codebook j, j = 1..D.

    Product quantisation (Jegou et al. 2011) splits a dim-wide vector into D sub-vectors of
    dim / D and draws sub-vector j from codebook j of K codewords, so K^D vectors cost
    D * K * dim / D = K * dim parameters. Learned-code methods (Chen et al., "Differentiable
    Product Quantization for End-to-End Embedding Compression", ICML 2020) learn and store
    the codes per value; here the codes are fixed by hashing, c_j(v) = h_{f,j}(v) mod K,
    and only the codebooks are learned. Codes are recomputed from the id on every lookup,
    never stored, so `num_parameters()` and `num_bytes()` count the codebooks alone, and
    no vocabulary is needed.

    With hashed codes this is the hashing trick with D probes, probe j confined to its own
    codebook: each value's vector is one of K^D combinations, so two values of a feature
    collide entirely only if all D hashes agree. `shared=True`: one set of D codebooks for
    all features, each feature with its own salts (Unified Embedding's multi-probe table,
    Coleman et al. 2023, with probe j kept to codebook j).
    """

    name = "pq"
    description = "product quantisation with hashed codes: D learned codebooks, codeword j picked by hash j"
    paper = (
        "Jegou et al., Product Quantization for Nearest Neighbor Search, TPAMI 2011; Chen et al., "
        "Differentiable Product Quantization for End-to-End Embedding Compression, ICML 2020"
    )

    def __init__(
        self,
        features: FeatureSet,
        codewords: int | Mapping[str, int],
        codebooks: int = DEFAULT_CODEBOOKS,
        dim: int = DEFAULT_DIM,
        *,
        shared: bool = False,
        **table_options,
    ) -> None:
        check_uniform_width(features, dim)
        if codebooks < 1 or dim % codebooks:
            raise ValueError(f"codebooks must divide dim = {dim} into equal sub-vectors, got {codebooks}")
        names = features.sparse_names
        sizes = per_feature(codewords, names, "codewords")
        if min(sizes) < 1:
            raise ValueError(f"every codebook needs at least one codeword, got {sizes}")
        bases, rows = regions([codebooks * k for k in sizes], check_shared(shared))
        slots = [
            Slot(name, salt(name, j), base + j * k, 1, k, False)
            for name, base, k in zip(names, bases, sizes, strict=True)
            for j in range(codebooks)
        ]
        super().__init__(features, slots, rows, dim // codebooks, **table_options)
        self.codebooks = codebooks
        self.codewords = dict(zip(names, sizes, strict=True))

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        codebooks: int = DEFAULT_CODEBOOKS,
        dim: int = DEFAULT_DIM,
        shared: bool = False,
        allocation: Allocation = "sqrt",
        **options,
    ) -> Self:
        """K codewords per codebook, each codeword of all D codebooks costing `dim` parameters.

        Per feature, K is shared by `allocation` (default sqrt(cardinality + 1)), at least
        one each; less than `dim` parameters of the budget stay unused.
        """
        units = budget // dim
        needed = 1 if shared else len(features.sparse)
        if units < needed:
            raise BudgetError(
                f"pq needs at least {needed * dim:,} parameters (one codeword in each codebook "
                f"{'shared' if shared else 'per feature'}); budget {budget:,}"
            )
        codewords = units if shared else apportion(units, allocation_weights(features, allocation, cls.name))
        return cls(features, codewords, codebooks, dim, shared=shared, **options)
