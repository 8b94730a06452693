"""Composition and factorisation methods: qr, tt_rec, low_rank, pq.

Each mechanism is checked against a direct computation from the stored parameters and
the library's hash, and every method (per feature and shared) against the budget rules.
"""

import math

import pytest
import torch
from test_embeddings import FEATURES, FULL_SIZE, VOCABULARIES

from unified_embedding import Batch, FeatureSet, FeatureSpec
from unified_embedding.embeddings import BudgetError, build_embedding
from unified_embedding.embeddings.composition import apportion, feature_bags
from unified_embedding.embeddings.low_rank import LowRankEmbedding
from unified_embedding.embeddings.pq import ProductQuantizedEmbedding
from unified_embedding.embeddings.qr import QREmbedding
from unified_embedding.embeddings.tt_rec import TTRecEmbedding, core_parameters, dim_factors, row_factors
from unified_embedding.hashing import hash_to_rows, salt

METHODS = ["qr", "tt_rec", "low_rank", "pq"]


def one_hot_batch(n: int = 400) -> Batch:
    """n examples whose user ids are distinct (0, 1, ...); genres has 0-3 values each."""
    g = torch.Generator().manual_seed(0)
    genres = [torch.randint(0, 18, (int(k),), generator=g).tolist() for k in torch.randint(0, 4, (n,), generator=g)]
    return Batch.from_ids(
        {
            "user": torch.arange(n),
            "item": torch.randint(0, 10**9, (n,), generator=g),
            "genres": genres,
            "gender": torch.randint(0, 3, (n,), generator=g),
        },
        dense=torch.zeros(n, 1),
    )


def index_of(values: torch.Tensor, feature: str, size: int) -> torch.Tensor:
    """The index the composition methods give a value: the library's salted hash into [0, size)."""
    return hash_to_rows(values, torch.full_like(values, salt(feature, 0)), size)


