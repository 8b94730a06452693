"""Managed collisions (`zch`): the map's admission and eviction, exact size, budgets, checkpoints, TorchRec parity."""

import numpy as np
import pytest
import torch

from unified_embedding import Batch, FeatureSet, FeatureSpec
from unified_embedding.embeddings import BudgetError, build_embedding
from unified_embedding.embeddings.zch import FIXED_WORDS, KEY_SPACE, ROW_WORDS, ManagedCollisionEmbedding
from unified_embedding.hashing import hash_to_rows, salt
from unified_embedding.train import TrainConfig, Trainer

ITEM = FeatureSet([FeatureSpec("item")])
TWO = FeatureSet([FeatureSpec("user"), FeatureSpec("genres", kind="multivalent", pooling="mean")])


def item_batch(*ids: int) -> Batch:
    return Batch.from_ids({"item": torch.tensor(ids)})


def rows_of(method: ManagedCollisionEmbedding, *ids: int) -> list[int]:
    """Where each item id reads, without changing the map."""
    return method.slot_rows(item_batch(*ids))[0].tolist()


def admit(method: ManagedCollisionEmbedding, *ids: int) -> None:
    method.train()
    method(item_batch(*ids))


def zipf_stream(batches: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """Zipf-distributed ids whose popular head drifts by 7 ids per batch: new ids keep arriving."""
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.zipf(1.3, size) + 7 * t) for t in range(batches)]


def test_a_new_id_takes_a_free_row_and_unseen_ids_read_their_features_miss_row():
    method = ManagedCollisionEmbedding(TWO, num_rows=8, dim=4)
    method.train()
    method(Batch.from_ids({"user": [[1], [2]], "genres": [[5, 6], []]}))
    method.eval()
    rows, _, feature_of = method.slot_rows(Batch.from_ids({"user": [[1], [9]], "genres": [[5], [7, 6]]}))
    user, genres = rows[feature_of == 0].tolist(), rows[feature_of == 1].tolist()
    assert user[0] < 8 and user[1] == 8  # known user: a managed row; unseen: the user miss row
    assert genres[0] < 8 and genres[1] == 9 and genres[2] < 8  # unseen genre 7: the genres miss row
    assert len({user[0], genres[0], genres[2]}) == 3
    out = method(Batch.from_ids({"user": [[9]], "genres": [[5, 7]]}))
    assert torch.equal(out[0, :4], method.weight[8])
    assert torch.allclose(out[0, 4:], (method.weight[genres[0]] + method.weight[9]) / 2)


def test_lfu_keeps_the_frequent_ids_when_full():
    method = ManagedCollisionEmbedding(ITEM, num_rows=2, dim=4, policy="lfu")
    admit(method, 1, 1, 1, 2)  # counts: 1 -> 3, 2 -> 1
    admit(method, 3, 3)  # 3 (2 this batch) beats 2 (1 in all), not 1 (3)
    assert rows_of(method, 1, 2, 3)[1] == 2 and max(rows_of(method, 1, 3)) < 2
    admit(method, 4, 4)  # 4 only ties 3's count of 2: the id held keeps its row
    assert rows_of(method, 3, 4) == [rows_of(method, 3)[0], 2]


def test_lru_evicts_the_stalest_id():
    method = ManagedCollisionEmbedding(ITEM, num_rows=2, dim=4, policy="lru")
    admit(method, 1)
    admit(method, 2)
    admit(method, 1)  # 2 is now the least recently used
    row_of_two = rows_of(method, 2)[0]
    admit(method, 3)
    assert rows_of(method, 1, 2, 3) == [rows_of(method, 1)[0], 2, row_of_two]


def test_an_evicted_row_is_reinitialised_with_its_optimizer_state():
    method = ManagedCollisionEmbedding(ITEM, num_rows=1, dim=4, policy="lfu", init_scale=0.05)
    optimizer = method.fuse_optimizer("adam", lr=0.01)[0]
    admit(method, 1)
    with torch.no_grad():
        method.weight.fill_(7.0)  # as if trained
    for state in optimizer.state.values():
        state.fill_(3.0)
    admit(method, 2, 2)  # 2 evicts 1 from the only managed row
    assert rows_of(method, 1, 2) == [1, 0]
    assert float(method.weight[0].detach().abs().max()) <= 0.05  # fresh init
    assert torch.equal(method.weight[1], torch.full((4,), 7.0))  # the miss row is never reset
    for state in optimizer.state.values():
        assert torch.equal(state[0], torch.zeros(4)) and torch.equal(state[1], torch.full((4,), 3.0))


def test_eval_mode_leaves_the_map_unchanged():
    method = ManagedCollisionEmbedding(ITEM, num_rows=4, dim=4)
    admit(method, 1, 2)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.eval()
    out = method(item_batch(3, 4, 1))
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())
    assert torch.equal(out[0], method.weight[4]) and torch.equal(out[1], method.weight[4])


