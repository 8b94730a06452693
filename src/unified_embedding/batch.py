"""The one data structure that flows from readers to embeddings to models.

Sparse ids use TorchRec's KeyedJaggedTensor layout (keys, one flat `values` tensor, and
key-major `lengths` of size F*B), so a batch converts to and from a KJT without copying
values, and the embedding methods can hash and gather every feature in one pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass
class Batch:
    """A mini-batch: `dense` [B, D] float32, sparse ids jagged by key, `labels` [B] float32."""

    keys: tuple[str, ...]
    values: Tensor
    lengths: Tensor
    dense: Tensor
    labels: Tensor | None = None

    def __post_init__(self) -> None:
        self.keys = tuple(self.keys)
        if self.values.dtype != torch.int64 or self.values.dim() != 1:
            raise ValueError(
                f"Batch.values must be a 1-D int64 tensor, got {self.values.dtype} {tuple(self.values.shape)}"
            )
        if self.dense.dim() != 2 or not self.dense.is_floating_point():
            raise ValueError(
                f"Batch.dense must be a 2-D float tensor [B, D], got {self.dense.dtype} {tuple(self.dense.shape)}"
            )
        batch_size = self.dense.shape[0]
        if self.lengths.dim() != 1 or self.lengths.numel() != len(self.keys) * batch_size:
            raise ValueError(
                f"Batch.lengths must have len(keys) * batch_size = {len(self.keys)} * {batch_size} entries, "
                f"got {self.lengths.numel()}"
            )
        if int(self.lengths.sum()) != self.values.numel():
            raise ValueError(
                f"Batch.lengths sum to {int(self.lengths.sum())} but there are {self.values.numel()} values"
            )
        if self.labels is not None and self.labels.shape != (batch_size,):
            raise ValueError(f"Batch.labels must have shape [{batch_size}], got {tuple(self.labels.shape)}")

    @property
    def batch_size(self) -> int:
        return self.dense.shape[0]

    def feature_offsets(self) -> Tensor:
        """[F, B+1] offsets into `values`: feature f of example b is values[o[f, b]:o[f, b+1]]."""
        per_feature = self.lengths.view(len(self.keys), self.batch_size).to(torch.int64)
        flat = torch.cumsum(per_feature.reshape(-1), 0)
        ends = flat.view(len(self.keys), self.batch_size)
        starts = ends[:, :1] - per_feature[:, :1]
        return torch.cat([starts, ends], dim=1)

    @cached_property
    def single_valued(self) -> bool:
        """Every feature has exactly one id per example: the common case embeddings take a faster path for.

        Computed once per batch (several stages of a forward ask).
        """
        return self.values.numel() == self.lengths.numel() and bool((self.lengths == 1).all())

    def ids(self, key: str) -> Tensor:
        """All ids of one feature, in example order."""
        index = self.keys.index(key)
        offsets = self.feature_offsets()
        return self.values[offsets[index, 0] : offsets[index, -1]]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            keys=self.keys,
            values=self.values.to(device),
            lengths=self.lengths.to(device),
            dense=self.dense.to(device),
            labels=None if self.labels is None else self.labels.to(device),
        )

    @classmethod
    def from_ids(
        cls,
        ids: Mapping[str, Tensor | Sequence[Sequence[int]] | Sequence[int]],
        dense: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Batch:
        """Build a batch from per-feature ids: a 1-D tensor (one id per example) or a list of lists.

        This is the entry point for users who drop an embedding into their own model.
        """
        keys = tuple(ids)
        if not keys:
            raise ValueError("Batch.from_ids needs at least one sparse feature")
        values, lengths = [], []
        batch_size: int | None = None
        for key in keys:
            column = ids[key]
            if isinstance(column, Tensor):
                if column.dim() != 1:
                    raise ValueError(f"feature {key!r}: a tensor of ids must be 1-D (one id per example)")
                flat, count = column.to(torch.int64), torch.ones(column.numel(), dtype=torch.int64)
            else:
                rows = [list(row) if isinstance(row, (list, tuple)) else [row] for row in column]
                flat = torch.tensor([v for row in rows for v in row], dtype=torch.int64)
                count = torch.tensor([len(row) for row in rows], dtype=torch.int64)
            if batch_size is None:
                batch_size = count.numel()
            elif count.numel() != batch_size:
                raise ValueError(f"feature {key!r} has {count.numel()} examples, expected {batch_size}")
            values.append(flat)
            lengths.append(count)
        assert batch_size is not None
        if dense is None:
            dense = torch.zeros(batch_size, 0)
        return cls(keys, torch.cat(values), torch.cat(lengths), dense.float(), labels)

    def to_kjt(self):
        """This batch's sparse part as a torchrec KeyedJaggedTensor (requires torchrec)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        return KeyedJaggedTensor(keys=list(self.keys), values=self.values, lengths=self.lengths.to(torch.int32))

    @classmethod
    def from_kjt(cls, kjt, dense: Tensor, labels: Tensor | None = None) -> Batch:
        return cls(tuple(kjt.keys()), kjt.values().to(torch.int64), kjt.lengths().to(torch.int64), dense, labels)
