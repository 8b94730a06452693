"""The per-id compressors of issue 8: dpq, mgqe, alpt, deeplight, adaembed.

Each: its mechanism, that what it reports (num_parameters / num_bytes) is what a deployment
stores, and that its budget is met or refused with a clear BudgetError.
"""

import math

import numpy as np
import pytest
import torch
from test_embeddings import FEATURES, FULL_SIZE, VOCABULARIES, make_batch

from unified_embedding.embeddings import BudgetError, build_embedding
from unified_embedding.embeddings.adaembed import DEFAULT_ROWS_PER_VALUE, default_width
from unified_embedding.embeddings.alpt import stochastic_round
from unified_embedding.embeddings.deeplight import scheduled_keep
from unified_embedding.embeddings.pep import stored_words

METHODS = ["dpq", "mgqe", "alpt", "deeplight", "adaembed"]
#: training ids by frequency: the first fifth of each vocabulary is "frequent"
FREQUENT = {name: np.asarray(ids)[: max(1, len(ids) // 5)] for name, ids in VOCABULARIES.items()}


def build(name: str, fraction: float = 0.1, **options):
    if name == "mgqe":
        options.setdefault("frequent_ids", FREQUENT)
    return build_embedding(name, FEATURES, int(FULL_SIZE * fraction), vocabularies=VOCABULARIES, **options)


def all_vectors(method) -> torch.Tensor:
    """[N, dim] every global id's vector as the method composes it."""
    ids = torch.arange(method.num_ids)
    feature = method.id_feature
    return method.compose(ids - method.index_offset[feature], feature)


def train_steps(method, steps: int, lr: float = 1e-2) -> None:
    optimizer = torch.optim.Adam(method.parameters(), lr=lr)
    method.train()
    for step in range(steps):
        out = method(make_batch(64, seed=step))
        loss = out.pow(2).mean() - out.mean()
        extra = method.extra_loss()
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
        optimizer.zero_grad()
        method.after_step()


# ---------------------------------------------------------------- every method


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.5])
def test_budget_is_met(name, fraction):
    method = build(name, fraction)
    budget = int(FULL_SIZE * fraction)
    assert method.num_parameters() <= budget and method.num_bytes() <= 4 * budget
    train_steps(method, 3)  # and it stays within budget once trained
    method.eval()
    assert method.num_parameters() <= budget
    assert method(make_batch()).shape == (6, method.output_dim)


@pytest.mark.parametrize("name", METHODS)
def test_budget_below_the_smallest_instance_is_refused_clearly(name):
    options = {"dim": 16} if name == "adaembed" else {}  # its default width narrows to the budget
    with pytest.raises(BudgetError, match=rf"{name} needs at least [\d,]+ parameters"):
        build_embedding(name, FEATURES, 1, vocabularies=VOCABULARIES, **options)


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_restores_the_deployed_model(name):
    """The trainer reloads the best epoch's state_dict: codes, masks and row maps must travel with it."""
    torch.manual_seed(0)
    trained = build(name)
    train_steps(trained, 25)
    trained.eval()
    torch.manual_seed(1)
    fresh = build(name)
    fresh.load_state_dict(trained.state_dict())
    fresh.eval()
    batch = make_batch(32)
    assert torch.allclose(fresh(batch), trained(batch))
    assert fresh.num_parameters() == trained.num_parameters()


def test_values_index_their_vocabulary_exactly_and_unseen_ids_share_one_oov_entry():
    method = build("alpt")
    user = FEATURES.sparse_names.index("user")
    ids = torch.tensor([0, 7, 14, 3, 999_999])  # user ids are multiples of 7: 3 and 999,999 are unseen
    found = method.global_ids(ids, torch.full_like(ids, user))
    oov = int(method.index_offset[user] + method.index_size[user] - 1)
    assert found[:3].tolist() == [int(method.index_offset[user]) + k for k in range(3)]
    assert found[3:].tolist() == [oov, oov]
    rank = method.frequency_rank({"user": np.array([14, 0])})
    assert rank[found[2]] == 0 and rank[found[0]] == 1 and rank[found[1]] > 1


# ---------------------------------------------------------------- dpq / mgqe


@pytest.mark.parametrize("assignment", ["softmax", "centroid"])
def test_dpq_reads_exactly_its_stored_codes_and_codebooks(assignment):
    dpq = build("dpq", assignment=assignment)
    train_steps(dpq, 5)
    codes = dpq.codes()
    assert codes.shape == (dpq.num_ids, dpq.codebooks)
    assert bool((codes >= 0).all()) and bool((codes < 2 ** dpq.id_bits[:, None]).all())
    for mode in (dpq.train, dpq.eval):  # training reads the hard codes too
        mode()
        assert torch.allclose(all_vectors(dpq), dpq.decode(codes))


@pytest.mark.parametrize("assignment", ["softmax", "centroid"])
def test_dpq_trains_queries_and_codebooks_end_to_end(assignment):
    dpq = build("dpq", assignment=assignment)
    out = dpq(make_batch(32))
    loss = out.sum() + (dpq.extra_loss() if assignment == "centroid" else 0)
    loss.backward()
    assert dpq.query.grad.abs().sum() > 0 and dpq.values.grad.abs().sum() > 0
    if assignment == "softmax":
        assert dpq.keys.grad.abs().sum() > 0
    assert dpq.extra_loss() is None  # consumed once


def test_dpq_stored_size_is_codes_at_their_bit_width_plus_codebooks():
    dpq = build("dpq")
    code_bits = sum(dpq.codebooks * dpq.bits[name] * (len(VOCABULARIES[name]) + 1) for name in VOCABULARIES)
    codebooks = sum(2 ** dpq.bits[name] * dpq.dim for name in VOCABULARIES)
    assert dpq.values.numel() == codebooks
    assert dpq.num_bytes() == math.ceil(code_bits / 8) + 4 * codebooks
    assert dpq.num_parameters() == math.ceil(dpq.num_bytes() / 4)
    # the queries (one float row per value) are training state, far larger than what is stored
    assert dpq.query.numel() > dpq.num_parameters()


@pytest.mark.parametrize("name", ["dpq", "mgqe"])
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.3])
def test_dpq_budget_buys_the_most_bits_that_fit(name, fraction):
    """The largest instance: one more bit for any feature not yet collision-free would not fit."""
    budget = int(FULL_SIZE * fraction)
    method = build(name, fraction)
    options = {"frequent_ids": FREQUENT} if name == "mgqe" else {}
    for feature, bits in method.bits.items():
        if 2**bits < len(VOCABULARIES[feature]) + 1:
            wider = type(method)(FEATURES, VOCABULARIES, {**method.bits, feature: bits + 1}, **options)
            assert wider.num_parameters() > budget


