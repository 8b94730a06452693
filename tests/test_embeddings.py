"""Mechanics of the table-based methods, exact parameter counts and budgets."""

import re

import numpy as np
import pytest
import torch

from unified_embedding import Batch, FeatureSet, FeatureSpec
from unified_embedding.embeddings import (
    METHODS,
    BudgetError,
    FullEmbedding,
    HashingTrickEmbedding,
    MultiplexedEmbedding,
    UnifiedEmbedding,
    build_embedding,
)
from unified_embedding.embeddings.base import resolve_budget
from unified_embedding.embeddings.unified import probe_counts

FEATURES = FeatureSet(
    [
        FeatureSpec("user", cardinality=500),
        FeatureSpec("item", cardinality=300),
        FeatureSpec("genres", kind="multivalent", pooling="mean", cardinality=18),
        FeatureSpec("gender", cardinality=2),
        FeatureSpec("age", kind="dense"),
    ]
)
VOCABULARIES = {
    "user": np.arange(500) * 7,
    "item": np.arange(300) + 10_000,
    "genres": np.arange(18),
    "gender": np.array([11, 22]),
}
FULL_SIZE = FullEmbedding.parameter_count(FEATURES, VOCABULARIES)
#: Methods sized in whole columns of every vocabulary row: their granularity is one column.
COLLISIONLESS = {"full", "mixed_dim", "pep", "optembed", "autodim", "autosrh", "alpt", "deeplight"}
#: Methods that report what a deployment stores after pruning (non-zeros plus positions).
PRUNED = {"pep", "optembed", "autodim", "autosrh", "deeplight", "dpq", "mgqe", "alpt"}
#: Methods sized in bits per code, whose next bit also doubles a codebook (test_methods_compressed.py
#: checks that no feature could take one more bit).
BIT_SIZED = {"dpq", "mgqe"}
#: Methods that also count integer state they store, in 32-bit words (zch's id map).
WITH_STATE = {"zch"}


