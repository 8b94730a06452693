"""Training and evaluation of a CTR network: early stopping on validation AUC, atomic
checkpoints with exact resume, and one `run.json` per run.

Every choice (epochs via early stopping, the best epoch's weights) is made on the
validation split; the test split is scored once, at the end, with the chosen weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from unified_embedding.batch import Batch
from unified_embedding.checkpoint import load, load_to_resume, save_atomic, write_text_atomic
from unified_embedding.data import (
    BatchLoader,
    CTRData,
    Split,
    ids_by_frequency,
    load_dataset,
    split_indices,
    vocabularies,
)
from unified_embedding.embeddings import EmbeddingMethod, FullEmbedding, build_embedding, get_method
from unified_embedding.embeddings.base import resolve_budget
from unified_embedding.features import FeatureSet
from unified_embedding.lowrank import apply_compression
from unified_embedding.metrics import split_metrics
from unified_embedding.models import MODELS
from unified_embedding.network import CTRNetwork
from unified_embedding.provenance import versions

#: Learning rates that work for each optimizer out of the box (Adagrad needs a larger step).
DEFAULT_LR = {"adam": 1e-3, "adagrad": 1e-2}


@dataclass
class TrainConfig:
    """Everything that defines a run. Validated in one place, `validate`."""

    dataset: str
    method: str = "unified"
    model: str = "dcnv2"
    budget: str = "1x"
    seed: int = 0
    epochs: int = 30
    patience: int = 2
    batch_size: int = 1024
    lr: float | None = None
    optimizer: Literal["adam", "adagrad"] = "adam"
    sparse: bool = False
    fused: bool = False
    #: L2 on the embedding's rows, added to their gradients as torch's optimizers do. None: the
    #: model's `embedding_weight_decay`, or 0 with `sparse` (torch's sparse optimizers take none)
    embedding_weight_decay: float | None = None
    split: Literal["random", "time"] = "random"
    split_seed: int = 0
    on_bad_rows: Literal["raise", "skip"] = "raise"
    data_dir: str | None = None
    checkpoint_every: int = 0
    max_rows: int | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embedding_weight_decay is None:  # resolved at once, so fingerprints see the value used
            model = MODELS.get(self.model)  # an unknown model is refused by `validate`
            self.embedding_weight_decay = 0.0 if self.sparse or model is None else model.embedding_weight_decay

    def validate(self) -> TrainConfig:
        get_method(self.method)
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(sorted(MODELS))}")
        if self.optimizer not in DEFAULT_LR:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(DEFAULT_LR)}")
        if self.split not in ("random", "time"):
            raise ValueError(f"split must be 'random' or 'time', got {self.split!r}")
        if self.on_bad_rows not in ("raise", "skip"):
            raise ValueError(f"on_bad_rows must be 'raise' or 'skip', got {self.on_bad_rows!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sparse and self.fused:
            raise ValueError("choose one of sparse (torch sparse gradients) and fused (update inside backward)")
        if not self.embedding_weight_decay >= 0:
            raise ValueError(f"embedding_weight_decay must be >= 0, got {self.embedding_weight_decay}")
        if self.sparse and self.embedding_weight_decay:
            raise ValueError("torch's sparse optimizers take no weight decay; use fused, or embedding_weight_decay=0")
        if self.patience < 0 or self.checkpoint_every < 0:
            raise ValueError("patience and checkpoint_every must be >= 0")
        if self.max_rows is not None and (isinstance(self.max_rows, bool) or self.max_rows < 10):
            raise ValueError(f"max_rows must be an integer >= 10, got {self.max_rows!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        return self

    def fingerprint(self) -> str:
        """Identifies the run's result: everything but where the data happens to live."""
        defining = {k: v for k, v in asdict(self).items() if k not in ("data_dir", "checkpoint_every")}
        for newer in ("max_rows", "fused"):  # fingerprints of runs without them predate these fields
            if not defining[newer]:
                del defining[newer]
        return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known}).validate()


