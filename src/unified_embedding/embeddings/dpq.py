"""Differentiable product quantisation, DPQ (Chen et al., "Differentiable Product Quantization
for End-to-End Embedding Compression", ICML 2020).

Every training-split value of feature f (and f's one OOV entry) gets a dim-wide *query*
row, split into D groups of dim / D. Group j of the query picks one of K_f centroids of
feature f's codebook j; the value's vector is the concatenation of the D picked *value*
centroids. So a deployment stores, per value, D codes of log2(K_f) bits, and per feature,
a K_f x dim value codebook (D codebooks of K_f centroids of dim / D): codes plus codebooks,
nothing per value in float.

Assignment, trained end to end (`assignment`):
- "softmax" (the paper's DPQ-SX): group j's code is the key centroid nearest the query
  (logits -||q_j - k_c||^2); the forward reads the value centroid of that code (one-hot),
  the backward the softmax over the logits (straight-through), so queries and keys learn
  which codes the task wants, and value centroids learn what they mean. Keys are separate
  from values, as in the paper, and only the values are stored.
- "centroid" (the paper's DPQ-VQ): the code is the centroid nearest the query, and the
  forward reads the centroid with the gradient straight through to the query; the
  centroids learn by the VQ-VAE codebook loss plus a commitment loss on the queries
  (`extra_loss`, weight `commitment`).
Either way the forward reads exactly what a deployment reads (hard codes), in training and
in evaluation.

Counting. The queries (and keys) are training state: a deployment stores the codes they
select, not them. `num_bytes()` is the codes packed at their bit width plus the float32 value
codebooks; `num_parameters()` is that in 32-bit words, rounded up. `codes()` and
`codebooks` are what a deployment stores, and `decode(codes)` reads it back.

Sizing (`from_budget`): D is fixed (`codebooks`); the budget buys bits per feature, greedily,
one bit at a time to the feature with the fewest bits (larger vocabularies first), a
feature stopping when K_f reaches its number of values (codes are then collision-free).
No weight decay on the queries (`decayed_parameters` is empty): decay would shrink every
query towards the origin and collapse the codes, and codes are what is stored per value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unified_embedding.embeddings.base import BudgetError, Vocabularies, register, uniform_init
from unified_embedding.embeddings.composition import per_feature
from unified_embedding.embeddings.full import DEFAULT_DIM, vocabulary_sizes
from unified_embedding.embeddings.per_id import PerIdEmbedding
from unified_embedding.embeddings.table import DEFAULT_INIT_SCALE
from unified_embedding.features import FeatureSet

Assignment = Literal["softmax", "centroid"]

#: D: dim = 16 split in groups of 2, so K^8 combinations per feature from K centroids per codebook
DEFAULT_CODEBOOKS = 8
#: std of the queries and keys at the start: a plain table's scale. Adam moves them ~1e-3 a step,
#: so at unit scale the codes barely moved for epochs (frappe 0.1x, val AUC after 5 epochs:
#: 0.894 at std 1, 0.931 at 0.05)
DEFAULT_QUERY_SCALE = DEFAULT_INIT_SCALE
#: VQ-VAE's commitment weight (van den Oord et al., 2017), which DPQ-VQ uses
DEFAULT_COMMITMENT = 0.25
#: Tiers of ids: (how many ids of the feature, bits fewer than the feature's head tier)
Tiers = Sequence[tuple[int, int]]


def tier_bits(bits: int, drop: int) -> int:
    """Bits of a tier `drop` bits below a feature's `bits` (at least one: two centroids)."""
    return max(1, bits - drop)


def feature_bytes(tiers: Tiers, bits: int, codebooks: int, dim: int) -> tuple[int, int]:
    """(code bits, codebook bytes) of one feature whose head tier has `bits` bits."""
    code_bits = codebooks * sum(count * tier_bits(bits, drop) for count, drop in tiers)
    return code_bits, 4 * dim * 2**bits


def total_bytes(tiers: Mapping[str, Tiers], bits: Mapping[str, int], codebooks: int, dim: int) -> int:
    """Codes packed over the whole model (one rounding up) plus float32 codebooks."""
    parts = [feature_bytes(tiers[name], bits[name], codebooks, dim) for name in tiers]
    return math.ceil(sum(p[0] for p in parts) / 8) + sum(p[1] for p in parts)


