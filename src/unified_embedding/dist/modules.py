"""A table embedding as a TorchRec module: the hashing before the lookup, one EmbeddingBagCollection after it.

Unified Embedding maps onto TorchRec directly. Every (feature, probe) *slot* of a
`SlotTableEmbedding` becomes one TorchRec feature key (``"genre@0"``, ``"genre@1"``, ...),
and all of them read ONE table (one `EmbeddingBagConfig` whose `feature_names` lists every
slot key). The salted hashing runs before the lookup, on the ids of a `Batch`, and turns
them into a KeyedJaggedTensor of *table rows* keyed by slot: TorchRec never sees a raw id,
so its row-wise sharding splits the table by row number and routes each row read to the
rank that holds it. The pooled output, in slot order (feature, then probe), is exactly the
single-process module's [B, S*d] output; mean pooling is SUM with per-sample weights 1/len.

The weights are the same tensor under another name, so a network moves both ways:

    sharded = to_torchrec(network)                 # CTRNetwork -> CTRNetwork with a TorchRec embedding
    single.load_state_dict(single_state_dict(sharded.state_dict()))
    sharded.load_state_dict(torchrec_state_dict(single.state_dict()))
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from unified_embedding.batch import Batch
from unified_embedding.embeddings.base import EmbeddingMethod
from unified_embedding.embeddings.table import SlotTableEmbedding, slot_values
from unified_embedding.hashing import keys_to_rows, salted_keys
from unified_embedding.network import CTRNetwork

#: The one table's name in the EmbeddingBagCollection (and in sharding plans).
TABLE = "unified"
#: Between a feature's name and its slot number in a TorchRec feature key.
SLOT_SEPARATOR = "@"

#: State-dict keys of the table and the vocabulary buffers, single-process <-> TorchRec (under `embedding.`).
_RENAMES = {
    "weight": f"ebc.embedding_bags.{TABLE}.weight",
    "vocabulary_keys": "router.vocabulary_keys",
    "vocabulary_index": "router.vocabulary_index",
}


def check_shardable(embedding: EmbeddingMethod) -> SlotTableEmbedding:
    """The embedding, if TorchRec can hold it: one float32 slot table, read as stored, and nothing else.

    That covers `unified`, `multiplexed`, `hashing`, `full` and `pq`; methods with networks,
    projections, several tables, pruning or quantised storage stay single-process.
    """
    name = getattr(embedding, "name", type(embedding).__name__)
    plain = (
        isinstance(embedding, SlotTableEmbedding)
        and type(embedding).forward is SlotTableEmbedding.forward
        and not getattr(embedding, "transforms_rows", False)
        and [n for n, _ in embedding.named_parameters()] == ["weight"]
    )
    if not plain:
        raise ValueError(
            f"method {name!r} cannot be sharded by TorchRec: only methods that are one table read "
            "through slots can (unified, multiplexed, hashing, full, pq)"
        )
    if getattr(embedding, "storage", "fp32") != "fp32":
        raise ValueError(
            f"method {name!r} with storage={embedding.storage!r} cannot be sharded by TorchRec: "
            "its fused kernels read float32 rows as stored"
        )
    return embedding


def slot_keys(embedding: SlotTableEmbedding) -> list[str]:
    """One TorchRec feature key per slot, in slot order: ``f"{feature}@{j}"``, j counting the feature's slots."""
    names = embedding.features.sparse_names
    seen: dict[str, int] = {}
    keys = []
    for index in embedding.slot_feature.tolist():
        name = names[index]
        keys.append(f"{name}{SLOT_SEPARATOR}{seen.get(name, 0)}")
        seen[name] = seen.get(name, 0) + 1
    return keys