@dataclass
class Prepared:
    """The data side of a run: rows, split, vocabularies and the resolved budget."""

    data: CTRData
    split: Split
    features: FeatureSet
    vocabularies: dict[str, np.ndarray]
    full_parameters: int
    budget: int


def load_data(config: TrainConfig) -> CTRData:
    """The run's dataset (its first `max_rows` rows when set)."""
    data = load_dataset(config.dataset, config.data_dir, on_bad_rows=config.on_bad_rows)
    return data if config.max_rows is None else data.head(config.max_rows)


def prepare(config: TrainConfig) -> Prepared:
    data = load_data(config)
    split = split_indices(data, method=config.split, seed=config.split_seed)
    vocab = vocabularies(data, split.train)
    features = data.features.with_cardinalities({name: len(ids) for name, ids in vocab.items()})
    full_parameters = FullEmbedding.parameter_count(features, vocab)
    return Prepared(data, split, features, vocab, full_parameters, resolve_budget(config.budget, full_parameters))


def build_network(config: TrainConfig, prepared: Prepared) -> CTRNetwork:
    """The same network for the same config and data, in any process (seeded init)."""
    torch.manual_seed(config.seed)
    options = dict(config.method_options)
    if get_method(config.method).uses_id_frequencies:
        options["frequent_ids"] = ids_by_frequency(prepared.data, prepared.split.train)
    embedding = build_embedding(
        config.method,
        prepared.features,
        prepared.budget,
        vocabularies=prepared.vocabularies,
        sparse=config.sparse,
        **options,
    )
    return CTRNetwork.build(embedding, config.model, **config.model_options)


class Optimizers:
    """Adam or Adagrad over the network; Adam's sparse-gradient tables get SparseAdam.

    With `fused`, the embedding's tables are updated inside backward by row optimizers of
    the same kind (fused.py) and the torch optimizer gets every other parameter. The
    embedding's rows (`decayed_parameters`) get `embedding_weight_decay` (with `fused`, on
    the rows a step touches, counting the steps each skipped: `RowOptimizer`).
    """

    def __init__(
        self, network: CTRNetwork, name: str, lr: float | None, *, fused: bool = False,
        embedding_weight_decay: float = 0.0,
    ) -> None:  # fmt: skip
        lr = lr or DEFAULT_LR[name]
        embedding = network.embedding
        self.grows = embedding.grows
        self.row_optimizers = embedding.fuse_optimizer(name, lr, weight_decay=embedding_weight_decay) if fused else []
        owned = {id(r.table) for r in self.row_optimizers}
        sparse = [p for p in embedding.parameters() if id(p) not in owned] if embedding.sparse else []
        owned |= {id(p) for p in sparse}
        decayed = [p for p in embedding.decayed_parameters() if id(p) not in owned]
        owned |= {id(p) for p in decayed}
        groups = [
            {"params": [p for p in network.parameters() if id(p) not in owned]},
            {"params": decayed, "weight_decay": embedding_weight_decay},
        ]
        groups = [group for group in groups if group["params"]]
        if name == "adagrad":
            self.optimizers = [torch.optim.Adagrad(groups + ([{"params": sparse}] if sparse else []), lr=lr)]
        else:
            self.optimizers = [torch.optim.Adam(groups, lr=lr)]
            if sparse:
                self.optimizers.append(torch.optim.SparseAdam(sparse, lr=lr))

    @classmethod
    def for_config(cls, network: CTRNetwork, config: TrainConfig) -> Optimizers:
        """The optimizers a run's configuration asks for."""
        return cls(network, config.optimizer, config.lr, fused=config.fused,
                   embedding_weight_decay=config.embedding_weight_decay)  # fmt: skip

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.grows:
            self._follow_growth()
        for optimizer in self.optimizers:
            optimizer.step()

    def _follow_growth(self) -> None:
        """Zero state for rows a parameter gained since the last step (a vocabulary that grows)."""
        for optimizer in self.optimizers:
            for param, state in optimizer.state.items():
                for key, value in state.items():
                    if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                        grown = torch.zeros_like(param)
                        grown[: value.shape[0]] = value
                        state[key] = grown

    def state_dict(self) -> list[dict]:
        return [optimizer.state_dict() for optimizer in [*self.optimizers, *self.row_optimizers]]

    def load_state_dict(self, states: list[dict]) -> None:
        for optimizer, state in zip([*self.optimizers, *self.row_optimizers], states, strict=True):
            optimizer.load_state_dict(state)