def allocate_bits(
    tiers: Mapping[str, Tiers], budget_bytes: int, codebooks: int, dim: int, method: str
) -> dict[str, int]:
    """Bits per feature within `budget_bytes`: one bit at a time to the feature with the fewest.

    A feature's bits stop at ceil(log2(ids)) (its codes are then collision-free); ties go to
    the larger feature. BudgetError when one bit per feature does not fit.
    """
    bits = dict.fromkeys(tiers, 1)
    floor = total_bytes(tiers, bits, codebooks, dim)
    if floor > budget_bytes:
        raise BudgetError(
            f"{method} needs at least {math.ceil(floor / 4):,} parameters (1-bit codes for every value and two "
            f"centroids per codebook of every feature); budget {budget_bytes // 4:,}"
        )
    size = {name: sum(count for count, _ in t) for name, t in tiers.items()}
    cap = {name: max(1, math.ceil(math.log2(max(n, 2)))) for name, n in size.items()}
    while True:
        for name in sorted((n for n in bits if bits[n] < cap[n]), key=lambda n: (bits[n], -size[n])):
            trial = {**bits, name: bits[name] + 1}
            if total_bytes(tiers, trial, codebooks, dim) <= budget_bytes:
                bits = trial
                break
        else:
            return bits


@register
class DPQEmbedding(PerIdEmbedding):
    """Per value, D learned codes into feature f's D codebooks of 2**bits_f centroids; see the module docstring."""

    name = "dpq"
    description = "differentiable product quantisation: learned per-value codes into learned codebooks (stores codes)"
    paper = "Chen et al., Differentiable Product Quantization for End-to-End Embedding Compression, ICML 2020"

    def __init__(
        self,
        features: FeatureSet,
        vocabularies: Vocabularies,
        bits: int | Mapping[str, int],
        codebooks: int = DEFAULT_CODEBOOKS,
        dim: int = DEFAULT_DIM,
        *,
        assignment: Assignment = "softmax",
        commitment: float = DEFAULT_COMMITMENT,
        temperature: float = 1.0,
        query_scale: float = DEFAULT_QUERY_SCALE,
        sparse: bool = False,
    ) -> None:
        super().__init__(features, vocabularies, dim, sparse=sparse)
        if codebooks < 1 or dim % codebooks:
            raise ValueError(f"codebooks must divide dim = {dim} into equal groups, got {codebooks}")
        if assignment not in ("softmax", "centroid"):
            raise ValueError(f"assignment must be 'softmax' or 'centroid', got {assignment!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        sizes = per_feature(bits, features.sparse_names, "bits")
        if min(sizes) < 1 or max(sizes) > 16:
            raise ValueError(f"bits per code must be in [1, 16], got {sizes}")
        self.codebooks, self.assignment = codebooks, assignment
        self.commitment, self.temperature = commitment, temperature
        self.bits = dict(zip(features.sparse_names, sizes, strict=True))
        centroids = [2**b for b in sizes]
        starts = [0, *torch.tensor(centroids).cumsum(0).tolist()]
        self.register_buffer("codebook_start", torch.tensor(starts[:-1]), persistent=False)
        self.register_buffer("codebook_size", torch.tensor(centroids), persistent=False)
        # Bits of each id's codes: its feature's (a subclass may lower them for some ids: MGQE's tiers).
        self.register_buffer("id_bits", torch.tensor(sizes)[self.id_feature], persistent=False)
        # Values start at a plain table's scale, so the model starts as it would on `full`; under
        # "centroid" they are what queries are matched against, so they start like the queries.
        self.query = nn.Parameter(torch.randn(self.num_ids, dim) * query_scale)
        self.keys = nn.Parameter(torch.randn(starts[-1], dim) * query_scale) if assignment == "softmax" else None
        self.values = nn.Parameter(torch.empty(starts[-1], dim))
        if assignment == "softmax":
            uniform_init(self.values, DEFAULT_INIT_SCALE)
        else:
            uniform_init(self.values, query_scale * math.sqrt(3))  # the queries' std
        self._loss: Tensor | None = None

    @property
    def codebook(self) -> Tensor:
        """The centroids codes are chosen against: the keys (softmax) or the values (centroid)."""
        return self.keys if self.keys is not None else self.values

    def _grouped(self, table: Tensor) -> Tensor:
        return table.view(table.shape[0], self.codebooks, -1)

    def _assign(self, ids: Tensor, f: int) -> tuple[Tensor, Tensor]:
        """Codes [n, D] of global ids `ids` of feature f, and the logits [n, D, K_f] they maximise."""
        start, size = int(self.codebook_start[f]), int(self.codebook_size[f])
        query = self._grouped(self.query[ids])  # [n, D, s]
        centroids = self._grouped(self.codebook[start : start + size]).transpose(0, 1)  # [D, K, s]
        # -||q - c||^2 without the query's own norm, which is the same for every centroid
        logits = (2 * torch.einsum("nds,dks->ndk", query, centroids) - centroids.pow(2).sum(-1)) / self.temperature
        allowed = torch.arange(size, device=ids.device) < (2 ** self.id_bits[ids])[:, None, None]
        logits = logits.masked_fill(~allowed, -math.inf)
        return logits.argmax(-1), logits

    def compose(self, index: Tensor, feature: Tensor) -> Tensor:
        ids = index + self.index_offset[feature]
        out, losses = [], []
        for f, part in self.segments(ids):
            codes, logits = self._assign(ids[part], f)
            start = int(self.codebook_start[f])
            values = self._grouped(self.values)  # [rows, D, s]
            picked = values[start + codes, torch.arange(self.codebooks, device=ids.device)]  # [n, D, s]
            if self.assignment == "softmax":
                soft = torch.softmax(logits, -1)  # straight through the one-hot pick
                size = int(self.codebook_size[f])
                blend = torch.einsum("ndk,kds->nds", soft, values[start : start + size])
                picked = picked + blend - blend.detach()
            else:
                query = self._grouped(self.query[ids[part]])
                losses.append(F.mse_loss(picked, query.detach(), reduction="sum")
                              + self.commitment * F.mse_loss(query, picked.detach(), reduction="sum"))  # fmt: skip
                picked = query + (picked - query).detach()
            out.append(picked.reshape(part.numel(), -1))
        if losses and self.training:
            self._loss = sum(losses) / ids.numel()
        return torch.cat(out)

    def extra_loss(self) -> Tensor | None:
        """DPQ-VQ's codebook and commitment losses of the last training forward (None for softmax)."""
        loss, self._loss = self._loss, None
        return loss

    def decayed_parameters(self) -> list[nn.Parameter]:
        return []

    @torch.no_grad()
    def codes(self) -> Tensor:
        """[N, D] the codes a deployment stores, one row per global id (int16: up to 16 bits)."""
        ids = torch.arange(self.num_ids, device=self.query.device)
        return torch.cat([self._assign(ids[part], f)[0] for f, part in self.segments(ids)]).to(torch.int16)

    def decode(self, codes: Tensor) -> Tensor:
        """[N, dim] every id's vector from stored codes and value codebooks: what a deployment reads."""
        start = self.codebook_start[self.id_feature][:, None] + codes.long()
        return self._grouped(self.values)[start, torch.arange(self.codebooks)].reshape(self.num_ids, -1)

    def num_bytes(self) -> int:
        """Codes at their bit width (packed over the model) plus float32 value codebooks."""
        return math.ceil(self.codebooks * int(self.id_bits.sum()) / 8) + 4 * self.values.numel()

    def num_parameters(self) -> int:
        """32-bit words of what a deployment stores (`num_bytes`, rounded up)."""
        return math.ceil(self.num_bytes() / 4)

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        codebooks: int = DEFAULT_CODEBOOKS,
        dim: int = DEFAULT_DIM,
        **options,
    ) -> Self:
        """Bits per feature (`allocate_bits`) whose codes and codebooks fit 4 * budget bytes."""
        sizes = vocabulary_sizes(features.sparse_names, vocabularies)
        tiers = {name: [(n, 0)] for name, n in sizes.items()}
        bits = allocate_bits(tiers, 4 * budget, codebooks, dim, cls.name)
        return cls(features, vocabularies, bits, codebooks, dim, **options)