def test_mgqe_gives_infrequent_values_fewer_centroids():
    mgqe = build("mgqe", head_fraction=0.2, tail_drop=2)
    dpq = build("dpq")
    rank = mgqe.frequency_rank(FREQUENT)
    for f, name in enumerate(FEATURES.sparse_names):
        ids = torch.nonzero(mgqe.id_feature == f).flatten()
        head = ids[rank[ids] < mgqe.head_counts[name]]
        tail = ids[rank[ids] >= mgqe.head_counts[name]]
        assert head.numel() == math.ceil(0.2 * len(FREQUENT[name]))
        assert bool((mgqe.id_bits[head] == mgqe.bits[name]).all())
        assert bool((mgqe.id_bits[tail] == max(1, mgqe.bits[name] - 2)).all())
    train_steps(mgqe, 5)
    tail = mgqe.id_bits < mgqe.bits["user"]
    assert bool((mgqe.codes()[tail] < 2 ** mgqe.id_bits[tail, None]).all())  # only the first centroids
    # cheaper codes buy more centroids for the head than dpq gives every value
    assert mgqe.bits["user"] > dpq.bits["user"] and mgqe.num_parameters() <= int(FULL_SIZE * 0.1)


# ---------------------------------------------------------------- alpt


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity", ["feature", "row"])
def test_alpt_stores_integer_codes_with_scales_and_round_trips_within_one_step(bits, granularity):
    torch.manual_seed(0)
    alpt = build("alpt", 0.5, bits=bits, granularity=granularity)
    q = 2 ** (bits - 1) - 1
    optimizer = torch.optim.Adam(alpt.parameters(), lr=1e-2)
    for step in range(5):
        alpt(make_batch(64, seed=step)).pow(2).mean().neg().backward()
        optimizer.step()
        optimizer.zero_grad()
        # the optimizer's move in units of the step size the codes were stored with
        old_steps = alpt.step_of_rows(alpt.applied_log_step)
        target = (alpt.codes.float() + (alpt.weight.detach() - alpt.codes.float() * old_steps) / old_steps).detach()
        assert not torch.equal(target, alpt.codes.float())  # the step moved rows off the grid
        alpt.after_step()
        codes, scales = alpt.stored()
        assert codes.dtype == torch.int8 and int(codes.abs().max()) <= q
        assert scales.shape == ((len(FEATURES.sparse),) if granularity == "feature" else (alpt.num_ids,))
        inside = target.abs() <= q
        assert bool(((codes.float() - target).abs()[inside] < 1).all())  # within one step of the move
        assert bool((codes.float()[~inside].abs() == q).all())  # clipped to the code range
        read = codes.float() * alpt.step_of_rows(alpt.log_step)
        assert torch.equal(read, alpt.weight.detach())  # the float view holds nothing the codes do not
    for mode in (alpt.train, alpt.eval):  # the forward reads exactly the stored table
        mode()
        assert torch.allclose(all_vectors(alpt), codes.float() * alpt.step_of_rows(alpt.log_step))


