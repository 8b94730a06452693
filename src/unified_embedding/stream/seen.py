"""Which examples carry an id the stream has not shown before: a Bloom filter of (feature, id) keys.

"New-id AUC" scores the examples a model has had no chance to learn. An exact set of every
id ever seen grows with the stream; a Bloom filter of fixed size answers "seen before?" with
no false negatives and a false-positive rate of about (1 - e^(-k n / m))^k for n distinct
keys in m bits (k = 3, m = 2^27 bits = 16 MiB: under 1e-4 up to 10 M distinct keys), so a
new id is missed that rarely and memory stays flat however long the stream.
"""

from __future__ import annotations

import numpy as np
import torch

from unified_embedding.batch import Batch
from unified_embedding.hashing import mix64, salt, salted_keys

#: 2^27 bits: 16 MiB
DEFAULT_BITS_LOG2 = 27
#: hash functions per key
PROBES = 3


class SeenIds:
    """A Bloom filter over salted (feature, id) keys."""

    def __init__(self, bits_log2: int = DEFAULT_BITS_LOG2) -> None:
        if not 6 <= bits_log2 <= 36:
            raise ValueError(f"bits_log2 must be in [6, 36], got {bits_log2}")
        self.bits_log2 = bits_log2
        self.bits = np.zeros(1 << (bits_log2 - 3), dtype=np.uint8)

    def _positions(self, keys: torch.Tensor) -> np.ndarray:
        """[PROBES, n] bit positions of each key."""
        mask = (1 << self.bits_log2) - 1
        return np.stack([(mix64(keys + probe) & mask).numpy() for probe in range(1, PROBES + 1)])

    def contains(self, keys: torch.Tensor) -> np.ndarray:
        positions = self._positions(keys)
        hit = (self.bits[positions >> 3] >> (positions & 7).astype(np.uint8)) & 1
        return hit.all(axis=0)

    def add(self, keys: torch.Tensor) -> None:
        positions = self._positions(keys).ravel()
        np.bitwise_or.at(self.bits, positions >> 3, (1 << (positions & 7)).astype(np.uint8))

    def new_examples(self, batch: Batch) -> np.ndarray:
        """[B] bool: the example has at least one (feature, id) not added before."""
        unseen = ~self.contains(batch_keys(batch))
        example = example_of_value(batch)
        return np.bincount(example[unseen], minlength=batch.batch_size) > 0

    def copy(self) -> SeenIds:
        twin = SeenIds(self.bits_log2)
        twin.bits[:] = self.bits
        return twin

    def state_dict(self) -> dict:
        return {"bits_log2": self.bits_log2, "bits": self.bits.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.bits_log2 = int(state["bits_log2"])
        self.bits = np.asarray(state["bits"], dtype=np.uint8).copy()


def batch_keys(batch: Batch) -> torch.Tensor:
    """One int64 key per (feature, id) value of the batch, salted by feature."""
    per_value_salt = torch.repeat_interleave(
        torch.tensor([salt(name) for name in batch.keys], dtype=torch.int64),
        batch.lengths.view(len(batch.keys), batch.batch_size).sum(dim=1),
    )
    return salted_keys(batch.values, per_value_salt)


def example_of_value(batch: Batch) -> np.ndarray:
    """The example each value of `batch.values` belongs to."""
    examples = torch.arange(batch.batch_size).repeat(len(batch.keys))
    return torch.repeat_interleave(examples, batch.lengths).numpy()
