"""Which table rows each training value reads, for methods that store rows in one table."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from unified_embedding.batch import Batch
from unified_embedding.embeddings import METHODS, EmbeddingMethod
from unified_embedding.embeddings.table import SlotTableEmbedding


def row_table_methods() -> list[str]:
    """Registered methods whose vectors are rows of one table (what `inspect` and the decomposition read)."""
    return [name for name, cls in METHODS.items() if issubclass(cls, SlotTableEmbedding)]


def require_row_table(embedding: EmbeddingMethod) -> SlotTableEmbedding:
    if not isinstance(embedding, SlotTableEmbedding):
        raise ValueError(  # noqa: TRY004 - a user's choice of method, reported like every bad option
            f"method {embedding.name!r} does not read rows of a table, so it has no row collisions to inspect; "
            f"methods that do: {', '.join(row_table_methods())}"
        )
    return embedding


@dataclass
class SlotReads:
    """For every slot s: the feature it belongs to and the row each of that feature's training values reads.

    `rows[s][i]` is the table row that slot s reads for value `vocabularies[feature][i]`.
    """

    features: tuple[str, ...]
    slot_feature: np.ndarray  # [S] feature index of each slot
    rows: list[np.ndarray]  # per slot, [V_f] int64 rows
    num_rows: int  # rows of the table
    chunk_dim: int


@torch.no_grad()
def slot_reads(embedding: EmbeddingMethod, vocabularies: Mapping[str, np.ndarray]) -> SlotReads:
    """Rows read by each slot for each training value, from the method's own `slot_rows` (one pass)."""
    table = require_row_table(embedding)
    names = table.features.sparse_names
    # One example whose every feature holds all of its training values: slot s's bag is then
    # exactly its feature's vocabulary, in vocabulary order.
    ids = [np.asarray(vocabularies[name], dtype=np.int64) for name in names]
    batch = Batch(
        keys=names,
        values=torch.from_numpy(np.concatenate(ids)),
        lengths=torch.tensor([len(v) for v in ids], dtype=torch.int64),
        dense=torch.zeros(1, 0),
    )
    rows, bag_offsets, _ = table.slot_rows(batch)
    rows, bag_offsets = rows.numpy(), bag_offsets.numpy()
    slot_feature = table.slot_feature.numpy().astype(np.int64)
    per_slot = [rows[bag_offsets[s] : bag_offsets[s + 1]].astype(np.int64) for s in range(len(slot_feature))]
    return SlotReads(names, slot_feature, per_slot, int(table.weight.shape[0]), int(table.chunk_dim))
