"""Distributed training: the `ue train` loop on N processes, the table sharded row-wise by TorchRec.

Run it through torch.distributed.run with the same flags as `ue train`:

    python -m torch.distributed.run --nproc-per-node 2 -m unified_embedding.dist.train \\
        --dataset movielens-100k --method unified --model dcnv2 --budget 0.25x --output run.json

or `launch(config, output, nproc=2)` from Python (what `ue train --nproc N` calls). It
writes the same run.json as single-process training (plus a "distributed" section), and
the best model in the single-process format beside it (run.pt), so `ue evaluate` and the
single-process `CTRNetwork` read a model trained sharded.

Semantics, chosen so that N processes train the model one process would:
- `--batch-size` is the *global* batch: batch k of an epoch is the same rows as in
  single-process training, split into N nearly equal parts, one per rank. TorchRec divides
  the table's gradients by the world size and DDP averages the dense ones, so with each
  rank's loss the mean over its part, a step is the single-process step on the whole batch.
  (A last batch with fewer rows than ranks is skipped.)
- Early stopping, the best epoch and the test score are decided as in `Trainer`, on AUCs
  computed from every rank's predictions (all ranks compute the same number).
- The table's optimizer is fbgemm's fused one (`sharding.embedding_optimizer`); run.json
  records which.

Checkpoints are sharded (torch.distributed.checkpoint: every rank writes its own rows and
optimizer state), each in its own folder `<output>.dist-ckpt/step-E-B/`; the file `LATEST`
names the last complete one and is replaced atomically only after every rank has written,
so a run killed at any moment resumes from a whole checkpoint (`--resume`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from tqdm.auto import tqdm

from unified_embedding.batch import Batch
from unified_embedding.checkpoint import load_to_resume, save_atomic, write_text_atomic
from unified_embedding.data import BatchLoader
from unified_embedding.dist.modules import TABLE, check_shardable, single_state_dict, to_torchrec
from unified_embedding.dist.sharding import EBC_PATH, combined_optimizer, shard_network
from unified_embedding.metrics import split_metrics
from unified_embedding.train import TrainConfig, build_network, prepare, run_record

#: The run writes the single-process model file (run.pt) when the table is at most this big.
CONSOLIDATE_LIMIT_BYTES = 8 << 30
#: Global batch size of evaluation, as in single-process training.
EVAL_BATCH = 8192
LATEST = "LATEST"


def checkpoint_dir(output: str | Path) -> Path:
    """Where a run's sharded checkpoints live: beside run.json (not the single-process `.ckpt` file)."""
    return Path(output).with_suffix(".dist-ckpt")