# ---------------------------------------------------------------- qr


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_qr_combines_the_quotient_and_remainder_rows_of_the_hashed_index(operation, shared):
    q, m = (
        (13, 7)
        if shared
        else ({"user": 13, "item": 9, "genres": 4, "gender": 2}, {"user": 7, "item": 5, "genres": 3, "gender": 2})
    )
    method = QREmbedding(FEATURES, q, m, operation=operation, shared=shared)
    assert method.num_parameters() == method.quotient.numel() + method.remainder.numel()
    batch = one_hot_batch()
    out = method(batch)[:, method.feature_slices()["item"]]
    q_item, m_item = method.quotient_rows["item"], method.remainder_rows["item"]
    index = index_of(batch.ids("item"), "item", q_item * m_item)
    q_rows = method.quotient[method.quotient_base[1] + index // m_item]
    r_rows = method.remainder[method.remainder_base[1] + index % m_item]
    expected = {"mult": q_rows * r_rows, "add": q_rows + r_rows, "concat": torch.cat([q_rows, r_rows], 1)}[operation]
    assert torch.allclose(out, expected)
    assert method.quotient.shape[1] == (8 if operation == "concat" else 16)


def test_qr_values_with_the_same_quotient_share_the_quotient_row():
    method = QREmbedding(FEATURES, 6, 5, operation="add", shared=True)
    batch = one_hot_batch(200)
    index = index_of(batch.ids("user"), "user", 30)
    out = method(batch)[:, :16]
    q_of = (index // 5).tolist()
    pairs = [
        (a, b) for a in range(200) for b in range(a + 1, 200) if q_of[a] == q_of[b] and index[a] % 5 != index[b] % 5
    ]
    assert pairs, "200 values in 6 quotient rows must share some"
    for a, b in pairs[:20]:
        # add: out = Q[q] + R[r], so subtracting each value's own R row leaves the same Q row
        shared_q = out[a] - method.remainder[index[a] % 5]
        assert torch.allclose(shared_q, out[b] - method.remainder[index[b] % 5], atol=1e-6)
        assert torch.allclose(shared_q, method.quotient[q_of[a]], atol=1e-6)
    # only equal indices share both rows: values with different indices get different vectors
    distinct = {tuple(v) for v in out[:, :16].round(decimals=6).tolist()}
    assert len(distinct) == len(set(index.tolist()))


@pytest.mark.parametrize("name", ["qr", "tt_rec", "low_rank"])
def test_factors_start_at_one_scale_and_products_at_a_plain_rows_scale(name):
    method = build_embedding(name, FEATURES, FULL_SIZE // 10)
    stds = [float(p.detach().std()) for p in method.parameters()]
    assert max(stds) < 1.3 * min(stds)  # no factor starts near 1 next to one near 0.03 (Adam would stall it)
    plain_row_std = 0.05 / math.sqrt(3)
    assert 0.7 * plain_row_std < float(method(one_hot_batch()).detach()[:, :32].std()) < 1.3 * plain_row_std


def test_qr_sqrt_allocation_gives_every_feature_a_similar_range_per_value():
    method = QREmbedding.from_budget(FEATURES, FULL_SIZE // 2)
    ratios = [
        method.quotient_rows[f.name] * method.remainder_rows[f.name] / (f.cardinality + 1) for f in FEATURES.sparse
    ]
    assert max(ratios) < 1.5 * min(ratios)
    for name in ("user", "item"):
        assert abs(method.quotient_rows[name] - method.remainder_rows[name]) <= 1  # the even split


# ---------------------------------------------------------------- tt_rec


def full_tt_table(method: TTRecEmbedding, feature: str) -> torch.Tensor:
    """The [n1*n2*n3, dim] table that a feature's three cores encode, contracted directly."""
    position = FEATURES.sparse_names.index(feature)
    (n1, n2, n3), (d1, d2, d3), r = method.shapes[feature], method.dims, method.rank
    b1, b2, b3 = method.core_base[position].tolist()
    g1 = method.core1[b1 : b1 + n1].view(n1, d1, r)
    g2 = method.core2[b2 : b2 + n2].view(n2, r, d2, r)
    g3 = method.core3[b3 : b3 + n3].view(n3, r, d3)
    table = torch.einsum("xja,yakb,zbl->xyzjkl", g1, g2, g3)
    return table.reshape(n1 * n2 * n3, d1 * d2 * d3)


@pytest.mark.parametrize("shared", [False, True])
def test_tt_rec_rows_are_the_contraction_of_the_cores(shared):
    shapes = (5, 3, 4) if shared else {"user": (5, 3, 4), "item": (4, 2, 4), "genres": (2, 2, 2), "gender": (2, 1, 2)}
    method = TTRecEmbedding(FEATURES, shapes, rank=3, shared=shared)
    assert method.num_parameters() == method.core1.numel() + method.core2.numel() + method.core3.numel()
    batch = one_hot_batch()
    for feature in ("user", "item"):
        table = full_tt_table(method, feature)
        index = index_of(batch.ids(feature), feature, table.shape[0])
        assert torch.allclose(method(batch)[:, method.feature_slices()[feature]], table[index], atol=1e-6)


def test_tt_rec_table_has_tt_rank_at_most_the_core_rank():
    method = TTRecEmbedding(FEATURES, (6, 5, 6), rank=2, shared=True)
    table = full_tt_table(method, "user").detach().view(6, 5, 6, 4, 2, 2)
    # unfolding (i1, j1) x (i2, i3, j2, j3): its rank is bounded by the first TT rank
    unfolded = table.permute(0, 3, 1, 2, 4, 5).reshape(6 * 4, -1)
    assert torch.linalg.matrix_rank(unfolded) == 2
    assert TTRecEmbedding(FEATURES, (6, 5, 6), rank=4, shared=True).num_parameters() > method.num_parameters()


def test_tt_rec_from_budget_takes_the_largest_rank_covering_every_table():
    budget = FULL_SIZE // 10
    method = TTRecEmbedding.from_budget(FEATURES, budget)
    d = dim_factors(16)
    assert d == (4, 2, 2)
    covering = {f.name: row_factors(f.cardinality + 1) for f in FEATURES.sparse}
    assert all(math.prod(method.shapes[n]) >= math.prod(covering[n]) for n in covering)
    assert sum(core_parameters(n, d, method.rank) for n in covering.values()) <= budget
    assert sum(core_parameters(n, d, method.rank + 1) for n in covering.values()) > budget
    assert budget - method.num_parameters() < min(d[0], d[2]) * method.rank


def test_tt_rec_row_factors_are_balanced_and_cover():
    for rows in (1, 2, 3, 19, 501, 4083, 10**6):
        n = row_factors(rows)
        assert math.prod(n) >= rows and max(n) <= math.ceil(rows ** (1 / 3)) + 1
        assert n[1] == min(n)  # the middle core (rank squared) gets the smallest factor


def test_tt_rec_below_rank_one_shrinks_the_tables_then_refuses_with_the_floor():
    tiny = TTRecEmbedding.from_budget(FEATURES, 60)
    assert tiny.rank == 1 and tiny.num_parameters() <= 60
    assert math.prod(tiny.shapes["user"]) < 501  # hashed into fewer rows than values
    with pytest.raises(BudgetError, match="at least 32 parameters"):
        TTRecEmbedding.from_budget(FEATURES, 31)


# ---------------------------------------------------------------- low_rank


@pytest.mark.parametrize("shared", [False, True])
def test_low_rank_is_a_narrow_row_times_the_feature_projection(shared):
    method = LowRankEmbedding(
        FEATURES, 40 if shared else {"user": 40, "item": 30, "genres": 10, "gender": 3}, rank=3, shared=shared
    )
    assert method.num_parameters() == method.narrow.numel() + method.projection.numel()
    batch = one_hot_batch()
    out = method(batch)
    for position, feature in enumerate(("user", "item")):
        rows = method.row_base[position] + index_of(batch.ids(feature), feature, method.rows[feature])
        projection = method.projection[position]  # per feature, even with a shared narrow table
        assert torch.allclose(out[:, method.feature_slices()[feature]], method.narrow[rows] @ projection, atol=1e-6)
    # every feature's vectors lie in an r-dimensional subspace
    assert torch.linalg.matrix_rank(out[:, :16].detach()) == 3


def test_low_rank_from_budget_picks_the_largest_rank_that_keeps_every_value_a_row():
    budget = FULL_SIZE * 3 // 10
    method = LowRankEmbedding.from_budget(FEATURES, budget)
    rows_needed = sum(f.cardinality + 1 for f in FEATURES.sparse)
    assert method.rank == budget // (rows_needed + 16 * 4) == 4
    assert all(method.rows[f.name] >= f.cardinality for f in FEATURES.sparse)
    assert budget - method.num_parameters() < method.rank
    assert LowRankEmbedding.from_budget(FEATURES, 100 * FULL_SIZE).rank == 16  # never wider than the output


# ---------------------------------------------------------------- pq


@pytest.mark.parametrize("shared", [False, True])
def test_pq_concatenates_one_hashed_codeword_per_codebook(shared):
    codewords = 11 if shared else {"user": 11, "item": 7, "genres": 5, "gender": 2}
    method = ProductQuantizedEmbedding(FEATURES, codewords, codebooks=4, shared=shared)
    sizes = [11] if shared else [11, 7, 5, 2]
    assert method.num_parameters() == method.weight.numel() == 16 * sum(sizes)  # codebooks only, no stored codes
    assert method.num_bytes() == 4 * method.num_parameters()
    batch = one_hot_batch()
    out = method(batch)[:, method.feature_slices()["item"]]
    base = 0 if shared else 4 * 11
    k = method.codewords["item"]
    for j in range(4):
        ids = batch.ids("item")
        code = hash_to_rows(ids, torch.full_like(ids, salt("item", j)), k)
        assert torch.equal(out[:, 4 * j : 4 * j + 4], method.weight[base + j * k + code])


def test_pq_values_collide_entirely_only_when_every_code_does():
    method = ProductQuantizedEmbedding(FEATURES, 8, codebooks=4, shared=True)
    out = method(one_hot_batch(1000))[:, :16]
    chunks = out.view(1000, 4, 4)
    same_first_code = float((chunks[:, None, 0] == chunks[None, :, 0]).all(-1).double().mean())
    same_vector = float((out[:, None] == out[None, :]).all(-1).double().mean())
    assert 0.08 < same_first_code < 0.2  # one codebook of 8: about 1/8 of pairs share a codeword
    assert same_vector < 0.01  # all four: about 1/8^4 of pairs, plus a value with itself (1/1000)


# ---------------------------------------------------------------- every method, per feature and shared


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("fraction", [0.01, 0.03, 0.1, 0.3, 1.0])
def test_budget_is_met_with_less_than_one_row_to_spare(name, shared, fraction):
    budget = int(FULL_SIZE * fraction)
    method = build_embedding(name, FEATURES, budget, vocabularies=VOCABULARIES, shared=shared)
    used = method.num_parameters()
    assert used == sum(p.numel() for p in method.parameters())
    assert used <= budget and budget - used < max(0.01 * budget, 16)
    assert method.out_dims == {"user": 16, "item": 16, "genres": 16, "gender": 16}
    out = method(one_hot_batch(64))
    out.square().sum().backward()
    assert out.shape == (64, 64) and torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.parameters())


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("name", METHODS)
def test_tiny_budgets_are_refused_with_the_floor(name, shared):
    with pytest.raises(BudgetError, match="at least"):
        build_embedding(name, FEATURES, 7, shared=shared)


@pytest.mark.parametrize("name", METHODS)
def test_unseen_ids_multivalent_means_and_empty_lists(name):
    method = build_embedding(name, FEATURES, FULL_SIZE // 5)
    batch = Batch.from_ids(
        {"user": [[10**12], [-5]], "item": [[3], [3]], "genres": [[1, 2, 5], []], "gender": [[1], [1]]}
    )
    out = method(batch)
    genres = method.feature_slices()["genres"]
    singles = method(
        Batch.from_ids({"user": [[0]] * 3, "item": [[0]] * 3, "genres": [[1], [2], [5]], "gender": [[1]] * 3})
    )
    assert torch.allclose(out[0, genres], singles[:, genres].mean(0), atol=1e-6)
    assert torch.equal(out[1, genres], torch.zeros(16))
    assert torch.isfinite(out).all() and not torch.equal(out[0, :16], out[1, :16])


@pytest.mark.parametrize("name", METHODS)
def test_batch_feature_order_does_not_matter_and_a_missing_feature_is_named(name):
    method = build_embedding(name, FEATURES, FULL_SIZE // 5)
    batch = one_hot_batch(4)
    ids = {k: batch.ids(k) for k in ("user", "item", "gender")}
    genres = [[1, 2], [], [3], [4, 4, 5]]
    plain = Batch.from_ids({"user": ids["user"], "item": ids["item"], "genres": genres, "gender": ids["gender"]})
    reordered = Batch.from_ids({"gender": ids["gender"], "genres": genres, "item": ids["item"], "user": ids["user"]})
    assert torch.equal(method(reordered), method(plain))
    with pytest.raises(KeyError, match="genres"):
        method(Batch.from_ids({"user": torch.tensor([1]), "item": torch.tensor([1]), "gender": torch.tensor([1])}))


@pytest.mark.parametrize("name", METHODS)
def test_shared_must_be_a_bool_not_a_command_line_string(name):
    with pytest.raises(TypeError, match="shared must be True or False"):
        build_embedding(name, FEATURES, FULL_SIZE // 5, shared="false")


def test_sparse_gradients_where_the_method_is_only_tables():
    for name in ("qr", "pq"):
        method = build_embedding(name, FEATURES, FULL_SIZE // 5, sparse=True)
        method(one_hot_batch(8)).sum().backward()
        assert method.sparse and all(p.grad.is_sparse for p in method.parameters())
    for name in ("tt_rec", "low_rank"):
        with pytest.raises(ValueError, match="sparse"):
            build_embedding(name, FEATURES, FULL_SIZE // 5, sparse=True)


def test_feature_bags_put_values_in_feature_order():
    batch = Batch.from_ids({"b": [[5], [6, 7]], "a": [[1], []]})
    bags = feature_bags(batch, ["a", "b"])
    assert bags.values.tolist() == [1, 5, 6, 7]
    assert bags.feature.tolist() == [0, 1, 1, 1]
    assert bags.offsets.tolist() == [0, 1, 1, 2, 4]


def test_apportion_sums_exactly_and_keeps_the_minimum():
    parts = apportion(100, {"a": 1.0, "b": 2.0, "c": 1000.0}, minimum=2)
    assert sum(parts.values()) == 100 and min(parts.values()) >= 2
    assert parts["c"] > parts["b"] >= parts["a"]
    with pytest.raises(ValueError):
        apportion(5, {"a": 1.0, "b": 1.0, "c": 1.0}, minimum=2)


def test_per_feature_methods_need_cardinalities():
    features = FeatureSet([FeatureSpec("user"), FeatureSpec("item")])
    for name in METHODS:
        with pytest.raises(ValueError, match="cardinalit"):
            build_embedding(name, features, 1000)
    assert build_embedding("pq", features, 1000, shared=True).num_parameters() == 992
    assert build_embedding("qr", features, 1000, shared=True).num_parameters() == 992
