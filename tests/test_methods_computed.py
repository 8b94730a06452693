"""DHE, mixed-dimension embeddings and PEP: each mechanism against a direct computation, counts, budgets."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_embeddings import FEATURES, FULL_SIZE, VOCABULARIES, make_batch

from unified_embedding import Batch, FeatureSet, FeatureSpec
from unified_embedding.embeddings import BudgetError, build_embedding
from unified_embedding.embeddings.dhe import (
    ENCODING_SALT,
    MIN_ENCODINGS,
    MIN_HIDDEN,
    DecoderShape,
    DeepHashEmbedding,
    decoder_shape,
)
from unified_embedding.embeddings.mixed_dim import MixedDimensionEmbedding, budget_widths, power_law_widths
from unified_embedding.embeddings.pep import PEPEmbedding, largest_keep, stored_words
from unified_embedding.hashing import keys_to_rows, salt, salted_keys

FRACTIONS = [0.01, 0.03, 0.1, 0.3, 1.0]
SIZES = {name: len(ids) + 1 for name, ids in VOCABULARIES.items()}  # rows per feature, OOV included


def one_id_batch(user, item=10_000, genres=(0,), gender=11) -> Batch:
    n = len(user)
    return Batch.from_ids({"user": torch.as_tensor(user), "item": torch.full((n,), item),
                           "genres": [list(genres)] * n, "gender": torch.full((n,), gender)})  # fmt: skip


# ----------------------------------------------------------------------------------------- DHE


def direct_dhe(method: DeepHashEmbedding, feature: str, ids: torch.Tensor, group: int = 0) -> torch.Tensor:
    """The paper's pipeline written out: k hashes -> [-1, 1] -> MLP (Mish between layers)."""
    key = salted_keys(ids, torch.full_like(ids, salt(feature, 0)))
    salts = torch.tensor([salt(ENCODING_SALT, j) for j in range(method.shape.encodings)])
    buckets = keys_to_rows(salted_keys(key[:, None], salts[None, :]), method.buckets).double()
    x = (2 * buckets / (method.buckets - 1) - 1).float()
    layers = list(zip(method.decoder.weights, method.decoder.biases, strict=True))
    for i, (weight, bias) in enumerate(layers):
        x = x @ weight[group] + bias[group, 0]
        if i < len(layers) - 1:
            x = x * torch.tanh(F.softplus(x))  # Mish
    return x


def test_dhe_has_no_table_and_gives_distinct_ids_distinct_vectors():
    dhe = DeepHashEmbedding(FEATURES, DecoderShape(32, 24, 2, 16))
    # every parameter is the decoder's: nothing grows with the number of ids
    assert (
        dhe.num_parameters() == DecoderShape(32, 24, 2, 16).num_parameters == 32 * 24 + 24 + 24 * 24 + 24 + 24 * 16 + 16
    )
    assert {tuple(p.shape[1:]) for p in dhe.parameters()} <= {(32, 24), (24, 24), (24, 16), (1, 24), (1, 16)}
    ids = torch.arange(3000) * 7919 - 10**9  # training-split ids or not: DHE cannot tell
    out = dhe(one_id_batch(ids))[:, :16]
    assert torch.cdist(out, out).add(torch.eye(3000) * 1e9).min() > 1e-4  # all 3000 vectors differ
    assert torch.equal(dhe(one_id_batch(ids[:5]))[:, :16], out[:5])  # an id always gets the same vector
    both = dhe(Batch.from_ids({"user": ids[:50], "item": ids[:50], "genres": [[0]] * 50, "gender": ids[:50]}))
    assert not torch.allclose(both[:, :16], both[:, 16:32])  # the same id under two features differs


