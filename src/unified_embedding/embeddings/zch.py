"""Managed collisions (`zch`): a fixed-size id-to-row map with LFU or LRU eviction.

The production rival to hashing for dynamic data (TorchRec's `MCHManagedCollisionModule`,
ByteDance Monolith's collisionless tables): instead of letting ids share rows by hash, keep an
exact map from the ids that matter to M rows, and when a new id arrives with the map full, give
it the row of the id the policy values least, re-initialised. Ids not in the map read a reserved
miss row of their feature. The price is the map itself (a key, a row index and a score per row),
which this method counts in its budget so that Pareto plots compare it fairly with hashing.
"""

from __future__ import annotations

from typing import Literal, Self, get_args

import torch
from torch import Tensor, nn

from unified_embedding.batch import Batch
from unified_embedding.embeddings.base import BudgetError, Vocabularies, register
from unified_embedding.embeddings.full import DEFAULT_DIM
from unified_embedding.embeddings.table import DEFAULT_INIT_SCALE, Slot, SlotTableEmbedding, slot_values
from unified_embedding.features import FeatureSet
from unified_embedding.hashing import hash_to_rows, salt

Policy = Literal["lfu", "lru"]
POLICIES: tuple[str, ...] = get_args(Policy)

#: Keys live in [0, 2**63 - 2]: int64's maximum marks an empty map entry (as in TorchRec), so no
#: id can be mistaken for one. Equal to TorchRec's default `input_hash_size`.
EMPTY = torch.iinfo(torch.int64).max
KEY_SPACE = EMPTY

#: 32-bit words stored per managed row: an int64 key, an int32 row index, an int64 score.
ROW_WORDS = 2 + 1 + 2
#: 32-bit words stored once: the map's int64 iteration counter and the int64 seed of row resets.
FIXED_WORDS = 2 + 2


def stored_words(*tensors: Tensor) -> int:
    """32-bit words the tensors occupy as stored."""
    return sum(t.numel() * t.element_size() for t in tensors) // 4