class SlotRouter(nn.Module):
    """The hashing half of a slot table: a `Batch`'s ids -> a KJT of table rows keyed by slot.

    It holds copies of the embedding's slot buffers and runs the same functions
    (`slot_values`, `salted_keys`, `keys_to_rows`, the vocabulary search), so every id
    lands on the row it lands on in the single-process module.
    """

    def __init__(self, embedding: SlotTableEmbedding) -> None:
        super().__init__()
        self.names = embedding.features.sparse_names
        self.keys = slot_keys(embedding)
        for name in (
            "slot_feature",
            "slot_salt",
            "slot_base",
            "slot_stride",
            "slot_size",
            "slot_vocabulary",
            "slot_mean",
        ):
            self.register_buffer(name, getattr(embedding, name).detach().clone(), persistent=False)
        # Persistent, as in the single-process module: a checkpoint carries its vocabularies.
        self.register_buffer("vocabulary_keys", embedding.vocabulary_keys.detach().clone())
        self.register_buffer("vocabulary_index", embedding.vocabulary_index.detach().clone())
        self.has_vocabulary = bool(embedding.slot_vocabulary.any())
        self.weighted = bool(embedding.slot_mean.any())

    def rows(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Table rows of every (slot, example, value), slot-major, and the [S*B] bag lengths."""
        values, bag_offsets, slot_of = slot_values(batch, self.names, self.slot_feature)
        keys = salted_keys(values, self.slot_salt[slot_of])
        index = keys_to_rows(keys, self.slot_size[slot_of])
        if self.has_vocabulary:
            table = self.vocabulary_keys
            position = torch.searchsorted(table, keys).clamp_(max=max(table.numel() - 1, 0))
            found = table[position] == keys
            looked_up = torch.where(found, self.vocabulary_index[position], self.slot_size[slot_of] - 1)
            index = torch.where(self.slot_vocabulary[slot_of], looked_up, index)
        rows = self.slot_base[slot_of] + self.slot_stride[slot_of] * index
        return rows, torch.diff(bag_offsets)

    def forward(self, batch: Batch) -> KeyedJaggedTensor:
        rows, lengths = self.rows(batch)
        weights = None
        if self.weighted:  # mean pooling: weight 1/len on every value of a mean-pooled bag
            scale = 1.0 / lengths.clamp(min=1).to(torch.float32)
            is_mean = self.slot_mean.repeat_interleave(batch.batch_size)
            weights = torch.repeat_interleave(torch.where(is_mean, scale, torch.ones_like(scale)), lengths)
        return KeyedJaggedTensor(keys=self.keys, values=rows, lengths=lengths.to(torch.int32), weights=weights)


class TorchRecSlotEmbedding(nn.Module):
    """A slot-table embedding whose table lives in a TorchRec `EmbeddingBagCollection` (shardable by DMP).

    forward(Batch) -> [B, S*d], identical to the source module's forward for the same weights.
    `out_dims`, `output_dim`, `num_parameters()` and `num_bytes()` describe the same
    embedding as the source, so run.json reports the same sizes.
    """

    def __init__(self, embedding: EmbeddingMethod, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        embedding = check_shardable(embedding)
        self.features = embedding.features
        self.method = embedding.name
        self.chunk_dim = embedding.chunk_dim
        self.num_rows = embedding.weight.shape[0]
        self._out_dims = embedding.out_dims
        self.router = SlotRouter(embedding)
        self.config = EmbeddingBagConfig(
            name=TABLE,
            embedding_dim=self.chunk_dim,
            num_embeddings=self.num_rows,
            feature_names=list(self.router.keys),
            pooling=PoolingType.SUM,
        )
        self.ebc = EmbeddingBagCollection(tables=[self.config], is_weighted=self.router.weighted, device=device)
        if torch.device(device or "cpu").type != "meta":
            with torch.no_grad():
                self.table.copy_(embedding.weight)

    @property
    def table(self) -> Tensor:
        return self.ebc.embedding_bags[TABLE].weight

    @property
    def out_dims(self) -> dict[str, int]:
        return dict(self._out_dims)

    @property
    def output_dim(self) -> int:
        return sum(self._out_dims.values())

    def num_parameters(self) -> int:
        return self.num_rows * self.chunk_dim

    def num_bytes(self) -> int:
        return 4 * self.num_parameters()

    def extra_loss(self) -> Tensor | None:
        return None

    def forward(self, batch: Batch) -> Tensor:
        pooled = self.ebc(self.router(batch))
        if list(pooled.keys()) == self.router.keys:
            return pooled.values()
        groups = pooled.to_dict()
        return torch.cat([groups[key] for key in self.router.keys], dim=1)


def to_torchrec(network: CTRNetwork, *, device: torch.device | str | None = None) -> CTRNetwork:
    """A copy of `network` whose embedding table is a TorchRec EmbeddingBagCollection, same weights."""
    model = copy.deepcopy(network.model)
    if device is not None:
        model = model.to(device)
    return CTRNetwork(TorchRecSlotEmbedding(network.embedding, device=device), model)


def torchrec_state_dict(state: Mapping[str, Tensor], prefix: str = "embedding.") -> dict[str, Tensor]:
    """A single-process network's state dict under the TorchRec module's names."""
    return _rename(state, prefix, _RENAMES)


def single_state_dict(state: Mapping[str, Tensor], prefix: str = "embedding.") -> dict[str, Tensor]:
    """A TorchRec network's (full, unsharded) state dict under the single-process module's names."""
    return _rename(state, prefix, {new: old for old, new in _RENAMES.items()})


def _rename(state: Mapping[str, Tensor], prefix: str, renames: Mapping[str, str]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith(prefix) and key[len(prefix) :] in renames:
            key = prefix + renames[key[len(prefix) :]]
        out[key] = value
    return out
