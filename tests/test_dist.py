"""TorchRec integration: the unified table sharded row-wise over 2 processes (gloo, 127.0.0.1, CPU).

Workers are forked from the test process: they inherit torch and torchrec already imported,
so a 2-process group costs well under a second where torch.distributed.run would spend half
a minute importing. One test runs the real entry point, `main`, in the environment
torch.distributed.run gives its workers.
"""

import copy
import json
import multiprocessing
import os
import signal
from dataclasses import replace

import pytest

torchrec = pytest.importorskip("torchrec")

import numpy as np
import torch
import torch.distributed as dist

from unified_embedding.data import BatchLoader
from unified_embedding.dist.modules import (
    TorchRecSlotEmbedding,
    single_state_dict,
    slot_keys,
    to_torchrec,
    torchrec_state_dict,
)
from unified_embedding.dist.plan import format_plan, make_plan
from unified_embedding.dist.sharding import combined_optimizer, shard_network
from unified_embedding.dist.train import (
    DistributedTrainer,
    config_from_args,
    consolidated_state_dict,
    free_port,
    launch_command,
    main,
    parse_args,
    train_flags,
)
from unified_embedding.embeddings import UnifiedEmbedding
from unified_embedding.features import FeatureSet
from unified_embedding.train import TrainConfig, build_network, evaluate_run, prepare

WORLD = 2
#: No BatchNorm, no dropout: a step on a batch split across ranks is then exactly the step on the whole batch.
PLAIN_MODEL = {"hidden": [32], "num_cross_layers": 1, "dropout": 0.0, "batch_norm": False}
SMALL_MODEL = {"hidden": [32, 32], "num_cross_layers": 1}


def movielens_config(data_dir, **overrides) -> TrainConfig:
    values = {"dataset": "movielens-100k", "method": "unified", "model": "dcnv2", "budget": "0.25x",
              "data_dir": str(data_dir), "model_options": PLAIN_MODEL}  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def movielens(data_dir):
    config = movielens_config(data_dir)
    return config, prepare(config)


def run_workers(target, *args, world: int = WORLD, timeout: float = 120.0, init: bool = True) -> list[int]:
    """Fork `world` processes running target(rank, *args) in one gloo group on 127.0.0.1; their exit codes.

    With init=False the workers get torch.distributed.run's environment instead and `target`
    initialises the group itself (as the entry point does).
    """
    port = free_port()
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_worker, args=(target, rank, world, port, init, args)) for rank in range(world)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()
    return [worker.exitcode for worker in workers]


def _worker(target, rank, world, port, init, args) -> None:
    torch.set_num_threads(1)
    if not init:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
        target(rank, *args)
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        target(rank, *args)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ the module, in one process


