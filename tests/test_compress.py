"""`ue compress`: the PCA algebra, the size bound, and a compressed run that `ue evaluate` rebuilds."""

import json

import pytest
import torch
from torch import nn

from unified_embedding.cli import main
from unified_embedding.compress import collect_moments, linear_rank, table_ranks, weighted_pca
from unified_embedding.data import BatchLoader
from unified_embedding.lowrank import FactorisedLinear, LowRankTableEmbedding, feature_regions, replace_module
from unified_embedding.train import TrainConfig, Trainer, build_network, load_run, prepare

SMALL = {"hidden": [32, 32], "num_cross_layers": 1}


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    """A small trained `full` DCNv2 run on the first 20,000 Frappe rows."""
    run_file = tmp_path_factory.mktemp("compress") / "run.json"
    config = TrainConfig(
        dataset="frappe", method="full", data_dir=str(data_dir), max_rows=20000, epochs=2, model_options=SMALL
    )
    Trainer(config, run_file, progress=False).run()
    return run_file


def test_pca_at_full_rank_reproduces_every_output(trained_run):
    _, _, prepared, network = load_run(trained_run)
    loader = BatchLoader(prepared.data, prepared.split.train, 1024)
    linears = {name: m for name, m in network.named_modules() if isinstance(m, nn.Linear)}
    sample = collect_moments(network, loader, linears, batches=5)
    batch = next(iter(BatchLoader(prepared.data, prepared.split.test, 512).batches()))
    with torch.no_grad():
        expected = network(batch)
        full_rank = {}
        for name, outputs in sample.features.items():
            mean, importance, _, directions = weighted_pca(outputs, sample.gradients[name])
            assert bool((importance[:-1] >= importance[1:]).all())
            full_rank[name] = (mean, directions)
        network.embedding = LowRankTableEmbedding.from_pca(network.embedding, full_rank)
        for name, layer in linears.items():
            mean, _, directions = sample.layers[name].pca()
            replace_module(network, name, FactorisedLinear.from_pca(layer, mean, directions))
        assert torch.allclose(network(batch), expected, atol=1e-4)


def test_ranks_keep_each_layer_within_its_share():
    for in_features, out_features, bias in [(128, 400, False), (400, 400, True), (20, 20, True), (400, 1, True)]:
        layer = nn.Linear(in_features, out_features, bias=bias)
        rank = linear_rank(layer, 3.0)
        floats = sum(p.numel() for p in layer.parameters())
        assert rank * (in_features + out_features) + out_features <= floats / 3
        assert (rank + 1) * (in_features + out_features) + out_features > floats / 3
    assert linear_rank(nn.Linear(400, 1), 3.0) == 0  # the logit head stays as it is

    sizes = {"user": 1000, "item": 2000, "flag": 3}
    variances = {name: torch.linspace(1.0, 0.01, 16) for name in sizes}
    budget = 16 * sum(sizes.values()) / 3
    ranks = table_ranks(sizes, variances, budget)
    cost = sum(16 * sizes[n] if r is None else r * (sizes[n] + 16) + 16 for n, r in ranks.items())
    assert cost <= budget and ranks["flag"] is None and 1 <= ranks["user"] < 16 and 1 <= ranks["item"] < 16


def test_shared_tables_are_refused(data_dir):
    config = TrainConfig(dataset="frappe", method="unified", budget="0.25x", data_dir=str(data_dir), max_rows=20000)
    network = build_network(config, prepare(config))
    with pytest.raises(ValueError, match="one region per feature"):
        feature_regions(network.embedding)


def test_cli_round_trip_meets_the_ratio_and_evaluates_as_recorded(trained_run, tmp_path, capsys):
    output = tmp_path / "compressed.json"
    code = main(["compress", "--run", str(trained_run), "--ratio", "3", "--finetune-epochs", "1",
                 "--output", str(output), "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    record = json.loads(output.read_text())
    compression = record["compression"]
    layers = {"embedding": compression["embedding"], **compression["layers"]}
    assert "model.mlp.net.0" in layers and "model.cross.layers.0.linear" in layers
    for layer in layers.values():
        assert layer["bytes_after"] <= layer["bytes_before"] / 3
    _, _, _, network = load_run(output)
    assert 4 * network.embedding.num_parameters() == compression["embedding"]["bytes_after"]
    assert record["num_params"] == sum(p.numel() for p in network.parameters())
    capsys.readouterr()
    assert main(["evaluate", "--run", str(output)]) == 0
    assert json.loads(capsys.readouterr().out)["auc"] == record["test_auc"]
    assert abs(record["test_auc"] - json.loads(trained_run.read_text())["test_auc"]) < 0.05


def test_bad_input_is_a_one_line_error(trained_run, tmp_path, capsys):
    assert main(["compress", "--run", str(trained_run), "--ratio", "1", "--output", str(tmp_path / "c.json")]) == 2
    assert "--ratio must be greater than 1" in capsys.readouterr().err
    orphan = tmp_path / "orphan.json"
    orphan.write_text(trained_run.read_text())
    assert main(["compress", "--run", str(orphan), "--ratio", "3", "--output", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert "orphan.pt not found" in err and not (tmp_path / "c.json").exists()