def test_alpt_learns_its_step_sizes():
    alpt = build("alpt")
    before = alpt.log_step.detach().clone()
    train_steps(alpt, 3)
    assert not torch.equal(before, alpt.log_step.detach())


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    x = torch.full((200_000,), 2.3)
    rounded = stochastic_round(x)
    assert set(rounded.unique().tolist()) == {2.0, 3.0}
    assert abs(rounded.mean().item() - 2.3) < 0.01


def test_alpt_bytes_are_packed_codes_plus_step_sizes():
    for bits in (8, 4):
        alpt = build("alpt", bits=bits)
        ids = sum(len(v) + 1 for v in VOCABULARIES.values())
        assert alpt.num_bytes() == math.ceil(ids * alpt.dim * bits / 8) + 4 * len(FEATURES.sparse)
        assert alpt.num_parameters() == math.ceil(alpt.num_bytes() / 4)
    assert build("alpt", bits=4).dim >= 2 * build("alpt", bits=8).dim - 1  # int4 buys twice the width


# ---------------------------------------------------------------- deeplight


def test_deeplight_reaches_its_target_sparsity_on_schedule_within_budget_throughout():
    budget = int(FULL_SIZE * 0.1)
    light = build("deeplight", prune_steps=40, prune_every=5)
    total = light.weight.numel()
    kept = []
    for step in range(1, 51):
        train_steps(light, 1)
        kept.append(int(light.mask.sum()))
        if step % 5 == 0 and step <= 40:
            assert kept[-1] <= scheduled_keep(light.keep, total, step, 40)
        light.eval()
        assert light.num_parameters() <= budget  # every evaluated point is within budget
        assert light.num_nonzero() <= light.keep
    assert kept == sorted(kept, reverse=True)  # the mask only tightens
    assert kept[4] < total  # pruning starts at the first cut
    assert kept[39] <= light.keep and kept[-1] <= light.keep  # the target, reached at prune_steps
    assert bool((light.weight[~light.mask] == 0).all())  # pruned weights stay zero
    assert light.num_parameters() == stored_words(light.num_nonzero(), total)