class CollisionMap(nn.Module):
    """Sorted 63-bit keys -> managed rows, with one score per entry; all state in buffers.

    The update follows TorchRec's `MCHManagedCollisionModule` with `eviction_interval=1`
    (checked against it in tests/test_zch.py): each training batch first scores the ids already
    held (LFU: add the batch's count of each; LRU: set the last-access iteration to now), then
    the batch's other ids, ordered by batch count (most frequent first, then by key), compete
    for the rows of the weakest entries. A newcomer's score is its batch count (LFU) or now
    (LRU); it takes a row only by scoring strictly higher, so ties keep the id already held,
    and empty entries (score 0) lose to any id. The i-th strongest newcomer takes the row of
    the i-th strongest evicted entry, and entries tie-break by position in the sorted keys:
    the same pairing as TorchRec's stable argsort, hence the same id -> row assignment.
    """

    def __init__(self, size: int, policy: Policy) -> None:
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; known: {', '.join(POLICIES)}")
        if not 1 <= size < 2**31:
            raise ValueError(f"the map holds between 1 and 2**31 - 1 rows (int32 row indices), got {size}")
        self.size = size
        self.policy = policy
        self.register_buffer("keys", torch.full((size,), EMPTY, dtype=torch.int64))
        self.register_buffer("rows", torch.arange(size, dtype=torch.int32))
        self.register_buffer("scores", torch.zeros(size, dtype=torch.int64))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))

    def words(self) -> int:
        return stored_words(self.keys, self.rows, self.scores, self.iteration)

    def lookup(self, keys: Tensor, miss: Tensor) -> Tensor:
        """The row of each key, or `miss` (per key) where the map does not hold it."""
        position = torch.searchsorted(self.keys, keys).clamp_(max=self.size - 1)
        return torch.where(self.keys[position] == keys, self.rows[position].long(), miss)

    @torch.no_grad()
    def admit(self, keys: Tensor) -> Tensor:
        """Score the batch's keys and let newcomers evict weaker entries; returns the rows given to new keys."""
        self.iteration += 1
        unique, counts = torch.unique(keys, return_counts=True)
        order = torch.argsort(counts, descending=True, stable=True)
        unique, counts = unique[order], counts[order]
        position = torch.searchsorted(self.keys, unique).clamp_(max=self.size - 1)
        held = self.keys[position] == unique
        if self.policy == "lfu":
            self.scores[position[held]] += counts[held]
            newcomer_scores = counts[~held]
        else:
            self.scores[position[held]] = self.iteration
            newcomer_scores = self.iteration.expand(int((~held).sum())).clone()
        return self._replace(unique[~held], newcomer_scores)

    def _replace(self, newcomers: Tensor, newcomer_scores: Tensor) -> Tensor:
        """Give the strongest newcomers the entries of the weakest held ids they outscore."""
        device = self.keys.device
        candidates = min(newcomers.numel(), self.size)
        # Weakest first: lowest score, then latest position (unique composite; scores * size fits int64
        # for any count of lookups below 2**63 / size).
        strength = self.scores * self.size + torch.arange(self.size - 1, -1, -1, device=device)
        weakest = torch.topk(strength, candidates, largest=False).indices
        # Newcomers descend in score and the weakest ascend, so the winners are a prefix.
        taken = int((newcomer_scores[:candidates] > self.scores[weakest]).sum())
        if taken == 0:
            return torch.zeros(0, dtype=torch.int64, device=device)
        entries = weakest[:taken].flip(0)
        self.keys[entries] = newcomers[:taken]
        self.scores[entries] = newcomer_scores[:taken]
        given = self.rows[entries].long()
        self._restore_order(entries)
        return given

    def _restore_order(self, changed: Tensor) -> None:
        """Re-sort the entries after `changed` received new keys: merge them into the untouched, still sorted rest.

        The same order as a stable sort of all keys (empty entries keep their relative order), in O(size).
        """
        moved = torch.zeros(self.size, dtype=torch.bool, device=changed.device)
        moved[changed] = True
        kept = (~moved).nonzero().squeeze(1)
        arriving = changed[torch.argsort(self.keys[changed])]
        destination = torch.searchsorted(self.keys[kept], self.keys[arriving])
        destination += torch.arange(arriving.numel(), device=changed.device)
        placed = torch.zeros(self.size, dtype=torch.bool, device=changed.device)
        placed[destination] = True
        permutation = torch.empty(self.size, dtype=torch.int64, device=changed.device)
        permutation[destination] = arriving
        permutation[~placed] = kept
        for buffer in (self.keys, self.rows, self.scores):
            buffer.copy_(buffer[permutation])