def make_batch(batch_size: int = 6, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    genres = [
        torch.randint(0, 18, (int(n),), generator=g).tolist() for n in torch.randint(0, 4, (batch_size,), generator=g)
    ]
    return Batch.from_ids(
        {
            "user": torch.randint(0, 500, (batch_size,), generator=g) * 7,
            "item": torch.randint(10_000, 10_300, (batch_size,), generator=g),
            "genres": genres,
            "gender": torch.tensor([11, 22] * (batch_size // 2)),
        },
        dense=torch.randn(batch_size, 1, generator=g),
    )


@pytest.mark.parametrize("name", sorted(METHODS))
def test_num_parameters_is_the_stored_element_count(name):
    method = build_embedding(name, FEATURES, FULL_SIZE // 4, vocabularies=VOCABULARIES)
    stored = sum(p.numel() for p in method.parameters())
    if name in PRUNED:
        assert 0 < method.num_parameters() <= stored
    elif name == "adaembed":  # its tables plus one 64-bit key per dedicated row
        assert method.num_parameters() == stored + 2 * method.dedicated
    elif name in WITH_STATE:
        assert method.num_parameters() == sum(t.numel() * t.element_size() for t in method.state_dict().values()) // 4
    else:
        assert method.num_parameters() == stored
    out = method(make_batch())
    assert out.shape == (6, method.output_dim) and torch.isfinite(out).all()
    assert sum(method.out_dims.values()) == method.output_dim


@pytest.mark.parametrize("name", sorted(METHODS))
def test_sparse_gradients_are_taken_or_refused_by_name_with_the_reason(name):
    reason = METHODS[name].dense_only_because
    if reason:
        with pytest.raises(ValueError, match=f"^{name} {re.escape(reason)}; use sparse=False \\(drop --sparse\\)$"):
            build_embedding(name, FEATURES, FULL_SIZE // 4, vocabularies=VOCABULARIES, sparse=True)
        return
    method = build_embedding(name, FEATURES, FULL_SIZE // 4, vocabularies=VOCABULARIES, sparse=True)
    method(make_batch()).sum().backward()
    grads = [p.grad for p in method.parameters() if p.grad is not None]
    assert method.sparse and grads and any(g.is_sparse for g in grads)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("fraction", [0.01, 0.03, 0.1, 0.3, 1.0])
def test_from_budget_fits_and_wastes_at_most_one_row(name, fraction):
    budget = int(FULL_SIZE * fraction)
    try:
        method = build_embedding(name, FEATURES, budget, vocabularies=VOCABULARIES)
    except BudgetError as error:
        # A method may refuse only below its floor, and must name it (one column of every
        # vocabulary row for collisionless tables, the decoder for DHE, rank 1 for TT).
        assert "at least" in str(error) and fraction < 1.0
        return
    used = method.num_parameters()
    assert used <= budget
    if name in BIT_SIZED:
        return
    if name in COLLISIONLESS:
        assert budget - used < sum(len(v) + 1 for v in VOCABULARIES.values()) + 16  # one column of granularity
    else:
        assert budget - used < max(0.01 * budget, max(method.out_dims.values()))


def test_unified_concatenates_probes_of_one_shared_table():
    ue = UnifiedEmbedding(FEATURES, num_rows=64, chunk_dim=4, probes={"user": 3, "item": 2, "genres": 1, "gender": 1})
    assert ue.out_dims == {"user": 12, "item": 8, "genres": 4, "gender": 4}
    assert ue.num_parameters() == 64 * 4
    batch = make_batch()
    rows, _, slot_of = ue.slot_rows(batch)
    assert int(rows.max()) < 64
    out = ue(batch)
    # user's vector is its 3 probed rows, in probe order
    user_rows = rows[slot_of < 3].view(3, -1)
    expected = torch.cat([ue.weight[user_rows[j]] for j in range(3)], dim=1)
    assert torch.allclose(out[:, :12], expected)


def test_probes_of_one_value_read_different_rows():
    ue = UnifiedEmbedding(FEATURES, num_rows=10_000, chunk_dim=4, probes=2)
    batch = make_batch(256)
    rows, _, slot_of = ue.slot_rows(batch)
    first, second = rows[slot_of == 0], rows[slot_of == 1]
    assert float((first == second).double().mean()) < 0.02


def test_mean_pooling_and_empty_lists():
    ue = UnifiedEmbedding(FEATURES, num_rows=50, chunk_dim=4, probes=1)
    batch = Batch.from_ids({"user": [[7]] * 2, "item": [[10_000]] * 2, "genres": [[1, 2, 5], []], "gender": [[11]] * 2})
    out = ue(batch)
    genres = ue.feature_slices()["genres"]
    rows, _, slot_of = ue.slot_rows(batch)
    genre_rows = rows[slot_of == 2]
    assert torch.allclose(out[0, genres], ue.weight[genre_rows].mean(0))
    assert torch.equal(out[1, genres], torch.zeros(4))


def test_sum_pooling_for_multivalent_sum_features():
    features = FeatureSet([FeatureSpec("tags", kind="multivalent", pooling="sum")])
    ue = UnifiedEmbedding(features, num_rows=50, chunk_dim=4, probes=1)
    batch = Batch.from_ids({"tags": [[1, 2], [1]]})
    out = ue(batch)
    rows, _, _ = ue.slot_rows(batch)
    assert torch.allclose(out[0], ue.weight[rows[:2]].sum(0))


def test_full_is_collisionless_with_one_oov_row_per_feature():
    full = FullEmbedding(FEATURES, VOCABULARIES, dim=4)
    assert full.num_parameters() == 4 * sum(len(v) + 1 for v in VOCABULARIES.values())
    batch = Batch.from_ids(
        {"user": [[0], [7], [1], [3]], "item": [[10_000]] * 4, "genres": [[0]] * 4, "gender": [[11]] * 4}
    )
    rows, _, slot_of = full.slot_rows(batch)
    user_rows = rows[slot_of == 0].tolist()
    assert user_rows[0] != user_rows[1]  # two known users, two rows
    assert user_rows[2] == user_rows[3] == 500  # unseen users share the OOV row (index V)
    all_known = torch.arange(500) * 7
    known_rows = full.slot_rows(
        Batch.from_ids(
            {
                "user": all_known,
                "item": torch.full((500,), 10_000),
                "genres": [[0]] * 500,
                "gender": torch.full((500,), 11),
            }
        )
    )[0][:500]
    assert sorted(known_rows.tolist()) == list(range(500))


def test_full_with_wider_features_uses_chunks_of_a_common_width():
    features = FeatureSet([FeatureSpec("user", dim=8), FeatureSpec("gender", dim=4)])
    full = FullEmbedding(features, {"user": np.arange(10), "gender": np.arange(2)})
    assert full.out_dims == {"user": 8, "gender": 4} and full.chunk_dim == 4
    assert full.num_parameters() == 11 * 8 + 3 * 4


def test_hashing_gives_each_feature_its_own_rows():
    method = HashingTrickEmbedding.from_budget(FEATURES, 16 * 100, dim=16)
    assert sum(method.rows.values()) == 100
    assert method.rows["user"] > method.rows["item"] > method.rows["gender"]  # proportional to cardinality
    rows, _, slot_of = method.slot_rows(make_batch(64))
    regions = [set(rows[slot_of == s].tolist()) for s in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not regions[i] & regions[j]
    equal = HashingTrickEmbedding.from_budget(FEATURES, 16 * 100, dim=16, allocation="equal")
    assert set(equal.rows.values()) == {25}


def test_multiplexed_shares_one_table_across_features():
    method = MultiplexedEmbedding(FEATURES, num_rows=8, dim=4)
    assert method.num_parameters() == 32
    assert method.out_dims == {"user": 4, "item": 4, "genres": 4, "gender": 4}
    # the same value id under two features reads (almost always) different rows: salts differ
    batch = Batch.from_ids(
        {
            "user": torch.arange(1000),
            "item": torch.arange(1000),
            "genres": [[0]] * 1000,
            "gender": torch.zeros(1000, dtype=torch.int64),
        }
    )
    big = MultiplexedEmbedding(FEATURES, num_rows=100_000, dim=4)
    rows, _, slot_of = big.slot_rows(batch)
    assert float((rows[slot_of == 0] == rows[slot_of == 1]).double().mean()) < 0.01


def test_collisionless_opt_out_gets_exact_rows_after_the_shared_table():
    features = FeatureSet([FeatureSpec("user"), FeatureSpec("gender", collisionless=True)])
    vocab = {"gender": np.array([11, 22])}
    ue = UnifiedEmbedding.from_budget(features, 1000, chunk_dim=8, probes=2, vocabularies=vocab)
    assert ue.num_parameters() <= 1000 and ue.num_rows == (1000 - 3 * 2 * 8) // 8
    rows, _, slot_of = ue.slot_rows(
        Batch.from_ids({"user": torch.tensor([1, 2, 3]), "gender": torch.tensor([11, 22, 33])})
    )
    gender_rows = rows[slot_of >= 2].tolist()
    assert min(gender_rows) >= ue.num_rows
    assert len(set(gender_rows)) == 6  # 2 probes x (2 known + 1 OOV)


def test_log_probe_rule_grows_with_cardinality():
    counts = probe_counts(FEATURES, "log")
    assert counts == {"user": 3, "item": 2, "genres": 1, "gender": 1}


def test_feature_order_of_the_batch_does_not_matter():
    ue = UnifiedEmbedding(FEATURES, num_rows=64, chunk_dim=4)
    batch = make_batch()
    ids = {k: batch.ids(k) for k in ("gender", "user", "item")}
    reordered = Batch.from_ids({**ids, "genres": [[] for _ in range(6)]})
    plain = Batch.from_ids(
        {"user": ids["user"], "item": ids["item"], "genres": [[] for _ in range(6)], "gender": ids["gender"]}
    )
    assert torch.equal(ue(reordered), ue(plain))


def test_missing_feature_is_a_clear_error():
    ue = UnifiedEmbedding(FEATURES, num_rows=64, chunk_dim=4)
    with pytest.raises(KeyError, match="genres"):
        ue(Batch.from_ids({"user": torch.tensor([1]), "item": torch.tensor([1]), "gender": torch.tensor([1])}))


def test_sparse_gradients_touch_only_looked_up_rows():
    ue = UnifiedEmbedding(FEATURES, num_rows=1000, chunk_dim=4, sparse=True)
    batch = make_batch()
    ue(batch).sum().backward()
    grad = ue.weight.grad
    assert grad.is_sparse
    rows, _, _ = ue.slot_rows(batch)
    assert set(grad.coalesce().indices()[0].tolist()) <= set(rows.tolist())


def test_resolve_budget():
    assert resolve_budget("0.25x", 1000) == 250
    assert resolve_budget("2.5e5", 1) == 250_000
    assert resolve_budget(1234, 1) == 1234
    for bad in ("abc", "0x", "-3", "nanx"):
        with pytest.raises(BudgetError):
            resolve_budget(bad, 1000)


def test_budget_too_small_is_refused_clearly():
    with pytest.raises(BudgetError, match="at least"):
        build_embedding("full", FEATURES, 10, vocabularies=VOCABULARIES)
    with pytest.raises(BudgetError, match="at least"):
        build_embedding("hashing", FEATURES, 10)
