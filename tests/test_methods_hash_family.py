"""The hash-sharing family: hash_embedding, hashednet, robe, double_hash.

Each method is checked against its paper's definition, computed here by hand from the
library's hash functions, and for what every method owes: exact budgets, per-feature or
shared pools, pooling, sparse gradients, checkpoints and the command line.
"""

import json

import numpy as np
import pytest
import torch

from unified_embedding import Batch, FeatureSet, FeatureSpec
from unified_embedding.cli import main
from unified_embedding.embeddings import BudgetError, build_embedding
from unified_embedding.embeddings.double_hash import DoubleHashEmbedding
from unified_embedding.embeddings.hash_embedding import HashEmbedding
from unified_embedding.embeddings.hash_family import family_salt, split_budget
from unified_embedding.embeddings.hashednet import HashedNetEmbedding
from unified_embedding.embeddings.robe import RobeEmbedding
from unified_embedding.hashing import keys_to_rows, salted_keys
from unified_embedding.train import evaluate_run

FAMILY = ["hash_embedding", "hashednet", "robe", "double_hash"]
FEATURES = FeatureSet(
    [
        FeatureSpec("user", cardinality=500),
        FeatureSpec("item", cardinality=300),
        FeatureSpec("genres", kind="multivalent", pooling="mean", cardinality=18),
        FeatureSpec("gender", cardinality=2),
        FeatureSpec("age", kind="dense"),
    ]
)
NAMES = FEATURES.sparse_names


def batch_of(user, item, genres, gender) -> Batch:
    return Batch.from_ids({"user": user, "item": item, "genres": genres, "gender": gender})