@register
class ManagedCollisionEmbedding(SlotTableEmbedding):
    """One id map and one table of `num_rows` managed rows shared by all features, plus a miss row per feature.

    A (feature, value) pair is keyed by our deterministic hash salted with the feature's name
    (63 bits, `KEY_SPACE`), so one map serves every feature, as one shared table does for
    `multiplexed`; each sparse feature's vector is its id's row (multivalent features pool
    their ids' rows by the FeatureSpec's sum or mean). Row `num_rows + f` is feature f's miss
    row: every id the map does not hold reads it, and it is never evicted.

    In training mode every forward first admits the batch's ids into the map
    (`CollisionMap.admit`: TorchRec's eviction_interval=1), then looks them up; in eval mode the
    map is frozen and unseen ids read their miss row. A row given to a new id is re-initialised
    with the table's init, Uniform(-init_scale, init_scale), drawn from a generator seeded by
    (seed, iteration), both buffers, so a run restored from a checkpoint resets rows to the
    same values. Its optimizer state is reset with it under the fused update (`fuse_optimizer`,
    as TorchRec's sharded modules reset weight and momentum); a torch optimizer's state (Adam's
    moments) is out of the method's reach and carries over to the new id, decaying as usual.

    Differences from TorchRec's `MCHManagedCollisionModule` (same eviction otherwise):
    - TorchRec reserves the last of its `zch_size` slots as the table's one miss slot; here
      there are `num_rows` managed rows and a miss row per feature (for one feature, TorchRec
      with zch_size = num_rows + 1 assigns exactly the same rows).
    - TorchRec keys raw ids (or `input_hash_func(ids)`) per table; here one map keys
      (feature, value) pairs, so distinct pairs may in principle share a 63-bit key (odds
      about n**2 / 2**64 for n ids held: none in practice).
    - Un-sharded TorchRec leaves evicted rows as they were (its `evict` is a stub); here they
      are always re-initialised.

    `num_parameters()` counts the table's floats plus the map's stored 32-bit words
    (`ROW_WORDS` per managed row and `FIXED_WORDS`), so the id map is paid for from the budget.
    """

    name = "zch"
    description = (
        "managed collisions: an exact id->row map of fixed size with LFU/LRU eviction, one miss row per feature"
    )
    paper = (
        "TorchRec managed collisions (MCHManagedCollisionModule); Liu et al., Monolith: Real Time "
        "Recommendation System With Collisionless Embedding Table, ORSUM@RecSys 2022 (arXiv 2209.07663)"
    )

    def __init__(
        self,
        features: FeatureSet,
        num_rows: int,
        dim: int = DEFAULT_DIM,
        policy: Policy = "lfu",
        *,
        init_scale: float = DEFAULT_INIT_SCALE,
        **table_options,
    ) -> None:
        check_widths(features, dim)
        names = features.sparse_names
        size = num_rows + len(names)
        slots = [Slot(name, salt(name, 0), 0, 1, size, False) for name in names]
        super().__init__(features, slots, size, dim, init_scale=init_scale, **table_options)
        self.id_map = CollisionMap(num_rows, policy)
        self.num_rows = num_rows
        self.register_buffer("reset_seed", torch.randint(0, 2**62, ()))

    def map_words(self) -> int:
        """32-bit words of the id map and the reset seed: what this method stores besides its table."""
        return self.id_map.words() + stored_words(self.reset_seed)

    def num_parameters(self) -> int:
        return super().num_parameters() + self.map_words()

    def map_keys(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """The map key of every (feature, example, value) in slot-major order, bag offsets, and each key's feature."""
        values, bag_offsets, feature_of = slot_values(batch, self.features.sparse_names, self.slot_feature)
        return hash_to_rows(values, self.slot_salt[feature_of], KEY_SPACE), bag_offsets, feature_of

    def slot_rows(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Rows read, as the map stands: a pure lookup (forward admits the batch first when training)."""
        keys, bag_offsets, feature_of = self.map_keys(batch)
        return self.id_map.lookup(keys, self.num_rows + feature_of), bag_offsets, feature_of

    def forward(self, batch: Batch) -> Tensor:
        if self.training:
            self.admit(batch)
        return super().forward(batch)

    @torch.no_grad()
    def admit(self, batch: Batch) -> None:
        """Update the map with the batch's ids and re-initialise the rows given to new ids."""
        rows = self.id_map.admit(self.map_keys(batch)[0])
        if rows.numel() == 0:
            return
        generator = torch.Generator(device=self.weight.device)
        generator.manual_seed(int(self.reset_seed) + int(self.id_map.iteration))
        fresh = torch.empty(rows.numel(), self.chunk_dim, device=self.weight.device, dtype=self.weight.dtype)
        self.weight[rows] = fresh.uniform_(-self.init_scale, self.init_scale, generator=generator)
        if self.row_optimizer is not None:
            self.row_optimizer.reset_rows(rows)

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        dim: int = DEFAULT_DIM,
        policy: Policy = "lfu",
        **options,
    ) -> Self:
        """The most managed rows that fit after the miss rows: each costs `dim` floats and `ROW_WORDS` map words."""
        check_widths(features, dim)
        count = len(features.sparse)
        fixed = count * dim + FIXED_WORDS
        rows = (budget - fixed) // (dim + ROW_WORDS)
        if rows < count:
            smallest = fixed + count * (dim + ROW_WORDS)
            raise BudgetError(
                f"zch needs at least {smallest:,} parameters (a miss row and one managed row per feature, "
                f"{dim} floats each, plus {ROW_WORDS} map words per managed row); budget {budget:,}"
            )
        return cls(features, rows, dim, policy, **options)


def check_widths(features: FeatureSet, dim: int) -> None:
    """Every feature reads one row of the shared table, so all share its width and take one probe."""
    odd = [f.name for f in features.sparse if f.dim not in (None, dim) or f.probes not in (None, 1)]
    if odd:
        raise ValueError(
            f"zch gives every feature one row of width {dim}; features {odd} ask for another width or probes"
        )
