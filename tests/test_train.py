"""The training loop end to end on real data: run.json, determinism, resume, atomic checkpoints."""

import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch

from unified_embedding import checkpoint
from unified_embedding.cli import main
from unified_embedding.models import MODELS
from unified_embedding.train import Optimizers, TrainConfig, Trainer, evaluate_run

SMALL_MODEL = {"hidden": [32, 32], "num_cross_layers": 1}
RUN_KEYS = {
    "dataset", "method", "model", "seed", "num_embedding_params", "num_params", "val_auc", "val_logloss",
    "test_auc", "test_logloss", "train_seconds", "examples_per_second", "bad_rows_skipped", "config",
}  # fmt: skip


def small_config(data_dir, **overrides) -> TrainConfig:
    values = dict(dataset="criteo", method="unified", model="dcnv2", budget="0.25x", epochs=2, batch_size=256,
                  data_dir=str(data_dir), model_options=SMALL_MODEL)  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def test_cli_train_writes_run_json_and_evaluate_reproduces_it(data_dir, tmp_path, capsys):
    output = tmp_path / "run.json"
    code = main(["train", "--dataset", "criteo", "--method", "unified", "--model", "dcnv2", "--budget", "0.25x",
                 "--data-dir", str(data_dir), "--epochs", "2", "--output", str(output), "--quiet",
                 "--model-option", "hidden=[32, 32]", "--model-option", "num_cross_layers=1"])  # fmt: skip
    assert code == 0
    run = json.loads(output.read_text())
    assert RUN_KEYS <= set(run)
    assert 0.5 < run["test_auc"] <= 1 and run["test_logloss"] > 0
    assert run["num_embedding_params"] <= run["budget"] == int(0.25 * run["full_embedding_params"])
    assert run["config"]["model_options"] == SMALL_MODEL
    capability = torch.backends.cpu.get_cpu_capability()  # what a seed's bits depend on, beside the versions
    assert run["versions"]["torch"] == torch.__version__ and run["versions"]["platform"].endswith(capability)
    again = evaluate_run(output, "test")
    assert again["auc"] == pytest.approx(run["test_auc"], abs=1e-9)


def test_same_seed_gives_identical_metrics(data_dir):
    first = Trainer(small_config(data_dir), progress=False).run()
    second = Trainer(small_config(data_dir), progress=False).run()
    for key in ("val_auc", "val_logloss", "test_auc", "test_logloss"):
        assert first[key] == second[key]
    other_seed = Trainer(small_config(data_dir, seed=1), progress=False).run()
    assert other_seed["val_logloss"] != first["val_logloss"]


@pytest.mark.parametrize("fused", [False, True], ids=["torch-optimizer", "fused-update"])
def test_resume_from_a_mid_epoch_checkpoint_matches_an_uninterrupted_run(data_dir, tmp_path, monkeypatch, fused):
    config = small_config(data_dir, checkpoint_every=5, fused=fused)
    reference = Trainer(config, progress=False).run()
    output = tmp_path / "run.json"
    # Crash at the 7th optimizer step of the first epoch; the last checkpoint is at batch 5.
    steps = {"n": 0}
    real_step = Optimizers.step

    def crashing_step(self):
        steps["n"] += 1
        if steps["n"] == 7:
            raise KeyboardInterrupt
        real_step(self)

    monkeypatch.setattr(Optimizers, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, output, progress=False).run()
    monkeypatch.undo()
    saved = checkpoint.load(output.with_suffix(".ckpt"))
    assert saved["state"]["epoch"] == 0 and saved["state"]["batch"] == 5
    resumed = Trainer(config, output, progress=False).run(resume=True)
    for key in ("val_auc", "test_auc", "test_logloss"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-12)


def test_resume_refuses_a_checkpoint_of_another_configuration(data_dir, tmp_path):
    output = tmp_path / "run.json"
    Trainer(small_config(data_dir, epochs=1), output, progress=False).run()
    with pytest.raises(ValueError, match="different configuration"):
        Trainer(small_config(data_dir, epochs=1, lr=0.01), output, progress=False).run(resume=True)


def test_sigkill_mid_epoch_then_resume_finishes(data_dir, tmp_path):
    output = tmp_path / "run.json"
    command = [sys.executable, "-m", "unified_embedding.cli", "train", "--dataset", "movielens-100k",
               "--data-dir", str(data_dir), "--method", "unified", "--budget", "0.1x", "--epochs", "2",
               "--batch-size", "128", "--checkpoint-every", "20", "--output", str(output), "--quiet",
               "--model-option", "hidden=[32]", "--model-option", "num_cross_layers=1"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = output.with_suffix(".ckpt")
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), process.stderr.read().decode() if process.poll() is not None else "no checkpoint in time"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not output.exists()  # killed before finishing
    saved = checkpoint.load(ckpt)  # whatever instant the kill hit, the checkpoint is whole
    assert saved["state"]["batch"] % 20 == 0 or saved["state"]["batch"] == 0
    finished = subprocess.run([*command, "--resume"], capture_output=True, text=True, check=False)
    assert finished.returncode == 0, finished.stderr
    run = json.loads(output.read_text())
    assert run["epochs_run"] == 2 and 0.6 < run["test_auc"] < 1


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    checkpoint.save_atomic({"step": 1}, path)

    def broken_save(obj, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]