def test_stored_size_is_exact():
    method = ManagedCollisionEmbedding(TWO, num_rows=100, dim=8, policy="lru")
    assert method.num_parameters() == (100 + 2) * 8 + 100 * ROW_WORDS + FIXED_WORDS
    checkpoint_words = sum(t.numel() * t.element_size() for t in method.state_dict().values()) // 4
    assert method.num_parameters() == checkpoint_words  # everything the checkpoint holds is counted, nothing else
    assert method.num_bytes() == 4 * method.num_parameters()


def test_budget_is_met_or_refused_clearly():
    for budget in (1_000, 12_345, 100_000):
        method = build_embedding("zch", TWO, budget, policy="lru")
        used = method.num_parameters()
        assert used <= budget < used + 16 + ROW_WORDS and method.id_map.policy == "lru"
    smallest = 2 * 16 + 2 * (16 + ROW_WORDS) + FIXED_WORDS
    assert build_embedding("zch", TWO, smallest).num_rows == 2
    with pytest.raises(BudgetError, match=f"at least {smallest}"):
        build_embedding("zch", TWO, smallest - 1)
    with pytest.raises(ValueError, match="width"):
        ManagedCollisionEmbedding(FeatureSet([FeatureSpec("user", dim=8)]), num_rows=4, dim=16)


def train_stream(method: ManagedCollisionEmbedding, stream: list[torch.Tensor]) -> list[torch.Tensor]:
    """Train on each batch with plain SGD; returns every forward's output."""
    outputs = []
    for ids in stream:
        method.train()
        out = method(Batch.from_ids({"item": ids}))
        out.pow(2).sum().backward()
        with torch.no_grad():
            method.weight -= 0.1 * method.weight.grad
        method.weight.grad = None
        outputs.append(out.detach())
    return outputs


def test_a_checkpoint_mid_stream_continues_exactly():
    stream = zipf_stream(12, 64)
    torch.manual_seed(0)
    uninterrupted = ManagedCollisionEmbedding(ITEM, num_rows=20, dim=4)
    expected = train_stream(uninterrupted, stream)
    torch.manual_seed(0)
    first = ManagedCollisionEmbedding(ITEM, num_rows=20, dim=4)
    train_stream(first, stream[:5])
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    torch.manual_seed(123)  # a different process: different initial weights and seed, all overwritten
    resumed = ManagedCollisionEmbedding(ITEM, num_rows=20, dim=4)
    resumed.load_state_dict(saved)
    for got, want in zip(train_stream(resumed, stream[5:]), expected[5:], strict=True):
        assert torch.equal(got, want)
    assert all(torch.equal(v, uninterrupted.state_dict()[k]) for k, v in resumed.state_dict().items())


@pytest.mark.parametrize("policy", ["lfu", "lru"])
@pytest.mark.parametrize("num_rows", [10, 40])
def test_same_rows_as_torchrec_managed_collisions(policy, num_rows):
    """The same id stream through TorchRec's MCHManagedCollisionModule and our map: the same row for every id.

    TorchRec hashes with our key function (its `input_hash_func`) and has one slot more, its miss slot,
    which is our feature's miss row.
    """
    pytest.importorskip("torchrec")
    from torchrec.modules.mc_modules import LFU_EvictionPolicy, LRU_EvictionPolicy, MCHManagedCollisionModule
    from torchrec.sparse.jagged_tensor import JaggedTensor

    item_salt = salt("item", 0)
    reference = MCHManagedCollisionModule(
        zch_size=num_rows + 1,
        device=torch.device("cpu"),
        eviction_policy=LFU_EvictionPolicy() if policy == "lfu" else LRU_EvictionPolicy(),
        eviction_interval=1,
        input_hash_size=KEY_SPACE,
        input_hash_func=lambda ids, size: hash_to_rows(ids, torch.full_like(ids, item_salt), size),
    )
    method = ManagedCollisionEmbedding(ITEM, num_rows=num_rows, dim=4, policy=policy)

    def torchrec_rows(ids: torch.Tensor) -> torch.Tensor:
        jagged = JaggedTensor(values=ids, lengths=torch.ones(ids.numel(), dtype=torch.int64))
        return reference({"item": jagged})["item"].values()

    seen: set[int] = set()
    for ids in zipf_stream(25, 64):
        reference.train()
        torchrec_rows(ids)
        admit(method, *ids.tolist())
        seen |= set(ids.tolist())
        everything = torch.tensor(sorted(seen))
        reference.eval()
        ours = method.slot_rows(Batch.from_ids({"item": everything}))[0]
        assert torch.equal(ours, torchrec_rows(everything))
    assert int((ours < num_rows).sum()) == num_rows  # the map filled, so evictions were compared too


def test_trainer_runs_zch_end_to_end(data_dir):
    config = TrainConfig(
        dataset="frappe", method="zch", model="dcnv2", budget="0.1x", epochs=1, batch_size=256, max_rows=20_000,
        data_dir=str(data_dir), model_options={"hidden": [32, 32], "num_cross_layers": 1},
    )  # fmt: skip
    run = Trainer(config, progress=False).run()
    assert run["num_embedding_params"] <= run["budget"]
    assert 0.5 < run["test_auc"] <= 1 and run["test_logloss"] > 0