def test_dhe_is_hash_encoding_then_mlp():
    dhe = DeepHashEmbedding(FEATURES, DecoderShape(10, 12, 2, 16))
    batch = make_batch(8)
    out = dhe(batch)
    for name in ("user", "item", "gender"):
        expected = direct_dhe(dhe, name, batch.ids(name))
        assert torch.allclose(out[:, dhe.feature_slices()[name]], expected, atol=1e-5)
    # genres is multivalent, mean-pooled: the mean of its ids' vectors, zeros for an empty list
    lists = Batch.from_ids({"user": [[1], [1]], "item": [[2], [2]], "genres": [[3, 5, 5], []], "gender": [[11], [11]]})
    genres = dhe(lists)[:, dhe.feature_slices()["genres"]]
    assert torch.allclose(genres[0], direct_dhe(dhe, "genres", torch.tensor([3, 5, 5])).mean(0), atol=1e-5)
    assert torch.equal(genres[1], torch.zeros(16))


def test_dhe_per_feature_decoders_are_separate_networks():
    dhe = DeepHashEmbedding(FEATURES, DecoderShape(6, 8, 1, 16), shared=False)
    assert dhe.num_parameters() == 4 * DecoderShape(6, 8, 1, 16).num_parameters
    batch = make_batch(16)
    out = dhe(batch)
    for group, name in enumerate(("user", "item", "gender")):
        index = FEATURES.sparse_names.index(name)
        expected = direct_dhe(dhe, name, batch.ids(name), group=index)
        assert torch.allclose(out[:, dhe.feature_slices()[name]], expected, atol=1e-5)
    out.square().sum().backward()
    assert all(p.grad is not None and bool(p.grad[0].abs().sum() > 0) for p in dhe.parameters())


def test_dhe_batch_norm_normalises_each_decoder_over_its_own_ids():
    dhe = DeepHashEmbedding(FEATURES, DecoderShape(6, 8, 1, 16, batch_norm=True), shared=False)
    assert dhe.num_parameters() == 4 * (6 * 8 + 8 + 8 * 16 + 16 + 2 * 8)  # gamma and beta per hidden unit
    users, items = torch.arange(10) * 7, torch.arange(3) + 10_000  # 10 distinct users, 3 distinct items
    batch = Batch.from_ids({"user": users, "item": items.repeat(4)[:10], "genres": [[1]] * 10, "gender": [[11]] * 10})
    out = dhe(batch)
    for index, (name, ids) in enumerate([("user", users), ("item", items)]):
        key = salted_keys(ids, torch.full_like(ids, salt(name, 0)))
        hidden = dhe.encode(key) @ dhe.decoder.weights[0][index] + dhe.decoder.biases[0][index, 0]
        hidden = F.batch_norm(hidden, None, None, training=True, eps=1e-5)  # statistics of this feature's ids only
        hidden = F.mish(hidden * dhe.decoder.norms[0].weight[index, 0] + dhe.decoder.norms[0].bias[index, 0])
        expected = hidden @ dhe.decoder.weights[1][index] + dhe.decoder.biases[1][index, 0]
        got = out[:, dhe.feature_slices()[name]]
        assert torch.allclose(got if name == "user" else got[:3], expected, atol=1e-5)
    dhe.eval()  # evaluation reads the running statistics: one example's vector no longer depends on the batch
    first = Batch.from_ids({name: [batch.ids(name)[:1].tolist()] for name in batch.keys})
    assert torch.allclose(dhe(batch)[:1], dhe(first))


def test_dhe_gaussian_encoding_is_standard_normal():
    dhe = DeepHashEmbedding(FEATURES, DecoderShape(7, 4, 1, 16), distribution="gaussian")
    codes = dhe.encode(torch.arange(20_000))
    assert codes.shape == (20_000, 7)
    assert abs(float(codes.mean())) < 0.02 and abs(float(codes.std()) - 1) < 0.02
    uniform = DeepHashEmbedding(FEATURES, DecoderShape(7, 4, 1, 16)).encode(torch.arange(20_000))
    assert (
        float(uniform.min()) >= -1 and float(uniform.max()) <= 1 and abs(float(uniform.std()) - 1 / math.sqrt(3)) < 0.01
    )


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("shared", [True, False])
def test_dhe_from_budget_fills_the_budget(fraction, shared):
    budget = int(FULL_SIZE * fraction)
    if not shared and budget < 4 * DecoderShape(MIN_ENCODINGS, MIN_HIDDEN, 2, 16).num_parameters:
        with pytest.raises(BudgetError, match="at least 480 parameters"):
            build_embedding("dhe", FEATURES, budget, shared=False)
        return
    dhe = build_embedding("dhe", FEATURES, budget, shared=shared)
    assert dhe.num_parameters() <= budget
    assert budget - dhe.num_parameters() < max(0.01 * budget, 16) * (1 if shared else 4) + 4
    assert 0.5 <= dhe.shape.encodings / dhe.shape.hidden <= 2  # input and hidden widths grow together


