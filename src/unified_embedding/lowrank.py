"""The shapes a low-rank compressed network has, and how a saved one is rebuilt (`ue compress`).

Low-rank output compression (Yu et al., 2024, "Unified Low-rank Compression Framework for
Click-through Rate Prediction") replaces a layer whose outputs y lie near an r-dimensional
affine subspace (mean mu, orthonormal basis U [out, r]) by two thin layers computing
y' = U U^T (y - mu) + mu:
- a Linear y = W x + b becomes `FactorisedLinear`: down = U^T W [r, in], up = U [out, r] with
  bias mu + U U^T (b - mu);
- a feature's embedding table E [rows, width] becomes a narrow table E U [rows, r] and a
  projection Linear(r, width) with weight U and bias mu - U U^T mu. The projection is linear,
  so pooled (multivalent) features compress the same way: pooling E U rows is U^T of pooling E rows.

This module only knows shapes and the PCA algebra; `compress.py` measures the outputs and
picks the ranks. `apply_compression` gives a freshly built network the shapes recorded in a
compressed run, so its saved weights load: the one way a compressed run is rebuilt.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unified_embedding.batch import Batch
from unified_embedding.embeddings.base import EmbeddingMethod, Vocabularies
from unified_embedding.embeddings.table import SlotTableEmbedding
from unified_embedding.features import FeatureSet, Pooling
from unified_embedding.network import CTRNetwork


class FactorisedLinear(nn.Module):
    """A Linear(in, out) as Linear(in, rank, no bias) then Linear(rank, out): rank * (in + out) + out floats."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features)

    @classmethod
    def from_pca(cls, layer: nn.Linear, mean: Tensor, basis: Tensor) -> Self:
        """The layer followed by projection of its outputs onto the affine subspace mean + span(basis)."""
        factorised = cls(layer.in_features, layer.out_features, basis.shape[1])
        weight = layer.weight.detach().double()
        bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(mean)
        with torch.no_grad():
            factorised.down.weight.copy_(basis.T @ weight)
            factorised.up.weight.copy_(basis)
            factorised.up.bias.copy_(mean + basis @ (basis.T @ (bias - mean)))
        return factorised

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


#: What a compressible embedding is, for the errors that refuse the others.
NEEDS = "compress needs a float32 table with one region per feature (methods full, hashing)"


@dataclass(frozen=True)
class Region:
    """The rows of one feature in a slot table: its wide row i (`width` floats) is table rows
    base + stride * i + j for j < stride, read by slots `slot` .. `slot + stride - 1`."""

    feature: str
    slot: int
    base: int
    stride: int
    size: int
    width: int

    def table(self, weight: Tensor) -> Tensor:
        """The feature's own table [size, width], a view of the slot table `weight`."""
        return weight[self.base : self.base + self.stride * self.size].reshape(self.size, self.width)


def feature_regions(embedding: EmbeddingMethod) -> list[Region]:
    """Each feature's private region of a slot table (`full`, `hashing`), in feature order.

    Compression is per feature, so a table whose features share rows (`unified`,
    `multiplexed`), whose rows are not read as stored (quantised, transformed) or that adds
    rows outside the regions (`full` with unseen="grow") is refused.
    """
    plain = isinstance(embedding, SlotTableEmbedding) and embedding.storage == "fp32" and not embedding.transforms_rows
    if not plain or embedding.grows:
        raise ValueError(f"{NEEDS}; method {embedding.name!r} stores or reads its rows otherwise")
    feature = embedding.slot_feature.tolist()
    base, stride, size = embedding.slot_base.tolist(), embedding.slot_stride.tolist(), embedding.slot_size.tolist()
    regions = []
    for index, name in enumerate(embedding.features.sparse_names):
        slots = [s for s, f in enumerate(feature) if f == index]
        first, chunks = slots[0], len(slots)
        if any(
            base[s] != base[first] + j or stride[s] != chunks or size[s] != size[first] for j, s in enumerate(slots)
        ):
            raise ValueError(f"{NEEDS}; feature {name!r} of method {embedding.name!r} does not own whole rows")
        regions.append(Region(name, first, base[first], chunks, size[first], chunks * embedding.chunk_dim))
    spans = sorted((r.base, r.base + r.stride * r.size) for r in regions)
    if any(end > start for (_, end), (start, _) in itertools.pairwise(spans)):
        raise ValueError(f"{NEEDS}; features of method {embedding.name!r} share table rows")
    return regions