def train_step(network: CTRNetwork, optimizers: Optimizers, batch: Batch, where: str) -> torch.Tensor:
    """One optimizer step on `batch` (log loss plus the method's own term); `where` names the
    step in the error a diverging loss raises."""
    loss = nn.functional.binary_cross_entropy_with_logits(network(batch), batch.labels)
    extra = network.embedding.extra_loss()
    if extra is not None:
        loss = loss + extra
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss.item()} {where}; lower --lr")
    optimizers.zero_grad()
    loss.backward()
    optimizers.step()
    network.embedding.after_step()
    return loss


@torch.no_grad()
def predict(network: nn.Module, loader: BatchLoader) -> tuple[np.ndarray, np.ndarray]:
    """Click probabilities and labels over a loader, in its order."""
    network.eval()
    scores, labels = [], []
    for batch in loader.batches():
        scores.append(torch.sigmoid(network(batch)).numpy())
        labels.append(batch.labels.numpy())
    network.train()
    return np.concatenate(scores), np.concatenate(labels)


def evaluate(network: nn.Module, loader: BatchLoader) -> dict[str, float]:
    """AUC and log loss (scikit-learn) of the network on a split."""
    scores, labels = predict(network, loader)
    return split_metrics(labels, scores)


class Trainer:
    """Runs one configuration to a run.json, checkpointing so a killed run can resume."""

    def __init__(self, config: TrainConfig, output: str | Path | None = None, *, progress: bool = True) -> None:
        self.config = config.validate()
        self.output = Path(output) if output else None
        self.checkpoint_path = self.output.with_suffix(".ckpt") if self.output else None
        self.model_path = self.output.with_suffix(".pt") if self.output else None
        self.progress = progress

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        config = self.config
        prepared = prepare(config)
        network = build_network(config, prepared)
        stages = network.embedding.stages
        optimizers = Optimizers.for_config(network, self.config)
        train_loader = BatchLoader(
            prepared.data, prepared.split.train, config.batch_size, shuffle=True, seed=config.seed
        )
        valid_loader = BatchLoader(prepared.data, prepared.split.valid, 8192)
        state = self._fresh_state(stages[0])
        if resume and self.checkpoint_path and self.checkpoint_path.exists():
            state = self._restore(network, optimizers)
        while True:
            self._train_stage(network, optimizers, train_loader, valid_loader, state)
            if state["stage"] + 1 == len(stages):
                break
            optimizers = self._begin_stage(network, stages[state["stage"] + 1], valid_loader, state)
        network.load_state_dict(self._best_weights(state))
        result = self._result(network, prepared, state)
        if self.output:
            write_text_atomic(json.dumps(result, indent=2) + "\n", self.output)
        return result

    def _train_stage(
        self, network: CTRNetwork, optimizers: Optimizers, train_loader: BatchLoader, valid_loader: BatchLoader,
        state: dict[str, Any],
    ) -> None:  # fmt: skip
        """Epochs of the current stage until early stopping (or `epochs`), checkpointing each."""
        config, stage = self.config, state["stages"][-1]
        while state["epoch"] < config.epochs and not state["stopped"]:
            epoch = state["epoch"]
            started = time.perf_counter()
            named = f"{stage['name']} " if len(network.embedding.stages) > 1 else ""
            bar = tqdm(
                train_loader.batches(epoch, start=state["batch"], prefetch=2),
                total=len(train_loader),
                initial=state["batch"],
                desc=f"{named}epoch {epoch + 1}/{config.epochs}",
                disable=not self.progress,
                leave=False,
                unit="batch",
            )
            for batch in bar:
                loss = train_step(network, optimizers, batch, f"at epoch {epoch + 1}")
                state["batch"] += 1
                state["examples"] += batch.batch_size
                if state["batch"] % 20 == 0 or state["batch"] == len(train_loader):
                    seconds = state["train_seconds"] + time.perf_counter() - started
                    bar.set_postfix(
                        loss=f"{loss.item():.4f}", ex_per_s=f"{state['examples'] / max(seconds, 1e-9):,.0f}"
                    )
                if config.checkpoint_every and state["batch"] % config.checkpoint_every == 0:
                    self._checkpoint(network, optimizers, state, time.perf_counter() - started)
                    started = time.perf_counter()
            elapsed = time.perf_counter() - started
            stage["seconds"] += elapsed
            state["train_seconds"] += elapsed
            metrics = evaluate(network, valid_loader)
            state["history"].append(
                {
                    "stage": stage["name"],
                    "epoch": epoch + 1,
                    "val_auc": metrics["auc"],
                    "val_logloss": metrics["logloss"],
                }
            )
            if metrics["auc"] > state["best_auc"]:
                state.update(best_auc=metrics["auc"], best_epoch=epoch + 1, bad_epochs=0)
                self._keep_best(network, state)
            else:
                state["bad_epochs"] += 1
                state["stopped"] = state["bad_epochs"] > config.patience
            if self.progress:
                tqdm.write(f"{named}epoch {epoch + 1}: val AUC {metrics['auc']:.4f}  log loss {metrics['logloss']:.4f}")
            state.update(epoch=epoch + 1, batch=0)
            stage.update(epochs=epoch + 1, best_epoch=state["best_epoch"], best_val_auc=state["best_auc"])
            self._checkpoint(network, optimizers, state, 0.0)

    def _begin_stage(
        self, network: CTRNetwork, name: str, valid_loader: BatchLoader, state: dict[str, Any]
    ) -> Optimizers:
        """From the finished stage's best weights into the next stage, with fresh optimizers and
        early stopping; checkpointed at once, so a kill after a long search does not redo it."""
        network.load_state_dict(self._best_weights(state))
        started = time.perf_counter()
        result = network.embedding.begin_stage(name, lambda: evaluate(network, valid_loader)["auc"])
        record = self._stage_record(name)
        record.update(result=result, begin_seconds=time.perf_counter() - started)
        state["stages"].append(record)
        state.update(stage=state["stage"] + 1, epoch=0, batch=0, stopped=False, best_auc=-math.inf, best_epoch=0)
        state["bad_epochs"] = 0
        optimizers = Optimizers.for_config(network, self.config)
        self._checkpoint(network, optimizers, state, 0.0)
        return optimizers

    def _best_weights(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        return state["best_model"] if state["best_model"] is not None else load(self.model_path)["model"]

    def _keep_best(self, network: nn.Module, state: dict[str, Any]) -> None:
        """The best epoch's weights: written to the run's model file when it has one, else kept in memory.

        On disk, a large table is not held twice in memory, nor stored twice in every checkpoint.
        """
        if self.model_path is None:
            state["best_model"] = {k: v.clone() for k, v in network.state_dict().items()}
        else:
            save_atomic({"config": asdict(self.config), "model": network.state_dict()}, self.model_path)

    @staticmethod
    def _stage_record(name: str) -> dict[str, Any]:
        return {"name": name, "epochs": 0, "best_epoch": 0, "best_val_auc": None, "seconds": 0.0}

    def _fresh_state(self, first_stage: str) -> dict[str, Any]:
        """Progress of a run; `epoch`, `batch` and the early-stopping fields are the current stage's."""
        return {
            "stage": 0, "stages": [self._stage_record(first_stage)],
            "epoch": 0, "batch": 0, "examples": 0, "train_seconds": 0.0, "history": [], "stopped": False,
            "best_auc": -math.inf, "best_epoch": 0, "bad_epochs": 0, "best_model": None,
        }  # fmt: skip

    def _checkpoint(self, network: nn.Module, optimizers: Optimizers, state: dict, unsaved_seconds: float) -> None:
        if not self.checkpoint_path:
            return
        state["train_seconds"] += unsaved_seconds
        save_atomic(
            {
                "fingerprint": self.config.fingerprint(),
                "state": state,
                "model": network.state_dict(),
                "optimizers": optimizers.state_dict(),
                "rng": torch.get_rng_state(),
            },
            self.checkpoint_path,
        )

    def _restore(self, network: nn.Module, optimizers: Optimizers) -> dict[str, Any]:
        saved = load_to_resume(self.checkpoint_path, self.config.fingerprint())
        network.load_state_dict(saved["model"])
        optimizers.load_state_dict(saved["optimizers"])
        torch.set_rng_state(saved["rng"])
        return saved["state"]

    def _result(self, network: CTRNetwork, prepared: Prepared, state: dict[str, Any]) -> dict[str, Any]:
        valid = evaluate(network, BatchLoader(prepared.data, prepared.split.valid, 8192))
        test = evaluate(network, BatchLoader(prepared.data, prepared.split.test, 8192))
        num_params = sum(p.numel() for p in network.parameters())
        return run_record(self.config, prepared, network.embedding, num_params, valid, test, state)


def run_record(
    config: TrainConfig,
    prepared: Prepared,
    embedding: EmbeddingMethod,
    num_params: int,
    valid: dict[str, float],
    test: dict[str, float],
    state: dict[str, Any],
) -> dict[str, Any]:
    """The run.json of a finished run: one format for single-process and sharded training."""
    return {
        "dataset": config.dataset,
        "method": config.method,
        "model": config.model,
        "seed": config.seed,
        "budget": prepared.budget,
        "full_embedding_params": prepared.full_parameters,
        "num_embedding_params": embedding.num_parameters(),
        "num_embedding_bytes": embedding.num_bytes(),
        "num_params": num_params,
        "val_auc": valid["auc"],
        "val_logloss": valid["logloss"],
        "test_auc": test["auc"],
        "test_logloss": test["logloss"],
        "best_epoch": state["best_epoch"],
        "epochs_run": sum(stage["epochs"] for stage in state["stages"]),
        "stages": state["stages"],
        "history": state["history"],
        "train_seconds": state["train_seconds"],
        "examples_per_second": state["examples"] / max(state["train_seconds"], 1e-9),
        "bad_rows_skipped": prepared.data.bad_rows_skipped,
        "rows": {
            "train": len(prepared.split.train),
            "valid": len(prepared.split.valid),
            "test": len(prepared.split.test),
        },
        "embedding": {"out_dims": embedding.out_dims, "output_dim": embedding.output_dim},
        "config": asdict(config),
        "fingerprint": config.fingerprint(),
        "versions": versions(),
    }


def load_run(run_file: str | Path) -> tuple[dict[str, Any], TrainConfig, Prepared, CTRNetwork]:
    """A finished run's record, config, data and network with its saved weights.

    The network is rebuilt from the config, then given the low-rank shapes of a run made by
    `ue compress` (its `compression` record), then loaded.
    """
    run_file = Path(run_file)
    run = json.loads(run_file.read_text())
    model_file = run_file.with_suffix(".pt")
    if not model_file.exists():
        raise FileNotFoundError(f"{model_file} not found: the model file of {run_file} sits beside it")
    config = TrainConfig.from_dict(run["config"])
    prepared = prepare(config)
    network = build_network(config, prepared)
    if "compression" in run:
        apply_compression(network, run["compression"])
    network.load_state_dict(load(model_file)["model"])
    return run, config, prepared, network


def evaluate_run(run_file: str | Path, split: Literal["valid", "test"] = "test") -> dict[str, float]:
    """Score a finished run's saved model on one of its splits (rebuilt from its config)."""
    _, _, prepared, network = load_run(run_file)
    rows = prepared.split.valid if split == "valid" else prepared.split.test
    return evaluate(network, BatchLoader(prepared.data, rows, 8192))