def test_dhe_refuses_budgets_below_its_floor():
    floor = DecoderShape(MIN_ENCODINGS, MIN_HIDDEN, 2, 16).num_parameters
    assert decoder_shape(floor, 2, 16) == DecoderShape(MIN_ENCODINGS, MIN_HIDDEN, 2, 16)
    with pytest.raises(BudgetError, match=f"at least {floor} parameters"):
        build_embedding("dhe", FEATURES, floor - 1)
    with pytest.raises(ValueError, match="dense"):
        build_embedding("dhe", FEATURES, 10_000, sparse=True)


# ----------------------------------------------------------------------------------- mixed_dim


def test_power_law_rule():
    sizes = {"small": 100, "mid": 10_000, "big": 1_000_000}
    widths = power_law_widths(sizes, d0=16, alpha=0.25, dim=32)
    # d_f = round(16 * (100 / n_f) ** 0.25): 16, 16 / 100^0.25 = 5.06, 16 / 10^4^0.25 = 1.6
    assert widths == {"small": 16, "mid": 5, "big": 2}
    assert set(power_law_widths(sizes, d0=3, alpha=0.0, dim=64).values()) == {3}  # alpha = 0: one width
    # a projected table that would cost more than a plain full-width one is stored full width
    assert power_law_widths({"tiny": 3, "big": 10_000}, d0=3, alpha=0.0, dim=16) == {"tiny": 16, "big": 3}


def test_mixed_dim_is_narrow_rows_times_projections():
    md = MixedDimensionEmbedding(FEATURES, VOCABULARIES, {"user": 3, "item": 5, "genres": 16, "gender": 16})
    assert md.out_dims == {name: 16 for name in FEATURES.sparse_names}
    assert md.num_parameters() == 501 * 3 + 301 * 5 + 19 * 16 + 3 * 16 + (3 + 5) * 16
    batch = make_batch(12)
    out = md(batch)
    rows, _, slot_of = md.slot_rows(batch)
    user_rows = rows[slot_of < 3].view(3, 12)  # three 1-wide chunks per user row
    narrow_user = md.weight[user_rows, 0].T  # [12, 3]
    projection_user = md.projection[: 3 * 16].view(3, 16)
    assert torch.allclose(out[:, :16], narrow_user @ projection_user, atol=1e-6)
    item_rows = rows[(slot_of >= 3) & (slot_of < 8)].view(5, 12)
    projection_item = md.projection[3 * 16 :].view(5, 16)
    assert torch.allclose(out[:, 16:32], md.weight[item_rows, 0].T @ projection_item, atol=1e-6)
    # full-width features are read as they are (no projection), the OOV row included
    gender_rows = rows[slot_of >= slot_of.max() - 15].view(16, 12)
    assert torch.allclose(out[:, 48:], md.weight[gender_rows, 0].T, atol=1e-6)


