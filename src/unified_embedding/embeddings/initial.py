"""A table's initial values, regenerated on demand instead of stored.

The lottery-ticket retrain of a pruned table (PEP) restarts the kept weights from their
original initial values. Keeping a copy of the initial table would double the memory and
every checkpoint; instead the generator's state just before the table was drawn is kept
(about 5 KB, a buffer so checkpoints carry it) and the same draw is replayed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def capture_rng_state() -> Tensor:
    """The global CPU generator's state now: call just before a table's `uniform_init`."""
    return torch.get_rng_state()


def replay_uniform(state: Tensor, shape: torch.Size, scale: float) -> Tensor:
    """The Uniform(-scale, scale) tensor of `shape` that the global generator drew from `state`."""
    generator = torch.Generator()
    generator.set_state(state)
    return torch.empty(shape).uniform_(-scale, scale, generator=generator)