class DistributedTrainer:
    """`Trainer` on every rank of an initialised process group (one per process under torch.distributed.run)."""

    def __init__(self, config: TrainConfig, output: str | Path, *, progress: bool = True,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        self.config = config.validate()
        self.output = Path(output)
        self.model_path = self.output.with_suffix(".pt")
        self.checkpoints = checkpoint_dir(self.output)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.progress = progress and self.rank == 0
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if dist.get_backend() == "nccl" else "cpu"
        self.device = torch.device(device)

    # ---------------------------------------------------------------- the run
    def run(self, *, resume: bool = False) -> dict[str, Any]:
        config = self.config
        prepared = self._prepare()
        network = build_network(config, prepared)
        check_shardable(network.embedding)
        model, table_optimizer = shard_network(
            to_torchrec(network, device=self.device), optimizer=config.optimizer, lr=config.lr,
            weight_decay=config.embedding_weight_decay, device=self.device,
            batch_size=max(1, config.batch_size // self.world),
        )  # fmt: skip
        del network
        optimizer = combined_optimizer(model, config.optimizer, config.lr)
        # Dropout differs between ranks, as it does between the examples of one batch.
        torch.manual_seed(config.seed * 1_000_003 + self.rank + 1)
        loader = BatchLoader(prepared.data, prepared.split.train, config.batch_size, shuffle=True, seed=config.seed)
        state = _fresh_state()
        if resume:
            state = self._restore(model, optimizer) or state
        loss_fn = nn.BCEWithLogitsLoss()
        while state["epoch"] < config.epochs and not state["stopped"]:
            epoch = state["epoch"]
            started = time.perf_counter()
            bar = tqdm(
                self._train_batches(loader, epoch, state["batch"]), total=len(loader), initial=state["batch"],
                desc=f"epoch {epoch + 1}/{config.epochs}", disable=not self.progress, leave=False, unit="batch",
            )  # fmt: skip
            loss = torch.zeros(())
            for number, batch, global_size in bar:
                if batch is not None:
                    batch = batch.to(self.device)
                    loss = loss_fn(model(batch), batch.labels)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch + 1}; lower --lr")
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    state["examples"] += global_size
                state["batch"] = number + 1
                if self.progress and (state["batch"] % 20 == 0 or state["batch"] == len(loader)):
                    seconds = state["train_seconds"] + time.perf_counter() - started
                    bar.set_postfix(
                        loss=f"{loss.item():.4f}", ex_per_s=f"{state['examples'] / max(seconds, 1e-9):,.0f}"
                    )
                if config.checkpoint_every and state["batch"] % config.checkpoint_every == 0:
                    state["train_seconds"] += time.perf_counter() - started
                    self._checkpoint(model, optimizer, state)
                    started = time.perf_counter()
            state["train_seconds"] += time.perf_counter() - started
            metrics = self._evaluate(model, prepared.data, prepared.split.valid)
            state["history"].append(
                {"stage": "train", "epoch": epoch + 1, "val_auc": metrics["auc"], "val_logloss": metrics["logloss"]}
            )
            if metrics["auc"] > state["best_auc"]:
                state.update(best_auc=metrics["auc"], best_epoch=epoch + 1, bad_epochs=0)
                state["best"] = self._save_best(model, epoch + 1)
            else:
                state["bad_epochs"] += 1
                state["stopped"] = state["bad_epochs"] > config.patience
            if self.progress:
                tqdm.write(f"epoch {epoch + 1}: val AUC {metrics['auc']:.4f}  log loss {metrics['logloss']:.4f}")
            state.update(epoch=epoch + 1, batch=0)
            state["stages"][0].update(
                epochs=epoch + 1, best_epoch=state["best_epoch"], best_val_auc=state["best_auc"], seconds=state["train_seconds"]
            )
            self._checkpoint(model, optimizer, state)
        if state["best"] is not None:  # the best epoch's weights, as single-process training keeps them
            best = {"model": model.state_dict()}
            dcp.load(best, checkpoint_id=str(self.checkpoints / state["best"]))
            model.load_state_dict(best["model"])
        result = self._result(model, prepared, state, table_optimizer.describe())
        self._write_outputs(model, result)
        return result

    def _prepare(self):
        # Rank 0 parses (and caches) the data first; the others then map the cache.
        if self.rank == 0:
            prepared = prepare(self.config)
        dist.barrier()
        if self.rank != 0:
            prepared = prepare(self.config)
        return prepared

    # ---------------------------------------------------------------- data
    def _train_batches(self, loader: BatchLoader, epoch: int, start: int) -> Iterator[tuple[int, Batch | None, int]]:
        """(batch number, this rank's part of the global batch or None if skipped, global batch size)."""
        for number, rows in enumerate(loader.batch_rows(epoch), start=0):
            if number < start:
                continue
            if len(rows) < self.world:  # too few rows to give every rank one: skipped on all ranks alike
                yield number, None, 0
                continue
            yield number, loader.batch_of(np.array_split(rows, self.world)[self.rank]), len(rows)

    @torch.no_grad()
    def _evaluate(self, model: nn.Module, data, rows: np.ndarray) -> dict[str, float]:
        """AUC and log loss over `rows`, each rank scoring its part of every batch; the same on all ranks."""
        _sync_buffers(model)
        model.eval()
        loader = BatchLoader(data, rows, EVAL_BATCH)
        scores, labels = [], []
        for part in _eval_parts(rows, EVAL_BATCH, self.world, self.rank):
            batch = loader.batch_of(part)
            scores.append(torch.sigmoid(model(batch.to(self.device))).float().cpu().numpy())
            labels.append(batch.labels.numpy())
        model.train()
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, (np.concatenate(scores), np.concatenate(labels)))
        all_scores = np.concatenate([s for s, _ in gathered])
        all_labels = np.concatenate([y for _, y in gathered])
        return split_metrics(all_labels, all_scores)

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint(self, model: nn.Module, optimizer, state: dict[str, Any]) -> None:
        """A whole sharded checkpoint in a new folder, then LATEST pointed at it (rank 0, atomically)."""
        name = f"step-{state['epoch']:04d}-{state['batch']:07d}"
        folder = self.checkpoints / name
        if self.rank == 0 and folder.exists():  # left by a run killed while writing it
            shutil.rmtree(folder)
        _sync_buffers(model)
        dist.barrier()
        dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_id=str(folder))
        torch.save(torch.get_rng_state(), folder / f"rng-{self.rank}.pt")
        if self.rank == 0:
            save_atomic(
                {"fingerprint": self.config.fingerprint(), "world_size": self.world, "state": state},
                folder / "trainer.pt",
            )
        dist.barrier()  # every rank's part is on disk
        if self.rank == 0:
            write_text_atomic(name + "\n", self.checkpoints / LATEST)
            keep = {name, state["best"]}
            for stale in self.checkpoints.iterdir():
                if stale.is_dir() and stale.name not in keep:
                    shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()

    def _save_best(self, model: nn.Module, epoch: int) -> str:
        name = f"best-{epoch:04d}"
        if self.rank == 0 and (self.checkpoints / name).exists():
            shutil.rmtree(self.checkpoints / name)
        dist.barrier()
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(self.checkpoints / name))
        dist.barrier()
        return name

    def _restore(self, model: nn.Module, optimizer) -> dict[str, Any] | None:
        """Load the latest checkpoint into the model and optimizer; its trainer state, or None if there is none."""
        pointer = self.checkpoints / LATEST
        if not pointer.exists():
            return None
        folder = self.checkpoints / pointer.read_text().strip()
        saved = load_to_resume(folder / "trainer.pt", self.config.fingerprint())
        if saved["world_size"] != self.world:
            raise ValueError(f"{folder} was written by {saved['world_size']} processes; resume it with as many")
        _init_optimizer_state(optimizer)
        target = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        dcp.load(target, checkpoint_id=str(folder))
        model.load_state_dict(target["model"])
        optimizer.load_state_dict(target["optimizer"])
        torch.set_rng_state(torch.load(folder / f"rng-{self.rank}.pt"))
        if self.progress:
            state = saved["state"]
            tqdm.write(f"resuming from {folder} (epoch {state['epoch'] + 1}, batch {state['batch']})")
        return saved["state"]

    # ---------------------------------------------------------------- outputs
    def _result(self, model: nn.Module, prepared, state: dict[str, Any], table_optimizer: str) -> dict[str, Any]:
        valid = self._evaluate(model, prepared.data, prepared.split.valid)
        test = self._evaluate(model, prepared.data, prepared.split.test)
        embedding = _unwrap(model).embedding
        config = self.config
        table_rows = embedding.num_rows
        num_params = embedding.num_parameters() + sum(p.numel() for p in _unwrap(model).model.parameters())
        record = run_record(config, prepared, embedding, num_params, valid, test, state)
        record["distributed"] = {
            "world_size": self.world,
            "backend": dist.get_backend(),
            "device": self.device.type,
            "sharding": "row_wise",
            "rows_per_rank": _rows_per_rank(model, table_rows, self.world),
            "table_optimizer": table_optimizer,
            "checkpoints": str(self.checkpoints),
        }
        record["versions"] |= {"torchrec": _version("torchrec"), "fbgemm_gpu": _version("fbgemm_gpu")}
        return record

    def _write_outputs(self, model: nn.Module, result: dict[str, Any]) -> None:
        embedding = _unwrap(model).embedding
        if embedding.num_bytes() <= CONSOLIDATE_LIMIT_BYTES:
            state = consolidated_state_dict(model)
            if self.rank == 0:
                save_atomic({"config": asdict(self.config), "model": single_state_dict(state)}, self.model_path)
                result["model_file"] = str(self.model_path)
        if self.rank == 0:
            write_text_atomic(json.dumps(result, indent=2) + "\n", self.output)
        dist.barrier()