class LowRankTableEmbedding(EmbeddingMethod):
    """A slot table with each feature's rows replaced by a narrow table times a projection.

    `ranks[feature]` is the narrow width, or None for a feature kept as it was (a small
    table can cost less than any factorisation of it). The source method still maps ids to
    rows (its slots and vocabularies); its own table is dropped.
    """

    name = "lowrank"
    description = "per-feature low-rank tables made by `ue compress` from a trained slot table"

    def __init__(self, source: SlotTableEmbedding, ranks: Mapping[str, int | None]) -> None:
        super().__init__(source.features)
        self.regions = feature_regions(source)
        self.ranks = {r.feature: ranks[r.feature] for r in self.regions}
        self.tables = nn.ParameterList(
            nn.Parameter(torch.zeros(r.size, r.width if self.ranks[r.feature] is None else self.ranks[r.feature]))
            for r in self.regions
        )
        self.projections = nn.ModuleList(
            nn.Identity() if self.ranks[r.feature] is None else nn.Linear(self.ranks[r.feature], r.width)
            for r in self.regions
        )
        mean_pooled = {f.name for f in source.features.sparse if f.pooling is Pooling.MEAN}
        self.modes = ["mean" if r.feature in mean_pooled else "sum" for r in self.regions]
        source.weight = nn.Parameter(source.weight.new_zeros(0, source.chunk_dim))  # the narrow tables replace it
        self.source = source

    @classmethod
    def from_pca(cls, source: SlotTableEmbedding, pca: Mapping[str, tuple[Tensor, Tensor] | None]) -> Self:
        """Narrow tables from the trained source: `pca[feature]` is (mean, basis) of its outputs, or None to keep it."""
        originals = {r.feature: r.table(source.weight.detach()).clone() for r in feature_regions(source)}
        ranks = {name: None if fit is None else fit[1].shape[1] for name, fit in pca.items()}
        embedding = cls(source, ranks)
        with torch.no_grad():
            for region, table, projection in zip(
                embedding.regions, embedding.tables, embedding.projections, strict=True
            ):
                original = originals[region.feature]
                if pca[region.feature] is None:
                    table.copy_(original)
                    continue
                mean, basis = pca[region.feature]
                table.copy_(original.double() @ basis)
                projection.weight.copy_(basis)
                projection.bias.copy_(mean - basis @ (basis.T @ mean))
        return embedding

    @classmethod
    def from_budget(
        cls, features: FeatureSet, budget: int, *, vocabularies: Vocabularies | None = None, **options
    ) -> Self:
        raise TypeError("a low-rank table is made from a trained run by `ue compress`, not from a budget")

    @property
    def out_dims(self) -> dict[str, int]:
        return {r.feature: r.width for r in self.regions}

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The per-id rows (as the source's table was), not the projections."""
        return list(self.tables)

    def forward(self, batch: Batch) -> Tensor:
        rows, bag_offsets, _ = self.source.slot_rows(batch)
        size = batch.batch_size
        starts = bag_offsets[::size].tolist()  # where each slot's bags begin in `rows`
        outputs = []
        for region, table, projection, mode in zip(
            self.regions, self.tables, self.projections, self.modes, strict=True
        ):
            first, last = starts[region.slot], starts[region.slot + 1]
            ids = (rows[first:last] - region.base) // region.stride
            offsets = bag_offsets[region.slot * size : (region.slot + 1) * size + 1] - first
            outputs.append(projection(F.embedding_bag(ids, table, offsets, mode=mode, include_last_offset=True)))
        return torch.cat(outputs, dim=1)


def replace_module(network: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule called `name` (dotted path) is."""
    parent, _, child = name.rpartition(".")
    setattr(network.get_submodule(parent), child, module)


def apply_compression(network: CTRNetwork, compression: Mapping[str, Any]) -> None:
    """Give a network built from its run's config the shapes of the run's `compression` record
    (run.json), so the compressed weights load with `load_state_dict`."""
    network.embedding = LowRankTableEmbedding(network.embedding, compression["embedding"]["ranks"])
    for name, layer in compression["layers"].items():
        linear = network.get_submodule(name)
        replace_module(network, name, FactorisedLinear(linear.in_features, linear.out_features, layer["rank"]))