def test_torchrec_module_reads_the_same_rows_as_the_single_process_module(movielens):
    config, prepared = movielens
    network = build_network(config, prepared)
    converted = to_torchrec(network)
    batch = next(BatchLoader(prepared.data, prepared.split.train, 256).batches())
    assert "genres" in batch.keys  # multivalent and mean-pooled: SUM with per-sample weights 1/len
    with torch.no_grad():
        torch.testing.assert_close(converted.embedding(batch), network.embedding(batch), rtol=0, atol=1e-6)
    keys = slot_keys(network.embedding)
    assert keys[:2] == ["user@0", "user@1"] and len(keys) == network.embedding.slot_feature.numel()
    assert converted.embedding.num_parameters() == network.embedding.num_parameters()

    # State dicts convert both ways, and the same weights give the same predictions.
    network.eval(), converted.eval()
    changed = {k: v + 0.01 if v.is_floating_point() else v for k, v in converted.state_dict().items()}
    converted.load_state_dict(changed)
    network.load_state_dict(single_state_dict(converted.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(network(batch), converted(batch), rtol=0, atol=1e-6)
    back = to_torchrec(network)
    back.load_state_dict(torchrec_state_dict(network.state_dict()))
    torch.testing.assert_close(back.embedding.table, converted.embedding.table, rtol=0, atol=0)


def test_collisionless_features_and_other_slot_methods_convert_too(movielens):
    _, prepared = movielens
    features = FeatureSet([replace(f, collisionless=f.name == "user") for f in prepared.features])
    embedding = UnifiedEmbedding(features, 500, 4, {"item": 3}, vocabularies=prepared.vocabularies)
    batch = next(BatchLoader(prepared.data, prepared.split.valid, 300).batches())
    with torch.no_grad():
        torch.testing.assert_close(TorchRecSlotEmbedding(embedding)(batch), embedding(batch), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ sharded over 2 processes

LR = {"sgd": 0.5, "adagrad": 0.05}


def _step_worker(rank, network, loader, rows, out_dir) -> None:
    part = loader.batch_of(np.array_split(rows, WORLD)[rank])
    for optimizer, lr in LR.items():
        sharded, _ = shard_network(to_torchrec(network), optimizer=optimizer, lr=lr)
        sharded.eval()
        with torch.no_grad():
            logits = sharded(part)
        sharded.train()
        step = combined_optimizer(sharded, optimizer, lr)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(sharded(part), part.labels)  # mean over this rank
        step.zero_grad()
        loss.backward()
        step.step()
        state = consolidated_state_dict(sharded)
        torch.save({"logits": logits, "state": single_state_dict(state) if rank == 0 else None},
                   out_dir / f"{optimizer}-{rank}.pt")  # fmt: skip


def test_sharded_forward_and_one_training_step_match_the_single_process_model(movielens, tmp_path):
    config, prepared = movielens
    network = build_network(config, prepared)
    loader = BatchLoader(prepared.data, prepared.split.train, 64)
    rows = prepared.split.train[:64]
    assert run_workers(_step_worker, network, loader, rows, tmp_path) == [0, 0]
    batch = loader.batch_of(rows)
    for optimizer, lr in LR.items():
        saved = [torch.load(tmp_path / f"{optimizer}-{rank}.pt") for rank in range(WORLD)]
        reference = copy.deepcopy(network)
        reference.eval()
        with torch.no_grad():
            expected = reference(batch)
        # The forward: each rank scores its half of the batch, reading rows held by both ranks.
        torch.testing.assert_close(torch.cat([s["logits"] for s in saved]), expected, rtol=0, atol=1e-6)

        # One step. Each rank's loss is the mean over its 32 examples; TorchRec divides the table's
        # gradient by the world size and DDP averages the dense ones, so the step equals the
        # single-process step on the mean loss over all 64.
        reference.train()
        torch_optimizer = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adagrad
        opt = torch_optimizer(reference.parameters(), lr=lr)
        torch.nn.functional.binary_cross_entropy_with_logits(reference(batch), batch.labels).backward()
        opt.step()
        after = saved[0]["state"]
        before_table, after_table = network.embedding.weight.detach(), after["embedding.weight"]
        moved = (after_table != before_table).any(dim=1)
        expected_moved = (reference.embedding.weight.detach() != before_table).any(dim=1)
        assert moved.sum() > 50 and torch.equal(moved, expected_moved)  # the same rows, and only those
        torch.testing.assert_close(after_table, reference.embedding.weight.detach(), rtol=0, atol=1e-6)
        # Adagrad's first step is lr * g / |g|: for the dense layers' near-zero gradients it magnifies
        # the rounding of a mean taken in two halves (a few elements differ by ~2e-6).
        dense_atol = 1e-6 if optimizer == "sgd" else 1e-5
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(
                after[key],
                value,
                rtol=0,
                atol=dense_atol,
                msg=lambda m, key=key, optimizer=optimizer: f"{optimizer}: {key}: {m}",
            )


def _train_worker(rank, config, output, resume, kill_at) -> None:
    trainer = DistributedTrainer(config, output, progress=False)
    if kill_at is not None:
        checkpoint = trainer._checkpoint

        def checkpoint_then_maybe_die(model, optimizer, state):
            if (state["epoch"], state["batch"]) == kill_at:  # killed while the next checkpoint is due
                os.kill(os.getpid(), signal.SIGKILL)
            checkpoint(model, optimizer, state)

        trainer._checkpoint = checkpoint_then_maybe_die
    result = trainer.run(resume=resume)
    if rank == 0:
        (output.parent / "result.json").write_text(json.dumps(result))


def test_a_killed_two_process_run_resumes_from_its_sharded_checkpoint(data_dir, tmp_path):
    config = movielens_config(data_dir, model_options=SMALL_MODEL, epochs=2, batch_size=8192, checkpoint_every=4)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    assert run_workers(_train_worker, config, tmp_path / "a" / "run.json", False, None) == [0, 0]
    reference = json.loads((tmp_path / "a" / "result.json").read_text())
    assert reference["val_auc"] == reference["history"][reference["best_epoch"] - 1]["val_auc"]  # the best weights

    killed = tmp_path / "b" / "run.json"
    # SIGKILL both workers in epoch 2 at batch 8: batches 5-8 are lost, the checkpoint at batch 4 is whole.
    assert run_workers(_train_worker, config, killed, False, (1, 8)) == [-signal.SIGKILL] * 2
    checkpoints = killed.with_suffix(".dist-ckpt")
    assert (checkpoints / "LATEST").read_text().strip() == "step-0001-0000004"
    assert not killed.exists()
    assert run_workers(_train_worker, config, killed, True, None) == [0, 0]
    resumed = json.loads((tmp_path / "b" / "result.json").read_text())
    assert resumed["history"] == reference["history"]
    for key in ("val_auc", "test_auc", "test_logloss"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-9)
    assert resumed["distributed"]["rows_per_rank"] == reference["distributed"]["rows_per_rank"]


def test_each_rank_trains_on_its_part_of_the_same_global_batches(movielens):
    _, prepared = movielens
    loader = BatchLoader(prepared.data, prepared.split.train, 1000, shuffle=True, seed=3)
    for rows, batch in zip(loader.batch_rows(2), loader.batches(2), strict=True):
        assert torch.equal(loader.batch_of(rows).labels, batch.labels)
        assert torch.equal(loader.batch_of(rows).values, batch.values)


def _main_worker(rank, argv) -> None:
    assert main(argv) == 0


def test_the_entry_point_takes_ue_train_flags_and_the_model_loads_single_process(data_dir, tmp_path):
    """What each process of `ue train --nproc 2` runs: same flags, run.json, and a run.pt `ue evaluate` reads."""
    config = movielens_config(data_dir, model_options=SMALL_MODEL, epochs=1, batch_size=4096)
    output = tmp_path / "run.json"
    flags = train_flags(config, output, progress=False)
    assert config_from_args(parse_args(flags)).fingerprint() == config.fingerprint()
    command = launch_command(config, output, nproc=WORLD)
    assert command[1:3] == ["-m", "torch.distributed.run"] and command[command.index("--nproc-per-node") + 1] == "2"
    assert command[command.index("unified_embedding.dist.train") + 1 :] == train_flags(config, output)

    assert run_workers(_main_worker, flags, init=False) == [0, 0]
    result = json.loads(output.read_text())
    keys = {"dataset", "method", "model", "num_embedding_params", "val_auc", "test_auc", "test_logloss",
            "train_seconds", "examples_per_second", "config", "fingerprint", "history"}  # fmt: skip
    assert keys <= set(result) and result["fingerprint"] == config.fingerprint()
    assert result["distributed"]["world_size"] == WORLD and sum(result["distributed"]["rows_per_rank"]) > 0
    assert 0.6 < result["test_auc"] < 1
    # The sharded model, consolidated into the single-process format, scores the same.
    assert evaluate_run(output, "test")["auc"] == pytest.approx(result["test_auc"], abs=1e-6)


# ------------------------------------------------------------------ the plan


def test_plan_for_two_billion_rows_on_64_gpus_adds_up():
    plan = make_plan(2_000_000_000, 64, 26, 64, device="cuda")
    assert plan.sharding_type == "row_wise" and plan.compute_kernel == "fused"
    assert len(plan.shares) == 64 and all(s.rows == 31_250_000 for s in plan.shares)
    assert sum(s.table_bytes for s in plan.shares) == plan.table_bytes == 2_000_000_000 * 64 * 4
    assert all(s.planner_hbm_bytes >= s.table_bytes + s.optimizer_bytes for s in plan.shares)
    text = format_plan(plan)
    assert "2,000,000,000 of 2,000,000,000 rows" in text and text.count("\n") > 64

    cpu = make_plan(10**9 + 3, 16, 4, 3, device="cpu", optimizer="adagrad")
    assert sum(s.rows for s in cpu.shares) == 10**9 + 3 and cpu.shares[0].optimizer_bytes == cpu.shares[0].table_bytes


def test_unsupported_methods_are_refused(movielens):
    config, prepared = movielens
    for method, options in (("qr", {}), ("mixed_dim", {}), ("unified", {"storage": "int8"})):
        network = build_network(movielens_config(config.data_dir, method=method, method_options=options), prepared)
        with pytest.raises(ValueError, match="cannot be sharded"):
            to_torchrec(network)