def test_bad_configuration_is_refused_in_one_place(data_dir):
    bad_values = ({"method": "nope"}, {"model": "nope"}, {"optimizer": "sgd"}, {"epochs": 0}, {"lr": -1.0},
                  {"sparse": True, "fused": True})  # fmt: skip
    for bad in bad_values:
        with pytest.raises(ValueError):
            small_config(data_dir, **bad).validate()


def test_cli_reports_bad_input_with_file_and_line(tmp_path, capsys):
    data = tmp_path / "clicks.csv"
    data.write_text("click,user,price\n1,a,1.0\n0,b,abc\n")
    (tmp_path / "clicks.toml").write_text(
        '[data]\npath = "clicks.csv"\nformat = "csv"\nlabel = "click"\ncategorical = ["user"]\ndense = ["price"]\n'
    )
    code = main(["train", "--dataset", str(tmp_path / "clicks.toml"), "--output", str(tmp_path / "r.json"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "clicks.csv" in err and ":3" in err and "price" in err


def test_adagrad_sparse_adam_and_fused_updates_train(data_dir):
    for overrides in (
        {"optimizer": "adagrad"},
        {"sparse": True},
        {"fused": True},
        {"fused": True, "optimizer": "adagrad"},
    ):
        run = Trainer(small_config(data_dir, epochs=1, **overrides), progress=False).run()
        assert 0.5 < run["test_auc"] <= 1


def test_the_fused_update_leaves_the_table_out_of_the_torch_optimizer(data_dir):
    from unified_embedding.train import build_network, prepare

    config = small_config(data_dir, fused=True)
    network = build_network(config, prepare(config))
    optimizers = Optimizers(network, "adam", None, fused=True)
    handed = {id(p) for o in optimizers.optimizers for group in o.param_groups for p in group["params"]}
    assert id(network.embedding.weight) not in handed
    assert len(handed) == sum(1 for _ in network.parameters()) - 1
    assert [r.table for r in optimizers.row_optimizers] == [network.embedding.weight]


def test_embedding_weight_decay_reaches_the_embedding_only(data_dir):
    from unified_embedding.train import build_network, prepare

    config = small_config(data_dir)
    assert config.embedding_weight_decay == 1e-2  # the deep backbones' default
    network = build_network(config, prepare(config))
    groups = Optimizers(network, "adam", None, embedding_weight_decay=0.01).optimizers[0].param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.01 for p in g["params"]}
    assert decayed == {id(p) for p in network.embedding.decayed_parameters()} == {id(network.embedding.weight)}
    fused = Optimizers(network, "adam", None, fused=True, embedding_weight_decay=0.01)
    assert fused.row_optimizers[0].weight_decay == 0.01
    assert small_config(data_dir, sparse=True).embedding_weight_decay == 0.0  # torch's sparse optimizers take none
    with pytest.raises(ValueError, match="no weight decay"):
        small_config(data_dir, sparse=True, embedding_weight_decay=0.01).validate()


def test_embedding_weight_decay_defaults_per_model_and_yields_to_an_explicit_value(data_dir):
    defaults = {model: small_config(data_dir, model=model).embedding_weight_decay for model in MODELS}
    assert defaults == {"lr": 1e-3, "fm": 1e-3, "deepfm": 1e-2, "dcnv2": 1e-2, "dlrm": 1e-2, "mlp": 1e-2}
    assert small_config(data_dir, model="lr", embedding_weight_decay=0.0).embedding_weight_decay == 0.0
    resolved = small_config(data_dir, model="fm")
    assert TrainConfig.from_dict(asdict(resolved)).fingerprint() == resolved.fingerprint()  # run.json round trip


def test_networks_and_thresholds_inside_a_method_are_not_decayed():
    from test_embeddings import FEATURES, FULL_SIZE, VOCABULARIES

    from unified_embedding.embeddings import build_embedding

    dhe = build_embedding("dhe", FEATURES, FULL_SIZE // 2, vocabularies=VOCABULARIES)
    assert dhe.decayed_parameters() == [] and len(list(dhe.parameters())) > 0
    pep = build_embedding("pep", FEATURES, FULL_SIZE // 2, vocabularies=VOCABULARIES)
    decayed = {id(p) for p in pep.decayed_parameters()}
    assert id(pep.threshold) not in decayed and len(decayed) == len(list(pep.parameters())) - 1


def test_the_trainer_gives_frequency_aware_methods_the_training_ids_by_frequency(data_dir):
    run = Trainer(
        small_config(data_dir, method="double_hash", epochs=1, method_options={"frequency": True}), progress=False
    ).run()
    assert 0.5 < run["test_auc"] <= 1 and run["num_embedding_params"] <= run["budget"]
