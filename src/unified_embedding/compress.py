"""`ue compress`: low-rank output compression of a trained run (Yu et al., 2024, Atomic Feature Mimicking).

1. Run the trained network (eval mode) on a sample of training batches and accumulate, for
   each target layer, the mean and covariance of its outputs: each feature's embedding
   vector, and each Linear layer of the model; for the embedding also the second moment of
   the logit's gradient with respect to each feature's vector.
2. Keep r principal directions of each layer's outputs (lowrank.py replaces the layer by two
   thin ones). r is chosen from `ratio`: every compressed layer stores at most 1/ratio of the
   floats it stored before. A Linear layer gets the largest such r and keeps its top-r
   directions, as in the paper (no r fits a layer with one output, such as the logit head,
   which stays as it is). The embedding table's budget is shared by its features, and there
   variance alone misleads: on Frappe it kept `user` whole and gave `item` rank 2 (validation
   AUC 0.901 before fine-tuning, from 0.965). So a feature's directions are ranked by their
   variance times the logit's mean squared gradient along them (the squared logit change
   dropping the direction causes, to first order), and the budget goes greedily where that
   is largest per float (`table_ranks`; validation AUC 0.940 on Frappe).
3. Optionally fine-tune the compressed network, early-stopped on validation AUC (the
   compressed network before fine-tuning is a candidate too).
4. Write a new run.json and model file; `ue evaluate --run` rebuilds the compressed shapes
   from its `compression` record (`lowrank.apply_compression`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unified_embedding.checkpoint import save_atomic, write_text_atomic
from unified_embedding.data import BatchLoader
from unified_embedding.lowrank import FactorisedLinear, LowRankTableEmbedding, feature_regions, replace_module
from unified_embedding.network import CTRNetwork
from unified_embedding.train import Optimizers, Prepared, TrainConfig, evaluate, load_run

#: Training batches whose outputs the PCA sees: 100 batches of the run's batch size (102,400
#: examples at 1024) estimate a 400-wide covariance well, and cover the whole training split of
#: MovieLens-100K (80,000 rows) and Frappe (69,266).
DEFAULT_SAMPLE_BATCHES = 100
#: Bytes of a stored float32.
FLOAT_BYTES = 4


class Moments:
    """Count, sum and sum of outer products of vectors (a layer's outputs, or gradients), in float64."""

    def __init__(self, width: int) -> None:
        self.count = 0
        self.total = torch.zeros(width, dtype=torch.float64)
        self.outer = torch.zeros(width, width, dtype=torch.float64)

    def add(self, vectors: Tensor) -> None:
        x = vectors.detach().double()
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x

    def pca(self) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variances along the principal directions (descending), and the directions as columns."""
        mean = self.total / self.count
        covariance = self.outer / self.count - torch.outer(mean, mean)
        variances, directions = torch.linalg.eigh(covariance)
        return mean, variances.flip(0).clamp(min=0), directions.flip(1)

    def second_moment(self) -> Tensor:
        return self.outer / self.count


def weighted_pca(outputs: Moments, gradients: Moments) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Principal directions of `outputs` ordered by importance, the variance along a direction
    times the mean squared gradient along it: mean, importances, variances, directions (columns)."""
    mean, variances, directions = outputs.pca()
    importance = variances * torch.einsum("ik,ij,jk->k", directions, gradients.second_moment(), directions)
    order = torch.argsort(importance, descending=True)
    return mean, importance[order], variances[order], directions[:, order]


def linear_rank(layer: nn.Linear, ratio: float) -> int:
    """The largest r with r * (in + out) + out <= (stored floats of `layer`) / ratio; 0 when none fits."""
    floats = sum(p.numel() for p in layer.parameters())
    return max(0, math.floor((floats / ratio - layer.out_features) / (layer.in_features + layer.out_features)))


def table_ranks(sizes: Mapping[str, int], importance: Mapping[str, Tensor], budget: float) -> dict[str, int | None]:
    """Each feature's narrow width within `budget` floats for the whole table (None: kept as it is).

    `importance[feature]` scores its directions, in the order they are kept. A feature of `size`
    rows and width w costs r * (size + w) + w floats at rank r (narrow rows, projection, mean),
    or size * w kept. Every feature starts at rank 1 (or kept, if cheaper); then the step (one
    more rank, or keeping the feature whole) that keeps the most importance per added float,
    among those that still fit, is taken until none fits. Small features are thus kept whole.
    """

    def cost(name: str, rank: int | None) -> int:
        width = len(importance[name])
        return sizes[name] * width if rank is None else rank * (sizes[name] + width) + width

    ranks: dict[str, int | None] = {name: 1 if cost(name, 1) < cost(name, None) else None for name in sizes}
    spent = sum(cost(name, rank) for name, rank in ranks.items())
    if spent > budget:
        raise ValueError(
            f"compress: a table budget of {budget:,.0f} floats cannot give every feature rank 1; lower --ratio"
        )
    while True:
        best: tuple[float, str, int | None, int] | None = None
        for name, rank in ranks.items():
            if rank is None:
                continue
            steps = [(None, float(importance[name][rank:].sum()))]
            if cost(name, rank + 1) < cost(name, None):
                steps.append((rank + 1, float(importance[name][rank])))
            for new, gain in steps:
                extra = cost(name, new) - cost(name, rank)
                if spent + extra <= budget and (best is None or gain / extra > best[0]):
                    best = (gain / extra, name, new, extra)
        if best is None:
            return ranks
        _, name, ranks[name], extra = best
        spent += extra


@dataclass
class Sample:
    """What the sample of training batches showed: moments of each feature's embedding vector,
    of the logit's gradient with respect to it, and of each target Linear layer's outputs."""

    features: dict[str, Moments]
    gradients: dict[str, Moments]
    layers: dict[str, Moments]


def collect_moments(network: CTRNetwork, loader: BatchLoader, linears: Mapping[str, nn.Linear], batches: int) -> Sample:
    """Moments over the first `batches` batches of `loader`, with the network in eval mode (as
    it will be served)."""
    slices = network.embedding.feature_slices()
    sample = Sample(
        features={name: Moments(s.stop - s.start) for name, s in slices.items()},
        gradients={name: Moments(s.stop - s.start) for name, s in slices.items()},
        layers={name: Moments(layer.out_features) for name, layer in linears.items()},
    )
    hooks = [
        layer.register_forward_hook(lambda m, i, output, name=name: sample.layers[name].add(output))
        for name, layer in linears.items()
    ]
    network.eval()
    try:
        for batch in itertools.islice(loader.batches(), batches):
            with torch.no_grad():
                embedded = network.embedding(batch)
            embedded.requires_grad_()
            (gradient,) = torch.autograd.grad(network.model(embedded, batch.dense).sum(), embedded)
            for name, columns in slices.items():
                sample.features[name].add(embedded[:, columns])
                sample.gradients[name].add(gradient[:, columns])
    finally:
        for hook in hooks:
            hook.remove()
    return sample


def compress_network(
    network: CTRNetwork, loader: BatchLoader, *, ratio: float, batches: int, keep: Sequence[str] = ()
) -> dict[str, Any]:
    """Replace the network's embedding table and its model's Linear layers (except those under a
    prefix in `keep`, and those no rank fits) by low-rank ones, in place; returns the run.json record."""
    regions = feature_regions(network.embedding)  # refuses shared tables before any work
    linears = {
        f"model.{name}": module
        for name, module in network.model.named_modules()
        if isinstance(module, nn.Linear) and not _under(f"model.{name}", keep)
    }
    ranks = {name: rank for name, layer in linears.items() if (rank := linear_rank(layer, ratio)) >= 1}
    targets = {name: linears[name] for name in ranks}
    sample = collect_moments(network, loader, targets, batches)

    fits = {name: weighted_pca(sample.features[name], sample.gradients[name]) for name in sample.features}
    table_floats = sum(region.size * region.width for region in regions)
    widths = table_ranks(
        {r.feature: r.size for r in regions}, {n: fit[1] for n, fit in fits.items()}, table_floats / ratio
    )
    bytes_before = network.embedding.num_bytes()
    pca = {name: None if rank is None else (fits[name][0], fits[name][3][:, :rank]) for name, rank in widths.items()}
    network.embedding = LowRankTableEmbedding.from_pca(network.embedding, pca)
    record: dict[str, Any] = {
        "ratio": ratio,
        "sample_batches": batches,
        "sample_examples": next(iter(sample.features.values())).count,
        "embedding": {
            "ranks": widths,
            "variance_kept": {name: _kept(fits[name][2], rank) for name, rank in widths.items()},
            "bytes_before": bytes_before,
            "bytes_after": network.embedding.num_bytes(),
        },
        "layers": {},
    }
    for name, layer in targets.items():
        mean, variances, directions = sample.layers[name].pca()
        factorised = FactorisedLinear.from_pca(layer, mean, directions[:, : ranks[name]])
        replace_module(network, name, factorised)
        record["layers"][name] = {
            "rank": ranks[name],
            "variance_kept": _kept(variances, ranks[name]),
            "bytes_before": FLOAT_BYTES * sum(p.numel() for p in layer.parameters()),
            "bytes_after": FLOAT_BYTES * sum(p.numel() for p in factorised.parameters()),
        }
    return record


def _under(name: str, prefixes: Sequence[str]) -> bool:
    """Whether the dotted module name is, or is inside, one of `prefixes`."""
    return any(name == prefix or name.startswith(prefix.rstrip(".") + ".") for prefix in prefixes)


def _kept(variances: Tensor, rank: int | None) -> float:
    """Share of the output variance the rank keeps (all of it for a feature kept whole)."""
    total = float(variances.sum())
    return 1.0 if rank is None or total == 0 else float(variances[:rank].sum()) / total


def finetune(
    network: CTRNetwork, config: TrainConfig, prepared: Prepared, epochs: int, *, progress: bool = False
) -> list[dict[str, float]]:
    """Train the compressed network as the run was trained (optimizer, lr, weight decay, batch
    size), at most `epochs` epochs, keeping the weights of the best validation AUC (epoch 0: as
    compressed) and stopping after `config.patience` epochs without improvement."""
    torch.manual_seed(config.seed)
    train_loader = BatchLoader(prepared.data, prepared.split.train, config.batch_size, shuffle=True, seed=config.seed)
    valid_loader = BatchLoader(prepared.data, prepared.split.valid, 8192)
    optimizers = Optimizers(network, config.optimizer, config.lr, embedding_weight_decay=config.embedding_weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    metrics = evaluate(network, valid_loader)
    history = [{"epoch": 0, "val_auc": metrics["auc"], "val_logloss": metrics["logloss"]}]
    best_auc, best_state, bad_epochs = metrics["auc"], _copy(network), 0
    network.train()
    for epoch in range(1, epochs + 1):
        for batch in train_loader.batches(epoch, prefetch=2):
            loss = loss_fn(network(batch), batch.labels)
            optimizers.zero_grad()
            loss.backward()
            optimizers.step()
        metrics = evaluate(network, valid_loader)
        history.append({"epoch": epoch, "val_auc": metrics["auc"], "val_logloss": metrics["logloss"]})
        if progress:
            print(f"fine-tune epoch {epoch}: val AUC {metrics['auc']:.4f}  log loss {metrics['logloss']:.4f}")
        if metrics["auc"] > best_auc:
            best_auc, best_state, bad_epochs = metrics["auc"], _copy(network), 0
        else:
            bad_epochs += 1
            if bad_epochs > config.patience:
                break
    network.load_state_dict(best_state)
    return history


def _copy(network: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in network.state_dict().items()}


def compress_run(
    run_file: str | Path,
    output: str | Path,
    *,
    ratio: float,
    finetune_epochs: int = 0,
    sample_batches: int = DEFAULT_SAMPLE_BATCHES,
    keep: Sequence[str] = (),
    progress: bool = False,
) -> dict[str, Any]:
    """Compress a trained run into a new run (run.json at `output`, its model file beside it)."""
    if not ratio > 1:
        raise ValueError(
            f"--ratio must be greater than 1 (the compressed layers keep 1/ratio of their size), got {ratio}"
        )
    if finetune_epochs < 0 or sample_batches < 1:
        raise ValueError("--finetune-epochs must be >= 0 and --sample-batches >= 1")
    run_file, output = Path(run_file), Path(output)
    if output.resolve() == run_file.resolve():
        raise ValueError("--output must differ from --run: the trained run is kept")
    run, config, prepared, network = load_run(run_file)
    if "compression" in run:
        raise ValueError(
            f"{run_file} is already compressed; compress the run it came from ({run['compression']['source']})"
        )
    started = time.perf_counter()
    loader = BatchLoader(prepared.data, prepared.split.train, config.batch_size, shuffle=True, seed=config.seed)
    compression = compress_network(network, loader, ratio=ratio, batches=sample_batches, keep=keep)
    compression["keep"] = list(keep)
    splits = {"val": prepared.split.valid, "test": prepared.split.test}
    scores = {split: evaluate(network, BatchLoader(prepared.data, rows, 8192)) for split, rows in splits.items()}
    compression["before_finetune"] = {f"{split}_auc": s["auc"] for split, s in scores.items()}
    if finetune_epochs:
        history = finetune(network, config, prepared, finetune_epochs, progress=progress)
        best = max(history, key=lambda h: h["val_auc"])
        compression["finetune"] = {"max_epochs": finetune_epochs, "best_epoch": best["epoch"], "history": history}
        scores = {split: evaluate(network, BatchLoader(prepared.data, rows, 8192)) for split, rows in splits.items()}
    compression.update(source=str(run_file), seconds=time.perf_counter() - started)
    compression["source_scores"] = {"val_auc": run["val_auc"], "test_auc": run["test_auc"]}
    record = {
        **run,
        "num_embedding_params": network.embedding.num_parameters(),
        "num_embedding_bytes": network.embedding.num_bytes(),
        "num_params": sum(p.numel() for p in network.parameters()),
        "val_auc": scores["val"]["auc"],
        "val_logloss": scores["val"]["logloss"],
        "test_auc": scores["test"]["auc"],
        "test_logloss": scores["test"]["logloss"],
        "compression": compression,
    }
    save_atomic({"config": asdict(config), "model": network.state_dict()}, output.with_suffix(".pt"))
    write_text_atomic(json.dumps(record, indent=2) + "\n", output)
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a training run's run.json (its model file run.pt beside it)")
    parser.add_argument(
        "--ratio", type=float, required=True, help="each compressed layer keeps at most 1/RATIO of its size"
    )
    parser.add_argument(
        "--finetune-epochs", type=int, default=0, help="fine-tune at most E epochs, early-stopped on val AUC"
    )
    parser.add_argument(
        "--sample-batches", type=int, default=DEFAULT_SAMPLE_BATCHES, help="training batches whose outputs the PCA sees"
    )
    parser.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="PREFIX",
        help="leave the layers inside module PREFIX (e.g. model.cross) as they are",
    )
    parser.add_argument("--output", required=True, help="run.json of the compressed run; its model file sits beside it")
    parser.add_argument("--quiet", action="store_true", help="no fine-tuning progress lines")


def run(args: argparse.Namespace) -> int:
    record = compress_run(
        args.run, args.output, ratio=args.ratio, finetune_epochs=args.finetune_epochs,
        sample_batches=args.sample_batches, keep=args.keep, progress=not args.quiet,
    )  # fmt: skip
    compression = record["compression"]
    layers = {"embedding": compression["embedding"], **compression["layers"]}
    summary = {
        "source_test_auc": compression["source_scores"]["test_auc"],
        "test_auc_before_finetune": compression["before_finetune"]["test_auc"],
        "test_auc": record["test_auc"],
        "bytes_before": sum(layer["bytes_before"] for layer in layers.values()),
        "bytes_after": sum(layer["bytes_after"] for layer in layers.values()),
        "ranks": {name: layer.get("rank", layer.get("ranks")) for name, layer in layers.items()},
    }
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.output}")
    return 0