def random_batch(size: int = 32, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    genres = [torch.randint(0, 18, (int(n),), generator=g).tolist() for n in torch.randint(0, 4, (size,), generator=g)]
    return batch_of(
        torch.randint(0, 500, (size,), generator=g) * 7,
        torch.randint(10_000, 10_300, (size,), generator=g),
        genres,
        torch.randint(0, 2, (size,), generator=g),
    )


def single(feature: str, value: int, size: int = 1) -> Batch:
    """A batch where `feature` holds `value` and the other features something else."""
    ids = {name: [[3]] * size for name in NAMES}
    ids[feature] = [[value]] * size
    return Batch.from_ids(ids)


def key(value: int, *salt_parts) -> torch.Tensor:
    feature, *rest = salt_parts
    return salted_keys(torch.tensor([value]), torch.tensor([family_salt(feature, *rest)]))


def bucket(value: int, size: int, *salt_parts) -> int:
    return int(keys_to_rows(key(value, *salt_parts), size))


def sign(value: int, *salt_parts) -> float:
    return 1.0 - 2.0 * float(key(value, *salt_parts) & 1)


# ------------------------------------------------------------------ budgets and options


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("budget", [131, 1000, 3333, 50_000])
def test_budget_is_met_within_one_unit(name, shared, budget):
    method = build_embedding(name, FEATURES, budget, shared=shared)
    used = method.num_parameters()
    assert used == sum(p.numel() for p in method.parameters()) and used <= budget
    if name in ("hashednet", "robe"):
        assert used == budget  # a flat array uses every parameter
    elif name == "hash_embedding":
        assert budget - used < method.num_hashes  # the leftover goes to importance rows
    else:
        assert budget - used < 16  # less than one row
    out = method(random_batch())
    assert out.shape == (32, 64) and torch.isfinite(out).all()
    assert method.out_dims == dict.fromkeys(NAMES, 16)


@pytest.mark.parametrize("name", FAMILY)
def test_budget_too_small_is_refused_clearly(name):
    with pytest.raises(BudgetError, match="at least"):
        build_embedding(name, FEATURES, 3)


def test_split_budget_is_proportional_and_wastes_less_than_a_unit():
    counts = split_budget(1000, {"a": 3, "b": 1}, {"a": 16, "b": 8}, {"a": 1, "b": 1}, method="m")
    assert counts["a"] * 16 + counts["b"] * 8 <= 1000 < counts["a"] * 16 + counts["b"] * 8 + 8
    assert counts["a"] * 16 > 2.5 * counts["b"] * 8
    with pytest.raises(BudgetError, match="at least 24"):
        split_budget(20, {"a": 3, "b": 1}, {"a": 16, "b": 8}, {"a": 1, "b": 1}, method="m")


def test_per_feature_sizes_follow_cardinality_or_are_equal():
    net = HashedNetEmbedding.from_budget(FEATURES, 8210)
    assert sum(net.sizes.values()) == 8210
    assert net.sizes["user"] > net.sizes["item"] > net.sizes["genres"] > net.sizes["gender"]
    assert set(HashedNetEmbedding.from_budget(FEATURES, 8000, allocation="equal").sizes.values()) == {2000}
    he = HashEmbedding.from_budget(FEATURES, 20_000)
    assert he.pool_rows["user"] > he.pool_rows["gender"] and he.weight_rows["user"] > he.weight_rows["gender"]
    pool = 16 * sum(he.pool_rows.values())
    assert abs(pool - 10_000) < 64  # importance_fraction=0.5 of the budget goes to importance weights
    dh = DoubleHashEmbedding.from_budget(FEATURES, 16 * 100)
    assert sum(dh.rows.values()) == 100 and dh.rows["user"] > dh.rows["gender"] >= 2


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("robe", {"block_size": 0}, "block_size"),
        ("hash_embedding", {"num_hashes": 0}, "num_hashes"),
        ("hash_embedding", {"importance_fraction": 1.5}, "importance_fraction"),
        ("double_hash", {"combine": "max"}, "combine"),
        ("hashednet", {"dim": 0}, "dim"),
    ],
)
def test_bad_options_are_clear_errors(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_embedding(name, FEATURES, 10_000, **options)


# ------------------------------------------------------------------ the papers' definitions


def test_hashednet_is_a_signed_hash_of_every_coordinate():
    net = HashedNetEmbedding(FEATURES, {"user": 97, "item": 89, "genres": 13, "gender": 5}, dim=4)
    flat = net.weight.view(-1)
    out = net(single("item", 10_123))
    base = 97  # item's array follows user's
    expected = [sign(10_123, "item", "hashednet", j) * flat[base + bucket(10_123, 89, "item", "hashednet", j)]
                for j in range(4)]  # fmt: skip
    assert torch.allclose(out[0, net.feature_slices()["item"]], torch.stack(expected))
    unsigned = HashedNetEmbedding(FEATURES, 50, dim=4, shared=True, signed=False)
    row = unsigned(single("user", 42))[0, :4]
    direct = [unsigned.weight.view(-1)[bucket(42, 50, "user", "hashednet", j)] for j in range(4)]
    assert torch.equal(row, torch.stack(direct))


def test_hashednet_signs_are_balanced_and_coordinates_independent():
    net = HashedNetEmbedding(FEATURES, 100_000, dim=16, shared=True)
    with torch.no_grad():
        net.weight.fill_(1.0)
    out = net(batch_of(torch.arange(2000), torch.arange(2000), [[1]] * 2000, torch.arange(2000)))
    out = out.detach()[:, net.feature_slices()["user"]]  # 2000 distinct values
    assert set(out.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(out.mean())) < 0.02
    assert abs(float((out[:, 0] * out[:, 1]).mean())) < 0.1  # the signs of two coordinates are unrelated


@pytest.mark.parametrize("block_size", [16, 32, 4])
def test_robe_blocks_are_consecutive_weights_of_a_circular_array(block_size):
    size = 11  # smaller than a vector: every block wraps around
    robe = RobeEmbedding(FEATURES, size, dim=16, block_size=block_size, shared=True, signed=False)
    with torch.no_grad():
        robe.weight.copy_(torch.arange(size, dtype=torch.float32).unsqueeze(1))
    vectors = robe(random_batch(64))
    z = min(block_size, 16)
    for feature in ("user", "item", "gender"):
        vector = vectors[:, robe.feature_slices()[feature]].long()
        for t in range(16 // z):
            block = vector[:, t * z : (t + 1) * z]
            assert torch.equal(block, (block[:, :1] + torch.arange(z)) % size)
    # the offset of a block is the hash of (feature, value, block)
    user = vectors[0, robe.feature_slices()["user"]].long()
    value = int(random_batch(64).ids("user")[0])
    assert int(user[0]) == bucket(value, size, "user", "robe", 0)
    if block_size == 4:
        assert int(user[4]) == bucket(value, size, "user", "robe", 1)


def test_robe_signs_apply_per_block():
    robe = RobeEmbedding(FEATURES, 1000, dim=16, block_size=4, shared=True)
    plain = RobeEmbedding(FEATURES, 1000, dim=16, block_size=4, shared=True, signed=False)
    plain.load_state_dict(robe.state_dict())
    batch = single("user", 77)
    ratio = robe(batch)[0, :16] / plain(batch)[0, :16]
    assert torch.allclose(ratio.view(4, 4), ratio.view(4, 4)[:, :1].expand(4, 4))
    assert ratio.view(4, 4)[:, 0].tolist() == [sign(77, "user", "robe", t) for t in range(4)]


def test_hash_embedding_mixes_k_pooled_components_with_hashed_importance_weights():
    pools = {"user": 40, "item": 30, "genres": 5, "gender": 3}
    weights = {"user": 200, "item": 100, "genres": 20, "gender": 4}
    he = HashEmbedding(FEATURES, pools, weights, dim=8, num_hashes=3)
    assert he.num_parameters() == 8 * sum(pools.values()) + 3 * sum(weights.values())
    value, base = 4321, 8 * 0  # user's pool comes first
    out = he(single("user", value))[0, :8]
    p = he.importance[bucket(value, 200, "user", "hash_embedding", "importance")]  # user's weights come first too
    components = [he.weight[base + bucket(value, 40, "user", f"hash_embedding/{i}")] for i in range(3)]
    assert torch.allclose(out, sum(p[i] * components[i] for i in range(3)))


def test_hash_embedding_can_append_its_importance_weights():
    he = HashEmbedding.from_budget(FEATURES, 20_000, append_weights=True)
    assert he.out_dims == dict.fromkeys(NAMES, 18)
    plain = HashEmbedding.from_budget(FEATURES, 20_000)
    plain.load_state_dict(he.state_dict())
    batch = batch_of(torch.tensor([5, 6]), torch.tensor([1, 2]), [[1, 2, 3], []], torch.tensor([0, 1]))
    out, vectors = he(batch), plain(batch)
    slices = he.feature_slices()
    genres = out[:, slices["genres"]]
    assert torch.allclose(genres[:, :16], vectors[:, plain.feature_slices()["genres"]])
    first = he.importance[[int(bucket(v, he.weight_rows["genres"], "genres", "hash_embedding", "importance"))
                           + sum(he.weight_rows[n] for n in ("user", "item")) for v in (1, 2, 3)]]  # fmt: skip
    assert torch.allclose(genres[0, 16:], first.mean(0))  # pooled like the feature: mean
    assert torch.equal(genres[1], torch.zeros(18))


def test_importance_weights_learn():
    he = HashEmbedding.from_budget(FEATURES, 20_000)
    he(random_batch()).pow(2).sum().backward()
    assert he.importance.grad.abs().sum() > 0 and he.weight.grad.abs().sum() > 0


def test_double_hash_sums_a_row_of_each_of_two_tables():
    dh = DoubleHashEmbedding(FEATURES, {"user": 21, "item": 10, "genres": 4, "gender": 2}, dim=8)
    assert dh.num_parameters() == 8 * 37
    out = dh(single("user", 99))[0, :8]
    rows = (bucket(99, 11, "user", "double_hash/0"), 11 + bucket(99, 10, "user", "double_hash/1"))
    assert torch.allclose(out, dh.weight[rows[0]] + dh.weight[rows[1]])
    concat = DoubleHashEmbedding(FEATURES, {"user": 21, "item": 10, "genres": 4, "gender": 2}, dim=8, combine="concat")
    assert concat.num_parameters() == 4 * 37 and concat.out_dims["user"] == 8
    table = concat.weight.view(-1, 4)  # half-width rows: user's first table (11 rows), then its second (10)
    out = concat(single("user", 99))[0, :8]
    expected = torch.cat(
        [table[bucket(99, 11, "user", "double_hash/0")], table[11 + bucket(99, 10, "user", "double_hash/1")]]
    )
    assert torch.allclose(out, expected)


def test_double_hash_separates_values_that_collide_in_one_table():
    dh = DoubleHashEmbedding(FEATURES, 2 * 50, dim=8, shared=True)
    vectors = dh(batch_of(torch.arange(400), torch.arange(400), [[0]] * 400, torch.arange(400)))[:, :8]
    first = [bucket(v, 50, "user", "double_hash/0") for v in range(400)]
    assert len(set(first)) <= 50  # 400 users in 50 rows of the first table...
    # ...yet pairs of rows tell them apart: about C(400, 2) / 2500 = 32 pairs collide in both
    # tables, so ~368 distinct vectors, where one table of the same 100 rows holds at most 100
    assert torch.unique(vectors, dim=0).shape[0] > 340


# ------------------------------------------------------------------ frequency hybrid


def test_double_hash_frequency_hybrid_gives_top_ids_dedicated_rows():
    ranked = {"user": np.array([70, 7, 70, 14, 21, 28]), "item": [10_005, 10_006]}  # most frequent first
    dh = DoubleHashEmbedding.from_budget(FEATURES, 16 * 40, frequency=True, frequent_ids=ranked,
                                         frequent_fraction=0.3, allocation="equal")  # fmt: skip
    assert dh.num_parameters() <= 16 * 40
    assert dh.frequent_counts == {"user": 5, "item": 2, "genres": 0, "gender": 0}  # repeats dropped, lists exhausted
    user = torch.tensor([70, 7, 14, 21, 28, 35, 42])
    batch = batch_of(user, torch.full((7,), 10_005), [[0]] * 7, torch.zeros(7, dtype=torch.int64))
    x = dh.expand(batch)
    rows, weights = dh.rows_and_weights(x)
    first, second = rows[x.lookup_of == 0], rows[x.lookup_of == 4]  # user's lookups in the two summands
    w_second = weights[x.lookup_of == 4]
    dedicated = first[:5]
    assert len(set(dedicated.tolist())) == 5 and int(dedicated.min()) >= dh.num_rows - 7  # dedicated rows come last
    assert w_second[:5].tolist() == [0.0] * 5 and w_second[5:].tolist() == [1.0, 1.0]
    out = dh(batch)[:, :16]
    assert torch.allclose(out[:5], dh.weight[dedicated])  # a frequent id is its own row, nothing else
    tail = dh.weight[first[5:]] + dh.weight[second[5:]]
    assert torch.allclose(out[5:], tail)


def test_double_hash_frequency_rows_are_collision_free_and_train_alone():
    ranked = {"user": np.arange(0, 3500, 7)}  # every user is frequent
    dh = DoubleHashEmbedding.from_budget(FEATURES, 16 * 1000, frequency=True, frequent_ids=ranked,
                                         frequent_fraction=0.6)  # fmt: skip
    assert dh.frequent_counts["user"] == 500
    users = torch.arange(0, 3500, 7)
    batch = batch_of(users, torch.full((500,), 10_000), [[]] * 500, torch.zeros(500, dtype=torch.int64))
    assert torch.unique(dh(batch)[:, :16], dim=0).shape[0] == 500
    dh(batch_of(users[:1], torch.tensor([10_000]), [[]], torch.tensor([0])))[:, :16].sum().backward()
    touched = (dh.weight.grad.abs().sum(1) > 0).nonzero().view(-1)
    assert touched.numel() == 1  # only the dedicated row of that user


def test_frequency_without_frequencies_is_a_clear_error():
    with pytest.raises(ValueError, match="frequent_ids.*ue train. computes them"):
        build_embedding("double_hash", FEATURES, 10_000, frequency=True)
    with pytest.raises(ValueError, match="unknown features"):
        build_embedding("double_hash", FEATURES, 10_000, frequency=True, frequent_ids={"nope": [1]})
    plain = build_embedding("double_hash", FEATURES, 10_000, frequent_ids={"user": [1]})
    assert not plain.frequency  # ignored unless frequency=True


# ------------------------------------------------------------------ shared or per-feature pools


ROW_METHODS = {"hash_embedding": {}, "double_hash": {}, "double_hash/concat": {"combine": "concat"}}


@pytest.mark.parametrize("variant", ROW_METHODS)
def test_per_feature_pools_are_disjoint_and_a_shared_pool_is_salted_per_feature(variant):
    name, options = variant.split("/")[0], ROW_METHODS[variant]
    method = build_embedding(name, FEATURES, 20_000, **options)
    batch = batch_of(torch.arange(300), torch.arange(300), [[v] for v in range(300)], torch.arange(300))
    x = method.expand(batch)
    rows, _ = method.rows_and_weights(x)
    feature = method.lookup_feature[x.lookup_of]
    regions = [set(rows[feature == f].tolist()) for f in range(4)]
    assert all(not regions[i] & regions[j] for i in range(4) for j in range(i + 1, 4))
    shared = build_embedding(name, FEATURES, 20_000, shared=True, **options)
    x = shared.expand(batch)
    rows, _ = shared.rows_and_weights(x)
    lookups_per_feature = shared.lookup_feature[x.lookup_of]
    user, item = rows[lookups_per_feature == 0], rows[lookups_per_feature == 1]
    assert float((user == item).double().mean()) < 0.1  # same ids, different salts
    assert int(rows.max()) < shared.num_rows


@pytest.mark.parametrize("name", ["hashednet", "robe"])
def test_flat_arrays_per_feature_or_shared(name):
    method = build_embedding(name, FEATURES, 10_000)
    x = method.expand(random_batch(64))
    rows, _ = method.rows_and_weights(x)
    feature = method.lookup_feature[x.lookup_of]
    bounds = np.cumsum([0] + [method.sizes[n] for n in NAMES])
    for f in range(4):
        assert bounds[f] <= int(rows[feature == f].min()) and int(rows[feature == f].max()) < bounds[f + 1]
    shared = build_embedding(name, FEATURES, 10_000, shared=True)
    assert shared.num_rows == 10_000 and set(shared.sizes.values()) == {10_000}


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("shared", [False, True])
def test_features_of_different_widths(name, shared):
    features = FeatureSet([FeatureSpec("user", dim=16, cardinality=100), FeatureSpec("gender", dim=8, cardinality=2)])
    method = build_embedding(name, features, 3000, shared=shared)
    assert method.out_dims == {"user": 16, "gender": 8} and method.num_parameters() <= 3000
    out = method(Batch.from_ids({"user": torch.arange(10), "gender": torch.arange(10) % 2}))
    assert out.shape == (10, 24)
    assert torch.unique(out[:, :16], dim=0).shape[0] == 10


# ------------------------------------------------------------------ pooling, batches, gradients


@pytest.mark.parametrize("name", FAMILY)
def test_mean_pooling_and_empty_lists(name):
    method = build_embedding(name, FEATURES, 20_000)
    out = method(batch_of([[1]] * 2, [[10_000]] * 2, [[1, 2, 5], []], [[0]] * 2))
    genres = method.feature_slices()["genres"]
    each = torch.stack([method(single("genres", v))[0, genres] for v in (1, 2, 5)])
    assert torch.allclose(out[0, genres], each.mean(0), atol=1e-7)
    assert torch.equal(out[1, genres], torch.zeros(16))


@pytest.mark.parametrize("name", FAMILY)
def test_sum_pooling(name):
    features = FeatureSet([FeatureSpec("tags", kind="multivalent", pooling="sum", cardinality=100)])
    method = build_embedding(name, features, 5000)
    out = method(Batch.from_ids({"tags": [[4, 9], [4], [9]]}))
    assert torch.allclose(out[0], out[1] + out[2], atol=1e-7)


@pytest.mark.parametrize("name", FAMILY)
def test_batch_order_and_extra_features_do_not_matter(name):
    method = build_embedding(name, FEATURES, 20_000)
    batch = random_batch(8)
    ids = {k: batch.ids(k) for k in ("user", "item", "gender")}
    genres = [[1, 2]] * 8
    plain = batch_of(ids["user"], ids["item"], genres, ids["gender"])
    reordered = Batch.from_ids({"extra": torch.arange(8), "gender": ids["gender"], "genres": genres,
                                "item": ids["item"], "user": ids["user"]})  # fmt: skip
    assert torch.equal(method(plain), method(reordered))
    with pytest.raises(KeyError, match="genres"):
        method(Batch.from_ids({"user": ids["user"], "item": ids["item"], "gender": ids["gender"]}))


@pytest.mark.parametrize("name", FAMILY)
def test_sparse_gradients_train_with_sparse_adam(name):
    method = build_embedding(name, FEATURES, 20_000, sparse=True)
    before = [p.detach().clone() for p in method.parameters()]
    optimizer = torch.optim.SparseAdam(list(method.parameters()), lr=0.01)
    method(random_batch()).pow(2).sum().backward()
    assert all(p.grad.is_sparse for p in method.parameters())
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, method.parameters(), strict=True))


