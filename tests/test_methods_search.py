"""The multi-stage search methods (OptEmbed, AutoDim, AutoSrh) and PEP's retrain stage:
each one's mechanism, that its stored size is what it reports and fits the budget, and a
short real training run whose run.json records the search's result."""

import math

import numpy as np
import pytest
import torch

from unified_embedding import Batch, FeatureSet, FeatureSpec
from unified_embedding.embeddings import BudgetError, build_embedding
from unified_embedding.embeddings.autodim import AutoDimEmbedding, field_cost
from unified_embedding.embeddings.autosrh import AutoSrhEmbedding, overhead_words
from unified_embedding.embeddings.full import FullEmbedding
from unified_embedding.embeddings.optembed import OptEmbedding
from unified_embedding.embeddings.pep import PEPEmbedding, stored_words
from unified_embedding.train import TrainConfig, Trainer

FEATURES = FeatureSet(
    [FeatureSpec("user"), FeatureSpec("item"), FeatureSpec("tags", kind="multivalent", pooling="mean")]
)
VOCABULARIES = {"user": np.arange(200) * 3, "item": np.arange(60) + 1000, "tags": np.arange(12)}
ROWS = sum(len(v) + 1 for v in VOCABULARIES.values())  # 275: one OOV row per feature
FULL_SIZE = FullEmbedding.parameter_count(FEATURES, VOCABULARIES)


@pytest.fixture(autouse=True)
def seeded():
    """Initial tables and the searches' random draws are the same in every run."""
    torch.manual_seed(0)