def test_mixed_dim_rows_are_collisionless():
    md = MixedDimensionEmbedding(FEATURES, VOCABULARIES, {"user": 2, "item": 2, "genres": 16, "gender": 16})
    known = torch.arange(500) * 7
    rows, _, slot_of = md.slot_rows(one_id_batch(torch.cat([known, torch.tensor([1, 3])])))
    user_rows = rows[slot_of == 0]
    assert len(set(user_rows[:500].tolist())) == 500 and user_rows[500] == user_rows[501]  # unseen ids: OOV row


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_mixed_dim_from_budget(fraction):
    budget = int(FULL_SIZE * fraction)
    floor = sum(min(n + 16, 16 * n) for n in SIZES.values())  # width 1 and a projection, or plain 16 if cheaper
    if budget < floor:
        with pytest.raises(BudgetError, match=f"at least {floor:,} parameters"):
            build_embedding("mixed_dim", FEATURES, budget, vocabularies=VOCABULARIES)
        return
    md = build_embedding("mixed_dim", FEATURES, budget, vocabularies=VOCABULARIES)
    used = md.num_parameters()
    assert used <= budget
    # what is left buys no further column: less than any narrow table's column and projection
    narrow = [SIZES[name] + 16 for name, width in md.widths.items() if width < 16]
    assert budget - used < max(narrow, default=1)
    assert md.widths["user"] <= md.widths["item"] <= md.widths["genres"] <= md.widths["gender"]  # more rows, narrower
    if fraction == 1.0:
        assert set(md.widths.values()) == {16} and used == FULL_SIZE  # all the budget: `full` itself


def test_budget_widths_follow_the_rule_before_filling():
    sizes = {"a": 5000, "b": 500, "c": 50}
    widths = budget_widths(sizes, 20_000, alpha=0.5, dim=16)
    assert widths == {"a": 3, "b": 8, "c": 16}  # 3 : 8 ~ (500 / 5000)^0.5; c's 50 rows are cheaper unprojected
    assert 5000 * 3 + 500 * 8 + (3 + 8) * 16 + 50 * 16 <= 20_000


# ----------------------------------------------------------------------------------------- PEP


def test_pep_reads_soft_thresholded_weights():
    pep = PEPEmbedding(FEATURES, VOCABULARIES, keep=10**9, granularity="feature_dimension", init_scale=0.05)
    with torch.no_grad():
        pep.threshold.copy_(torch.randn_like(pep.threshold) - 3.5)  # g(s) in ~(0.005, 0.2): some pruned
    batch = make_batch(64)
    out = pep(batch)
    rows, _, slot_of = pep.slot_rows(batch)
    v = pep.weight[rows]
    g = torch.sigmoid(pep.threshold)[slot_of]
    expected = torch.sign(v) * torch.clamp(v.abs() - g, min=0)  # the paper's sign(v) relu(|v| - g(s))
    user, item = expected[slot_of == 0], expected[slot_of == 1]
    assert torch.allclose(out[:, :16], user) and torch.allclose(out[:, 16:32], item)
    assert bool((out == 0).any()) and bool((out != 0).any())
    # gradients: the thresholds learn; weights at or below their threshold get none
    out.sum().backward()
    assert pep.threshold.grad is not None and bool(pep.threshold.grad.abs().sum() > 0)
    pruned = (v.abs() <= g) & (slot_of[:, None] < 2)
    assert bool(pruned.any()) and bool((pep.weight.grad[rows][pruned] == 0).all())


def test_pep_per_feature_thresholds():
    pep = PEPEmbedding(FEATURES, VOCABULARIES, keep=10**9, granularity="feature", init_scale=0.05)
    assert pep.threshold.shape == (4, 1)
    with torch.no_grad():
        pep.threshold.copy_(torch.tensor([[-20.0], [-3.0], [-20.0], [-20.0]]))  # prune only item's small weights
    out = pep(make_batch(64))
    assert bool((out[:, 16:32] == 0).any()) and not bool((out[:, :16] == 0).any())


def test_pep_counts_values_plus_positions_and_never_exceeds_the_cap():
    pep = PEPEmbedding(FEATURES, VOCABULARIES, keep=300, prune_steps=0)
    total = pep.weight.numel()
    assert pep.num_nonzero() == 300 and pep.num_parameters() == 300 + 300  # values + int32 positions
    assert pep.num_bytes() == 4 * 600
    assert stored_words(5000, total) == 5000 + math.ceil(total / 32)  # a bitmap is smaller beyond N/32 non-zeros
    batch = make_batch(200)
    pep.eval()
    assert int((pep(batch) != 0).sum()) > 0
    # whatever training does to weights and thresholds, the deployed table keeps <= 300 non-zeros
    for _ in range(5):
        with torch.no_grad():
            pep.weight.mul_(torch.rand_like(pep.weight) * 3)
            pep.threshold.add_(torch.randn_like(pep.threshold))
        assert pep.num_nonzero() <= 300
        table = pep.read_rows(torch.arange(pep.weight.shape[0]), pep.row_feature, torch.tensor([0]))
        assert int((table != 0).sum()) <= 300


