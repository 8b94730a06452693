"""Unit tests of the CTR backbones (mechanics only: synthetic inputs, no claimed results)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from unified_embedding.models import MODELS, CTRModel, DCNv2, build_model, model_hparams
from unified_embedding.models.layers import MLP, CrossLayerV2, CrossNetworkV2, DotInteraction, fm_second_order

UNEQUAL = [16, 8, 24]  # gcd 8 -> fields 2 + 1 + 3 = 6
NAMES = sorted(MODELS)
# small widths for the training test only (the defaults are exercised everywhere else)
SMALL = {
    "lr": {},
    "fm": {},
    "mlp": {"hidden": (64, 64)},
    "deepfm": {"hidden": (64, 64)},
    "dcnv2": {"hidden": (64, 64), "num_cross_layers": 2},
    "dlrm": {"bottom_hidden": (32,), "top_hidden": (64, 64)},
}


def _inputs(batch: int, feature_dims, num_dense: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, sum(feature_dims), generator=g)
    dense = torch.randn(batch, num_dense, generator=g)
    return emb, dense


# --------------------------------------------------------------------------- every model


@pytest.mark.parametrize("num_dense", [0, 5])
@pytest.mark.parametrize("feature_dims", [[8, 8, 8, 8], UNEQUAL], ids=["equal", "unequal"])
@pytest.mark.parametrize("name", NAMES)
def test_shape_finite_and_gradients_reach_everything(name, feature_dims, num_dense):
    torch.manual_seed(0)
    model = build_model(name, feature_dims, num_dense)
    assert isinstance(model, CTRModel)
    model.train()
    emb, dense = _inputs(16, feature_dims, num_dense)
    emb.requires_grad_(True)
    out = model(emb, dense)
    assert out.shape == (16,)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"
    # parameter count is the plain sum over parameters
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_single_example_and_dense_none(name):
    model = build_model(name, UNEQUAL, 0).eval()
    emb, _ = _inputs(1, UNEQUAL, 0)
    with torch.no_grad():
        a = model(emb, None)
        b = model(emb, torch.zeros(1, 0))
    assert a.shape == (1,)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_shape_mismatch_is_a_clear_error(name):
    model = build_model(name, UNEQUAL, 3)
    emb, dense = _inputs(4, UNEQUAL, 3)
    with pytest.raises(ValueError, match=r"emb \[B, 48\]"):
        model(emb[:, :40], dense)
    with pytest.raises(ValueError, match=r"dense \[4, 3\]"):
        model(emb, dense[:, :2])
    with pytest.raises(ValueError, match="got None"):
        model(emb, None)


# every model with dense features, and DLRM without (its top MLP then sees only pairwise dots)
@pytest.mark.parametrize("name, num_dense", [(n, 3) for n in NAMES] + [("dlrm", 0)])
def test_fits_a_small_separable_problem(name, num_dense):
    """Learned per-feature tables in front of the model; labels = sign of a sum of per-id scores + dense."""
    torch.manual_seed(0)
    n, ids_per_feature = 512, 20
    ids = torch.randint(0, ids_per_feature, (n, len(UNEQUAL)))
    scores = torch.randn(len(UNEQUAL), ids_per_feature)
    dense = torch.randn(n, num_dense)
    logit = scores.gather(1, ids.T).sum(0) + dense @ torch.tensor([1.0, -1.0, 0.5])[:num_dense]
    y = (logit > logit.median()).float()

    tables = nn.ModuleList(nn.Embedding(ids_per_feature, d) for d in UNEQUAL)
    for t in tables:
        nn.init.normal_(t.weight, std=0.1)
    model = build_model(name, UNEQUAL, num_dense, **SMALL[name])
    opt = torch.optim.Adam([*model.parameters(), *tables.parameters()], lr=1e-2)
    loss_fn = nn.BCEWithLogitsLoss()

    def embed():
        return torch.cat([t(ids[:, i]) for i, t in enumerate(tables)], dim=1)

    def evaluate():
        model.eval()
        with torch.no_grad():
            logits = model(embed(), dense)
        model.train()
        return loss_fn(logits, y).item(), ((logits > 0).float() == y).float().mean().item()

    initial, _ = evaluate()
    for _ in range(100):
        opt.zero_grad()
        loss_fn(model(embed(), dense), y).backward()
        opt.step()
    final, accuracy = evaluate()
    assert final < 0.5 * initial, (name, initial, final)
    assert accuracy > 0.9, (name, accuracy)


# --------------------------------------------------------------------------- mechanisms


def test_fm_second_order_equals_explicit_pairwise_sum():
    fields = torch.randn(5, 6, 4, dtype=torch.float64)
    explicit = sum((fields[:, i] * fields[:, j]).sum(1) for i, j in itertools.combinations(range(6), 2))
    torch.testing.assert_close(fm_second_order(fields), explicit)


def test_fields_split_each_feature_into_consecutive_chunks():
    model = build_model("fm", UNEQUAL, 0)
    assert (model.field_dim, model.num_fields) == (8, 6)
    emb, _ = _inputs(3, UNEQUAL, 0)
    fields = model.as_fields(emb)
    assert fields.data_ptr() == emb.data_ptr()  # a view, no copy
    for k in range(6):  # feature 0 -> fields 0,1; feature 1 -> field 2; feature 2 -> fields 3,4,5
        torch.testing.assert_close(fields[:, k], emb[:, 8 * k : 8 * (k + 1)])


def test_fm_model_equals_linear_plus_explicit_pairs_over_fields_and_dense_field():
    torch.manual_seed(0)
    model = build_model("fm", UNEQUAL, 2).double()
    emb, dense = (t.double() for t in _inputs(4, UNEQUAL, 2))
    vs = [emb[:, 8 * k : 8 * (k + 1)] for k in range(6)]
    vs.append(dense @ model.dense_field.linear.weight.T)  # dense field: sum_j x_j u_j
    pairs = sum((vs[i] * vs[j]).sum(1) for i, j in itertools.combinations(range(7), 2))
    first = torch.cat([emb, dense], 1) @ model.linear.weight[0] + model.linear.bias[0]
    torch.testing.assert_close(model(emb, dense), first + pairs)


def test_deepfm_is_fm_plus_mlp():
    torch.manual_seed(0)
    model = build_model("deepfm", UNEQUAL, 2).eval()
    emb, dense = _inputs(4, UNEQUAL, 2)
    with torch.no_grad():
        fm_part = type(model).__mro__[1]._forward(model, emb, dense)
        expected = fm_part + model.mlp(torch.cat([emb, dense], 1)).squeeze(1)
        torch.testing.assert_close(model(emb, dense), expected)


def test_cross_layer_v2_matches_formula_on_tiny_input():
    layer = CrossLayerV2(2)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        layer.linear.bias.copy_(torch.tensor([0.5, -1.0]))
    x0 = torch.tensor([[1.0, 2.0]])
    x = torch.tensor([[3.0, -1.0]])
    # W x = [1, 5]; + b = [1.5, 4]; x0 * . = [1.5, 8]; + x = [4.5, 7]
    torch.testing.assert_close(layer(x0, x), torch.tensor([[4.5, 7.0]]))


def test_cross_network_feeds_x0_to_every_layer():
    torch.manual_seed(0)
    net = CrossNetworkV2(3, 2)
    x0 = torch.randn(4, 3)
    x1 = x0 * net.layers[0].linear(x0) + x0
    x2 = x0 * net.layers[1].linear(x1) + x1
    torch.testing.assert_close(net(x0), x2)


def test_dot_interaction_equals_explicit_pairwise_dots():
    fields = torch.randn(3, 5, 7, dtype=torch.float64)
    explicit = torch.stack(
        [(fields[:, i] * fields[:, j]).sum(1) for i, j in itertools.combinations(range(5), 2)], dim=1
    )
    layer = DotInteraction(5)
    assert layer.out_dim == 10
    torch.testing.assert_close(layer(fields), explicit)


def test_dlrm_top_mlp_sees_dense_field_and_pairwise_dots():
    torch.manual_seed(0)
    model = build_model("dlrm", UNEQUAL, 3).eval()
    emb, dense = _inputs(4, UNEQUAL, 3)
    seen = {}
    model.top.register_forward_hook(lambda m, inp, out: seen.__setitem__("top_in", inp[0]))
    with torch.no_grad():
        model(emb, dense)
        z = model.bottom(dense)
        assert z.shape == (4, 8)
        vs = [z] + [emb[:, 8 * k : 8 * (k + 1)] for k in range(6)]
        dots = [(vs[i] * vs[j]).sum(1) for i, j in itertools.combinations(range(7), 2)]
        expected = torch.cat([z, torch.stack(dots, 1)], 1)
    torch.testing.assert_close(seen["top_in"], expected)


def test_lr_is_exactly_linear():
    torch.manual_seed(0)
    model = build_model("lr", UNEQUAL, 2).double()
    a_emb, a_dense = (t.double() for t in _inputs(6, UNEQUAL, 2, seed=1))
    b_emb, b_dense = (t.double() for t in _inputs(6, UNEQUAL, 2, seed=2))
    zero_emb, zero_dense = torch.zeros_like(a_emb), torch.zeros_like(a_dense)
    f = model
    torch.testing.assert_close(
        f(a_emb + b_emb, a_dense + b_dense) - f(b_emb, b_dense), f(a_emb, a_dense) - f(zero_emb, zero_dense)
    )
    manual = torch.cat([a_emb, a_dense], 1) @ model.linear.weight[0] + model.linear.bias[0]
    torch.testing.assert_close(f(a_emb, a_dense), manual)


def test_dcnv2_stacked_and_parallel_differ_in_structure():
    torch.manual_seed(0)
    emb, dense = _inputs(4, UNEQUAL, 2)
    x0 = torch.cat([emb, dense], 1)
    for structure in ("stacked", "parallel"):
        model = build_model("dcnv2", UNEQUAL, 2, structure=structure, hidden=[32, 16]).eval()
        seen = {}
        model.mlp.register_forward_hook(lambda m, inp, out, seen=seen: seen.__setitem__("mlp_in", inp[0]))
        model.head.register_forward_hook(lambda m, inp, out, seen=seen: seen.__setitem__("head_in", inp[0]))
        with torch.no_grad():
            model(emb, dense)
            cross = model.cross(x0)
            mlp_out = model.mlp(x0 if structure == "parallel" else cross)
        if structure == "stacked":  # cross -> MLP -> head
            torch.testing.assert_close(seen["mlp_in"], cross)
            torch.testing.assert_close(seen["head_in"], mlp_out)
            assert model.head.in_features == 16
        else:  # x0 -> cross and x0 -> MLP side by side, concatenated into the head
            torch.testing.assert_close(seen["mlp_in"], x0)
            torch.testing.assert_close(seen["head_in"], torch.cat([cross, mlp_out], 1))
            assert model.head.in_features == 50 + 16
    assert not torch.allclose(cross, x0)  # the cross layers actually do something


def test_mlp_block_layout_and_batchnorm_drops_bias():
    block = MLP(10, (6, 4), activation="relu", dropout=0.2, batch_norm=True, output_dim=1)
    kinds = [type(m).__name__ for m in block.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "CounterDropout"] * 2 + ["Linear"]
    assert block.net[0].bias is None and block.net[-1].bias is not None
    assert MLP(10, (), output_dim=None).out_dim == 10


# --------------------------------------------------------------------------- registry


def test_registry_names():
    assert set(MODELS) == {"lr", "fm", "deepfm", "dcnv2", "dlrm", "mlp"}
    assert isinstance(build_model("dcnv2", [4], 0, num_cross_layers=1), DCNv2)


def test_build_model_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'xdeepfm'") as info:
        build_model("xdeepfm", UNEQUAL, 0)
    for name in MODELS:
        assert name in str(info.value)


def test_build_model_unknown_hparam_names_model_and_key():
    with pytest.raises(ValueError, match=r"model 'fm' has no hyperparameter 'hidden'"):
        build_model("fm", UNEQUAL, 0, hidden=(10,))
    with pytest.raises(ValueError, match=r"model 'dcnv2' has no hyperparameter 'cross_layers'.*num_cross_layers"):
        build_model("dcnv2", UNEQUAL, 0, cross_layers=2)


@pytest.mark.parametrize(
    "name, hparams, message",
    [
        ("dcnv2", {"structure": "serial"}, "structure must be one of"),
        ("dcnv2", {"num_cross_layers": -1}, "num_cross_layers"),
        ("mlp", {"hidden": 400}, "hidden must be a sequence"),
        ("mlp", {"dropout": 1.0}, "dropout"),
        ("deepfm", {"activation": "swish"}, "unknown activation"),
        ("dlrm", {"bottom_hidden": (0,)}, "bottom_hidden"),
    ],
)
def test_bad_hparam_values_are_clear_errors(name, hparams, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, UNEQUAL, 2, **hparams)


def test_bad_layout_is_a_clear_error():
    with pytest.raises(ValueError, match="feature_dims"):
        build_model("mlp", [], 2)
    with pytest.raises(ValueError, match="feature_dims"):
        build_model("mlp", [8, 0], 2)
    with pytest.raises(ValueError, match="at least 2 fields"):
        build_model("dlrm", [8], 0)


def test_coprime_widths_warn_for_interaction_models():
    with pytest.warns(UserWarning, match="gcd 1"):
        build_model("fm", [4, 3], 0)


def test_model_hparams_lists_defaults():
    assert model_hparams("lr") == {}
    defaults = model_hparams("dcnv2")
    assert defaults["num_cross_layers"] == 3 and defaults["structure"] == "stacked"
    assert defaults["hidden"] == (400, 400, 400)