def make_batch(batch_size: int = 64, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tags = [
        torch.randint(0, 12, (int(n),), generator=g).tolist() for n in torch.randint(0, 3, (batch_size,), generator=g)
    ]
    return Batch.from_ids({"user": torch.randint(0, 200, (batch_size,), generator=g) * 3,
                           "item": torch.randint(1000, 1060, (batch_size,), generator=g), "tags": tags})  # fmt: skip


def every_row_batch() -> Batch:
    """Every known id of every feature once (tags one per example)."""
    return Batch.from_ids({"user": torch.arange(200) * 3, "item": torch.arange(200) % 60 + 1000,
                           "tags": [[i % 12] for i in range(200)]})  # fmt: skip


# ---------------------------------------------------------------- OptEmbed


def test_optembed_supernet_prunes_rows_under_their_threshold_with_a_straight_through_gradient():
    method = OptEmbedding(FEATURES, VOCABULARIES, budget=FULL_SIZE // 4)
    norms = method.weight.detach().abs().sum(dim=1)
    with torch.no_grad():
        method.threshold.copy_(torch.stack([norms[method.row_feature == f].median() for f in range(3)]))
    method.eval()
    batch = every_row_batch()
    rows, _, slot_of = method.slot_rows(batch)
    out = method(batch).view(200, 3, 16)
    user_rows = rows[slot_of == 0]
    below = norms[user_rows] <= method.threshold[0]
    assert below.any() and (~below).any()
    assert torch.all(out[below, 0] == 0) and torch.all(out[~below, 0] == method.weight[user_rows[~below]])
    method.train()  # the thresholds learn through the unit step
    method(make_batch()).sum().backward()
    assert method.threshold.grad is not None and bool((method.threshold.grad != 0).any())


def test_optembed_search_fixes_the_best_widths_and_keeps_only_rows_above_threshold():
    budget = FULL_SIZE // 8
    method = OptEmbedding(FEATURES, VOCABULARIES, budget=budget, population=6, generations=3)
    scored = []

    def validation_auc() -> float:  # prefers a wide user field, then few other columns
        widths = method.widths.tolist()
        scored.append(widths)
        return widths[0] - 0.01 * (widths[1] + widths[2])

    norms = method.weight.detach().abs().sum(dim=1)  # the supernet's rows, which the thresholds judge
    result = method.begin_stage("retrain", validation_auc)
    best = max(scored, key=lambda w: w[0] - 0.01 * (w[1] + w[2]))
    assert list(result["widths"].values()) == best and method.widths.tolist() == best
    margins = norms - method.thresholds()[method.row_feature]  # thresholds raised to fit the budget
    assert result["threshold_shift"] > 0
    assert torch.all(margins[method.kept] > 0) and torch.all(margins[~method.kept] <= 0)
    assert torch.all(method.weight[~method.kept] == 0)
    assert sum(result["kept_rows"].values()) == int(method.kept.sum()) < ROWS
    # the retrained table reads each field's first w_f columns of kept rows only
    method.eval()
    out = method(every_row_batch()).view(200, 3, 16)
    for f, width in enumerate(best):
        assert torch.all(out[:, f, width:] == 0)
    assert method.out_dims == {"user": 16, "item": 16, "tags": 16}


def test_optembed_stored_size_is_kept_rows_at_their_widths_plus_the_row_index():
    budget = FULL_SIZE // 8
    method = OptEmbedding(FEATURES, VOCABULARIES, budget=budget, population=4, generations=2, parents=2)
    assert method.num_parameters() == ROWS * (budget // ROWS)  # before the search: every row, uniform width
    result = method.begin_stage("retrain", lambda: float(torch.rand(())))
    kept = int(method.kept.sum())
    values = int((method.weight != 0).sum())  # every stored value of a kept row, no more
    expected = sum(int(method.widths[method.row_feature[r]]) for r in range(ROWS) if method.kept[r])
    assert values <= expected
    assert method.num_parameters() == expected + min(kept, math.ceil(ROWS / 32)) == result["stored_parameters"]
    assert method.num_parameters() <= budget and method.num_bytes() == 4 * method.num_parameters()


def test_optembed_budget_below_one_column_per_row_is_refused_clearly():
    with pytest.raises(BudgetError, match=f"at least {ROWS:,} parameters"):
        build_embedding("optembed", FEATURES, ROWS - 1, vocabularies=VOCABULARIES)
    assert build_embedding("optembed", FEATURES, ROWS, vocabularies=VOCABULARIES).num_parameters() == ROWS


# ---------------------------------------------------------------- AutoDim


def test_autodim_retrains_at_the_argmax_of_its_architecture_weights():
    method = AutoDimEmbedding(FEATURES, VOCABULARIES, budget=FULL_SIZE)
    with torch.no_grad():
        method.alpha.copy_(torch.tensor([[0, 0, 0, 1.0, 0], [0, 1.0, 0, 0, 0], [0, 0, 0, 0, 1.0]]))
    assert torch.allclose(method.mixture(), torch.softmax(method.alpha / method.temperature, dim=1))
    batch = make_batch()
    result = method.begin_stage("retrain", lambda: 0.5)
    assert result["widths"] == result["argmax_widths"] == {"user": 8, "item": 2, "tags": 16}
    # the retrained vector of a field is its chosen candidate's table, projected
    pooled = FullEmbedding.forward(method, batch).view(64, 3, 31)
    user = pooled[:, 0, 7:15] @ method.projection[0, 7:15]
    out = method(batch).view(64, 3, 16)
    assert torch.allclose(out[:, 0], user, atol=1e-6) and torch.allclose(out[:, 2], pooled[:, 2, 15:], atol=1e-6)
    users = method.weight[:201]  # the user field's rows: only its width-8 candidate is kept
    assert torch.all(users[:, :7] == 0) and torch.all(users[:, 15:] == 0) and bool((users[:, 7:15] != 0).all())


def test_autodim_narrows_the_argmax_to_fit_and_reports_the_stored_size():
    budget = FULL_SIZE // 10
    method = build_embedding("autodim", FEATURES, budget, vocabularies=VOCABULARIES)
    with torch.no_grad():
        method.alpha.copy_(torch.tensor([[0, 0, 0, 0, 1.0], [0, 0, 0, 0, 1.0], [0, 0, 1.0, 0, 0]]))
    result = method.begin_stage("retrain", lambda: 0.5)
    assert result["argmax_widths"] == {"user": 16, "item": 16, "tags": 4}
    rows = [201, 61, 13]
    stored = sum(field_cost(n, w, 16) for n, w in zip(rows, result["widths"].values(), strict=True))
    assert method.num_parameters() == stored == result["stored_parameters"] <= budget
    assert method.num_bytes() == 4 * stored
    assert result["widths"]["tags"] == 4  # the cheap field keeps its argmax; the big ones narrowed
    assert field_cost(13, 16, 16) == 13 * 16 and field_cost(201, 2, 16) == 201 * 2 + 2 * 16
    assert field_cost(3, 8, 16) == 3 * 16  # folded when the product is smaller


def test_autodim_budget_below_the_narrowest_choice_is_refused_clearly():
    floor = sum(field_cost(n, 1, 16) for n in (201, 61, 13))
    with pytest.raises(BudgetError, match=f"at least {floor:,} parameters"):
        build_embedding("autodim", FEATURES, floor - 1, vocabularies=VOCABULARIES)
    assert build_embedding("autodim", FEATURES, floor, vocabularies=VOCABULARIES).num_parameters() == floor


# ---------------------------------------------------------------- AutoSrh


def frequencies() -> dict[str, np.ndarray]:
    """Ids most frequent first: users in reverse id order, the others in id order."""
    return {"user": VOCABULARIES["user"][::-1].copy(), "item": VOCABULARIES["item"], "tags": VOCABULARIES["tags"]}


def test_autosrh_buckets_ids_by_frequency():
    method = AutoSrhEmbedding(FEATURES, VOCABULARIES, FULL_SIZE, frequent_ids=frequencies(), buckets=4)
    rows, _, slot_of = method.slot_rows(Batch.from_ids({"user": [[597], [0]], "item": [[1000]] * 2, "tags": [[0]] * 2}))
    user_cells = method.row_cell[rows[slot_of == 0]]
    assert user_cells.tolist() == [0, 3]  # id 597 is the most frequent, id 0 the rarest
    assert method.cell_rows.view(3, 4)[0].tolist() == [50, 50, 50, 51]  # the OOV row joins the rarest


def test_autosrh_keeps_the_most_salient_groups_that_fit_and_zeroes_the_rest():
    budget = FULL_SIZE // 5
    method = build_embedding("autosrh", FEATURES, budget, vocabularies=VOCABULARIES, frequent_ids=frequencies())
    for seed in range(3):  # the search: saliency accumulates over steps
        method.zero_grad()
        method(make_batch(seed=seed)).pow(2).sum().backward()
        method.after_step()
    assert bool((method.saliency > 0).any())
    batch = make_batch()
    before = method(batch).detach()
    result = method.begin_stage("retrain", lambda: 0.5)
    size = method.group_size
    per_parameter = method.saliency / (method.cell_rows.clamp(min=1)[:, None] * size)
    floors = torch.zeros_like(method.kept)
    first_bucket = method.cell_rows.view(3, 4)[:, 0] > 0
    floors[torch.arange(3) * 4, per_parameter[torch.arange(3) * 4].argmax(dim=1)] = first_bucket
    assert torch.all(method.kept[floors])  # every field keeps its best group of its most frequent bucket
    kept = method.kept.reshape(-1)[~floors.reshape(-1)]
    order = torch.argsort(-per_parameter.reshape(-1)[~floors.reshape(-1)], stable=True)
    first_skipped = int((~kept[order]).nonzero()[0])
    assert torch.all(kept[order[:first_skipped]])  # then kept in saliency order until the budget bites
    after = method(batch)
    # alpha is folded into the kept weights: kept dimensions read as in the search, pruned ones zero
    rows, _, slot_of = method.slot_rows(batch)
    user = method.row_cell[rows[slot_of == 0]]
    mask = method.kept[user].repeat_interleave(size, dim=1)
    assert torch.allclose(after[:, :16], before[:, :16] * mask, atol=1e-6)
    widths = (method.kept.sum(dim=1) * size).tolist()
    assert [w for name in ("user", "item", "tags") for w in result["widths"][name]] == widths
    values = int((method.kept.sum(dim=1) * method.cell_rows).sum()) * size
    assert method.num_parameters() == values + overhead_words(12, 16 // size) == result["stored_parameters"] <= budget
    assert method.num_bytes() == 4 * method.num_parameters()


def test_autosrh_saliency_sums_the_squared_first_order_term_over_steps():
    method = build_embedding("autosrh", FEATURES, FULL_SIZE // 5, vocabularies=VOCABULARIES, frequent_ids=frequencies())
    expected = torch.zeros_like(method.alpha)
    for seed in range(2):
        with torch.no_grad():
            method.alpha.uniform_(0.5, 1.5)
        method.zero_grad()
        method(make_batch(seed=seed)).pow(2).sum().backward()
        expected += (method.alpha.detach() * method.alpha.grad).square()
        method.after_step()
    assert torch.allclose(method.saliency, expected) and bool((expected > 0).any())


def test_autosrh_keeps_a_dimension_of_every_field_however_little_its_saliency_per_parameter():
    """The large field with the least saliency per stored parameter still keeps its floor group."""
    budget = FULL_SIZE // 8
    method = build_embedding("autosrh", FEATURES, budget, vocabularies=VOCABULARIES, frequent_ids=frequencies())
    with torch.no_grad():
        method.saliency.fill_(1.0)
        method.saliency[:4].fill_(1e-6)  # the user field: 201 rows, nearly no saliency
        method.saliency[0, 5] = 2e-6
    result = method.begin_stage("retrain", lambda: 0.5)
    assert result["widths"]["user"] == [1, 0, 0, 0] and method.kept[0].nonzero().view(-1).tolist() == [5]
    assert all(widths[0] >= 1 for widths in result["widths"].values())
    assert method.num_parameters() <= budget


def test_autosrh_budget_below_its_smallest_selection_is_refused_clearly():
    # the floor: one group of each field's most frequent bucket (50 + 15 + 3 rows with four buckets)
    smallest = overhead_words(12, 16) + 50 + 15 + 3
    with pytest.raises(BudgetError, match=f"at least {smallest}"):
        build_embedding("autosrh", FEATURES, smallest - 1, vocabularies=VOCABULARIES, frequent_ids=frequencies())
    method = build_embedding("autosrh", FEATURES, smallest, vocabularies=VOCABULARIES, frequent_ids=frequencies())
    assert method.num_parameters() == smallest
    with pytest.raises(BudgetError, match="at least"):  # no frequencies: one bucket, every row of each field
        build_embedding("autosrh", FEATURES, overhead_words(12, 16) + ROWS - 1, vocabularies=VOCABULARIES)
    method = build_embedding("autosrh", FEATURES, FULL_SIZE // 10, vocabularies=VOCABULARIES)
    assert 0 < method.num_parameters() <= FULL_SIZE // 10 and method.cell_rows.view(3, 4)[:, 1:].sum() == 0


# ---------------------------------------------------------------- PEP's retrain


def test_pep_retrain_restarts_the_kept_weights_from_their_initial_values():
    method = PEPEmbedding(FEATURES, VOCABULARIES, keep=FULL_SIZE // 5, retrain=True, prune_steps=0)
    initial = method.weight.detach().clone()
    assert method.stages == ("train", "retrain")
    with torch.no_grad():  # stands for training: the weights move away from their start
        method.weight.add_(torch.randn_like(method.weight) * 0.01)
    method.eval()
    expected_kept = method.effective_table().abs() > method.cutoff(method.keep)
    before = method.num_parameters()
    result = method.begin_stage("retrain", lambda: 0.5)
    assert torch.equal(method.kept, expected_kept) and result["kept_weights"] == int(expected_kept.sum())
    assert torch.equal(method.weight, initial * expected_kept)
    assert method.num_parameters() == stored_words(int(expected_kept.sum()), method.weight.numel()) == before
    batch = make_batch()
    rows, _, slot_of = method.slot_rows(batch)
    out = method(batch).view(64, 3, 16)
    assert torch.equal(out[:, 0], (method.weight * method.kept)[rows[slot_of == 0]])
    assert PEPEmbedding(FEATURES, VOCABULARIES, keep=10).stages == ("train",)


# ---------------------------------------------------------------- end to end


SEARCH_OPTIONS = {
    "optembed": (
        {"population": 4, "generations": 2, "parents": 2},
        {"widths", "kept_rows", "pruned_rows", "stored_parameters"},
    ),
    "autodim": ({}, {"argmax_widths", "widths", "architecture_weights", "stored_parameters"}),
    "autosrh": ({}, {"widths", "bucket_rows", "stored_parameters"}),
    "pep": ({"retrain": True}, {"kept_weights", "pruned_weights", "kept_rows", "pruned_rows"}),
}


@pytest.mark.parametrize("method", sorted(SEARCH_OPTIONS))
def test_a_short_training_records_the_search_in_run_json(data_dir, tmp_path, method):
    options, keys = SEARCH_OPTIONS[method]
    config = TrainConfig(dataset="frappe", method=method, model="dcnv2", budget="0.1x", epochs=1, patience=0,
                         batch_size=4096, data_dir=str(data_dir), model_options={"hidden": [16], "num_cross_layers": 1},
                         max_rows=20_000, method_options=options)  # fmt: skip
    run = Trainer(config, tmp_path / "run.json", progress=False).run()
    assert len(run["stages"]) == 2 and all(stage["epochs"] == 1 for stage in run["stages"])
    result = run["stages"][1]["result"]
    assert keys <= set(result)
    assert 0 < run["num_embedding_params"] <= run["budget"]
    assert run["num_embedding_bytes"] == 4 * run["num_embedding_params"]
    if "stored_parameters" in result:
        assert result["stored_parameters"] == run["num_embedding_params"]
    assert 0.5 < run["val_auc"] <= 1


def test_a_search_method_killed_in_retrain_resumes_to_the_uninterrupted_result(data_dir, tmp_path, monkeypatch):
    options, _ = SEARCH_OPTIONS["optembed"]
    config = TrainConfig(dataset="frappe", method="optembed", model="dcnv2", budget="0.1x", epochs=1, patience=0,
                         batch_size=4096, data_dir=str(data_dir), model_options={"hidden": [16], "num_cross_layers": 1},
                         max_rows=20_000, method_options=options, checkpoint_every=1)  # fmt: skip
    reference = Trainer(config, progress=False).run()
    steps = {"retrain": 0}

    def crash(self) -> None:
        steps["retrain"] += bool(self.searched)
        if steps["retrain"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(OptEmbedding, "after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, tmp_path / "run.json", progress=False).run()
    monkeypatch.undo()
    resumed = Trainer(config, tmp_path / "run.json", progress=False).run(resume=True)
    assert resumed["stages"][1]["result"] == reference["stages"][1]["result"]
    for key in ("val_auc", "test_auc", "num_embedding_params"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-12)


@pytest.mark.parametrize("name", ["pep", "optembed", "autosrh"])
def test_one_width_methods_accept_their_own_width_and_name_features_asking_another(name):
    def features(item_dim: int) -> FeatureSet:
        return FeatureSet([FeatureSpec("user"), FeatureSpec("item", dim=item_dim), FEATURES.get("tags")])

    cls = type(build_embedding(name, FEATURES, FULL_SIZE // 2, vocabularies=VOCABULARIES))
    cls(features(16), VOCABULARIES, FULL_SIZE // 2, 16)  # the table's own width is no conflict
    with pytest.raises(ValueError, match=r"features \['item'\] ask for widths of their own"):
        cls(features(8), VOCABULARIES, FULL_SIZE // 2, 16)