def test_pep_cap_keeps_the_largest_effective_weights():
    pep = PEPEmbedding(FEATURES, VOCABULARIES, keep=800, prune_steps=0, threshold_init=-4, init_scale=0.05)
    pep.eval()
    table = pep.read_rows(torch.arange(pep.weight.shape[0]), pep.row_feature, torch.tensor([0]))
    effective = pep.effective_table()
    top = effective.abs().flatten().topk(800).indices
    assert set(table.flatten().nonzero()[:, 0].tolist()) == set(top.tolist())
    assert torch.equal(table.flatten()[top], effective.flatten()[top])


@pytest.mark.parametrize("straight_through", [True, False])
def test_pep_cap_mask_is_straight_through(straight_through):
    pep = PEPEmbedding(FEATURES, VOCABULARIES, keep=50, prune_steps=0, straight_through=straight_through)
    batch = make_batch(64)
    out = pep(batch)
    assert int((out != 0).sum()) <= 50 * 64  # the forward reads the capped table either way
    out.sum().backward()
    rows, _, _ = pep.slot_rows(batch)
    effective = pep.effective_table()[rows].abs()
    capped_off = (effective <= pep.cutoff(50)) & (effective > 0)  # above the soft threshold, below the cap
    grads = pep.weight.grad[rows][capped_off]
    assert bool(capped_off.any())
    assert bool((grads != 0).all()) if straight_through else bool((grads == 0).all())


def test_pep_cap_falls_during_training_and_is_final_in_evaluation():
    pep = PEPEmbedding(FEATURES, VOCABULARIES, keep=100, prune_steps=10)
    total = pep.weight.numel()
    keeps = []
    for _ in range(12):
        keeps.append(pep.current_keep())
        pep(make_batch())
    assert keeps[0] == total and keeps[-1] == 100 and keeps == sorted(keeps, reverse=True)
    assert keeps[5] == 100 + math.floor((total - 100) * 0.5**3)  # the cubic schedule
    pep.eval()
    assert pep.current_keep() == 100
    state = pep.state_dict()
    assert int(state["step"]) == 12  # the schedule resumes from a checkpoint


def test_largest_keep_is_the_most_that_fits():
    for total in (10, 64, 1000):
        for budget in range(1, 2 * total):
            best = max((k for k in range(total + 1) if stored_words(k, total) <= budget), default=0)
            assert largest_keep(budget, total) == best


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_pep_from_budget_and_training_stay_within_budget(fraction):
    budget = int(FULL_SIZE * fraction)
    torch.manual_seed(0)
    pep = build_embedding("pep", FEATURES, budget, vocabularies=VOCABULARIES, prune_steps=5)
    assert pep.num_parameters() <= budget and budget - pep.num_parameters() <= 1
    optimizer = torch.optim.Adam(pep.parameters(), lr=0.05)
    for step in range(8):
        batch = make_batch(64, seed=step)
        loss = (pep(batch).sum(1) - torch.arange(64.0) % 2).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert pep.num_parameters() <= budget


def test_pep_refuses_what_it_cannot_store():
    with pytest.raises(BudgetError, match="at least 2"):
        build_embedding("pep", FEATURES, 1, vocabularies=VOCABULARIES)
    with pytest.raises(ValueError, match="quantised"):
        build_embedding("pep", FEATURES, 1000, vocabularies=VOCABULARIES, storage="int8")
    features = FeatureSet([FeatureSpec("user", dim=8)])
    with pytest.raises(BudgetError, match="per-feature dims"):
        build_embedding("pep", features, 1000, vocabularies={"user": np.arange(5)})