# -------------------------------------------------------------------- helpers
def _eval_parts(rows: np.ndarray, batch_size: int, world: int, rank: int) -> Iterator[np.ndarray]:
    """This rank's part of every evaluation batch; every rank gets the same number of non-empty parts."""
    batches = max(1, min(math.ceil(len(rows) / batch_size), len(rows) // world))
    for part in np.array_split(rows, batches):
        yield np.array_split(part, world)[rank]


def _sync_buffers(model: nn.Module) -> None:
    """Every rank's buffers (BatchNorm statistics) made one: float buffers averaged, others rank 0's.

    DistributedModelParallel's DDP leaves buffers alone, so each rank's running statistics
    follow its own part of each batch. Their exponential averages are linear in the batches'
    statistics, so the mean over ranks is the running mean one process would have kept on
    the whole batches (and the running variance nearly so). Called before every evaluation
    and checkpoint, so ranks score alike and a checkpoint (which stores one copy) loses nothing.
    """
    world = dist.get_world_size()
    for buffer in _unwrap(model).model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world)
        else:
            dist.broadcast(buffer, src=0)


def _fresh_state() -> dict[str, Any]:
    """Single-process training's state (`Trainer._fresh_state`) for the one stage sharded methods have."""
    return {
        "stage": 0, "stages": [{"name": "train", "epochs": 0, "best_epoch": 0, "best_val_auc": None, "seconds": 0.0}],
        "epoch": 0, "batch": 0, "examples": 0, "train_seconds": 0.0, "history": [], "stopped": False,
        "best_auc": -math.inf, "best_epoch": 0, "bad_epochs": 0, "best": None,
    }  # fmt: skip


def _init_optimizer_state(optimizer) -> None:
    """Create the dense optimizer's lazy state (a zero step) so a checkpoint can be loaded into it in place.

    The fused table optimizer's state exists from the start.
    """
    for key, inner in optimizer.optimizers:
        if key == "dense" and inner.params:
            inner.init_state()
            inner.zero_grad(set_to_none=True)


def _unwrap(model: nn.Module) -> nn.Module:
    """The network inside DistributedModelParallel (which unwraps DDP itself)."""
    return model.module if isinstance(model, DistributedModelParallel) else model


def _rows_per_rank(model: nn.Module, table_rows: int, world: int) -> list[int]:
    weight = model.state_dict()[f"{EBC_PATH}.embedding_bags.{TABLE}.weight"]
    if isinstance(weight, ShardedTensor):
        per_rank = [0] * world
        for shard in weight.metadata().shards_metadata:
            per_rank[shard.placement.rank()] += shard.shard_sizes[0]
        return per_rank
    return [table_rows] * world


def consolidated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole network's state dict with the table gathered from its shards (complete on rank 0 only).

    A collective: every rank must call it. Other ranks get the table as an empty tensor.
    """
    out = {}
    rank = dist.get_rank()
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            shards = value.local_shards()
            device = shards[0].tensor.device if shards else torch.device("cpu")  # nccl gathers on the GPU
            full = torch.empty(value.size(), dtype=value.dtype, device=device) if rank == 0 else None
            value.gather(dst=0, out=full)
            out[key] = full.cpu() if rank == 0 else torch.empty(0)
        else:
            out[key] = value.detach().cpu()
    return out


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return "unknown"


# -------------------------------------------------------------------- entry points
def train_flags(config: TrainConfig, output: str | Path, *, resume: bool = False, progress: bool = True) -> list[str]:
    """The `ue train` flags that give `config` (what the workers parse)."""
    flags = ["--output", str(output)]
    defaults = TrainConfig(dataset=config.dataset)
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("method_options", "model_options"):
            option = "--method-option" if f.name == "method_options" else "--model-option"
            for key, item in value.items():
                flags += [option, f"{key}={item!r}"]
        elif isinstance(value, bool):
            if value:
                flags.append(flag)
        elif value is not None and (f.name == "dataset" or value != getattr(defaults, f.name)):
            flags += [flag, str(value)]
    if resume:
        flags.append("--resume")
    if not progress:
        flags.append("--quiet")
    return flags


def launch(config: TrainConfig, output: str | Path, *, nproc: int, resume: bool = False,
           progress: bool = True, timeout: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Train `config` on `nproc` local processes (torch.distributed.run, 127.0.0.1) and return its run.json.

    What `ue train --nproc N` calls. Raises RuntimeError if the workers fail.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if config.fused:
        raise ValueError("sharded training always updates the table inside backward (fbgemm's kernels); drop fused")
    command = launch_command(config, output, nproc=nproc, resume=resume, progress=progress)
    completed = subprocess.run(command, timeout=timeout, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"distributed training failed (exit status {completed.returncode}): {' '.join(command)}")
    return json.loads(Path(output).read_text())


def launch_command(config: TrainConfig, output: str | Path, *, nproc: int, resume: bool = False,
                   progress: bool = True) -> list[str]:  # fmt: skip
    """The torch.distributed.run command line `launch` runs (one node, gloo/nccl on 127.0.0.1)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "unified_embedding.dist.train", *train_flags(config, output, resume=resume, progress=progress),
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """`ue train`'s flags, parsed by `ue train`'s own parser (so the two never drift apart)."""
    from unified_embedding.cli import build_parser

    args = build_parser().parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = dict(vars(args))
    values["method_options"] = dict(args.method_option)
    values["model_options"] = dict(args.model_option)
    return TrainConfig.from_dict(values)


def init_process_group() -> None:
    """gloo on CPU, nccl when this node has a GPU per local rank; env:// from torch.distributed.run."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of each worker process under torch.distributed.run."""
    # torch.distributed and TorchRec announce their own API migrations (ShardedTensor -> DTensor,
    # *_tensor -> *_single) on every collective; nothing a user of `ue train` can act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args(argv)
    config = config_from_args(args)
    init_process_group()
    try:
        result = DistributedTrainer(config, args.output, progress=not args.quiet).run(resume=args.resume)
        if dist.get_rank() == 0:
            keys = ["dataset", "method", "model", "num_embedding_params", "val_auc", "test_auc", "test_logloss",
                    "train_seconds", "examples_per_second", "bad_rows_skipped"]  # fmt: skip
            print(json.dumps({k: result[k] for k in keys} | {"world_size": dist.get_world_size()}, indent=2))
            print(f"wrote {args.output}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