def test_deeplight_schedule_is_cubic():
    assert scheduled_keep(10, 1000, 0, 100) == 1000
    assert scheduled_keep(10, 1000, 50, 100) == 10 + math.floor(990 * 0.125)
    assert scheduled_keep(10, 1000, 100, 100) == scheduled_keep(10, 1000, 500, 100) == 10


# ---------------------------------------------------------------- adaembed


def test_adaembed_gives_a_dedicated_row_to_a_value_that_became_frequent():
    ada = build("adaembed", reassign_every=5, decay=0.5)
    user = FEATURES.sparse_names.index("user")
    old, new = 0, 7  # global ids of the users with vocabulary positions 0 and 7
    assert int(ada.index_offset[user]) == 0

    def steps_reading(vocabulary_position: int, count: int) -> None:
        for _ in range(count):
            batch = make_batch(8)
            ids = torch.full((8,), int(VOCABULARIES["user"][vocabulary_position]))
            batch = type(batch).from_ids(
                {"user": ids, "item": batch.ids("item"), "genres": [[1]] * 8, "gender": batch.ids("gender")},
                dense=batch.dense,
            )
            ada.train()
            ada(batch).sum().backward()
            ada.after_step()

    steps_reading(old, 5)
    assert int(ada.row_of[old]) >= 0  # read every step: dedicated
    assert int(ada.row_of[new]) < 0
    ada.eval()
    hashed_vector = all_vectors(ada)[new].clone()
    steps_reading(new, 20)  # the data moves to another user
    assert int(ada.row_of[new]) >= 0 and int(ada.owner[ada.row_of[new]]) == new
    ada.eval()
    assert torch.equal(all_vectors(ada)[new], hashed_vector)  # its row starts as the vector it read
    # the importance decays: once the data has moved on for long enough, the old value's row goes
    ada.importance[old] = 0.0
    ada.reassign()
    assert int(ada.row_of[old]) < 0 and old not in ada.owner.tolist()


def test_adaembed_importance_sums_the_gradient_norms_of_a_values_reads():
    ada = build("adaembed", reassign_every=1000)
    user = FEATURES.sparse_names.index("user")
    index, feature = torch.tensor([0, 0, 3]), torch.full((3,), user)  # value 0 read twice, value 3 once
    ids = (index + ada.index_offset[feature]).tolist()
    ada.train()
    vectors = ada.compose(index, feature)
    grad = torch.randn_like(vectors)
    vectors.backward(grad)
    expected = torch.zeros_like(ada.importance)
    expected[ids[0]] = grad[0].norm() + grad[1].norm()
    expected[ids[2]] = grad[2].norm()
    assert torch.allclose(ada.importance, expected)
    ada.eval()  # evaluation reads leave the importance alone
    ada.compose(index, feature).sum().backward()
    assert torch.allclose(ada.importance, expected)


def test_adaembed_counts_its_row_map():
    ada = build("adaembed")
    assert ada.num_parameters() == ada.table.numel() + 2 * ada.dedicated
    assert ada.num_bytes() == 4 * ada.num_parameters()
    assert 0 < ada.dedicated and ada.hashed > 0


def test_adaembed_default_width_leaves_rows_for_a_share_of_the_values():
    assert default_width(1_000, 1_000, 0.25) == 4  # 250 rows for 1,000 values
    assert default_width(1_000, 1_000, 0.5) == 2
    assert default_width(100_000, 1_000, 0.5) == 16  # never wider than `full`
    assert default_width(10, 1_000, 0.5) == 1
    assert build("adaembed").dim == default_width(
        int(FULL_SIZE * 0.1), sum(len(v) + 1 for v in VOCABULARIES.values()), DEFAULT_ROWS_PER_VALUE
    )