@pytest.mark.parametrize("name", ["hashednet", "robe"])
def test_flat_gather_gives_the_same_gradients_as_embedding_bag(name):
    dense = build_embedding(name, FEATURES, 5000)
    sparse = build_embedding(name, FEATURES, 5000, sparse=True)
    sparse.load_state_dict(dense.state_dict())
    batch = random_batch()
    assert torch.allclose(dense(batch), sparse(batch), atol=1e-7)
    dense(batch).pow(2).sum().backward()
    sparse(batch).pow(2).sum().backward()
    assert torch.allclose(dense.weight.grad, sparse.weight.grad.to_dense(), atol=1e-6)


# ------------------------------------------------------------------ determinism and checkpoints


def test_rows_are_pinned_across_versions():
    """Same (feature, value) -> same rows, forever: checkpoints depend on it."""
    assert bucket(12345, 1000, "user", "hashednet", 3) == 88
    assert bucket(12345, 1000, "user", "robe", 0) == 134
    assert bucket(12345, 1000, "user", "hash_embedding/1") == 198
    assert bucket(12345, 1000, "user", "hash_embedding", "importance") == 88
    assert bucket(12345, 1000, "user", "double_hash/0") == 934


@pytest.mark.parametrize("name", FAMILY)
def test_a_rebuilt_method_loads_its_checkpoint(name):
    options = {"frequency": True, "frequent_ids": {"user": np.arange(0, 700, 7)}} if name == "double_hash" else {}
    torch.manual_seed(0)
    first = build_embedding(name, FEATURES, 20_000, **options)
    torch.manual_seed(1)
    second = build_embedding(name, FEATURES, 20_000, **options)
    batch = random_batch()
    assert not torch.equal(first(batch), second(batch))
    second.load_state_dict(first.state_dict())
    assert torch.equal(first(batch), second(batch))


@pytest.mark.parametrize("name, options", [(m, []) for m in FAMILY] + [("robe", ["shared=True", "block_size=8"])])
def test_cli_trains_and_evaluate_reproduces(name, options, data_dir, tmp_path):
    output = tmp_path / "run.json"
    extra = [arg for option in options for arg in ("--method-option", option)]
    code = main(["train", "--dataset", "criteo", "--method", name, "--model", "dcnv2", "--budget", "0.25x",
                 "--data-dir", str(data_dir), "--epochs", "1", "--batch-size", "256", "--output", str(output),
                 "--quiet", "--model-option", "hidden=[16]", "--model-option", "num_cross_layers=1", *extra])  # fmt: skip
    assert code == 0
    run = json.loads(output.read_text())
    assert run["num_embedding_params"] <= run["budget"] and run["budget"] - run["num_embedding_params"] < 16
    assert 0.5 < run["test_auc"] <= 1
    assert evaluate_run(output, "test")["auc"] == pytest.approx(run["test_auc"], abs=1e-9)
