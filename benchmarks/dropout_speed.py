"""Dropout on CPU: torch's `nn.Dropout` against `CounterDropout`, alone and inside a DCNv2 step.

1. The layer alone: forward and backward of one [batch, 400] activation (the width of the
   models' hidden layers), p = 0.3 (the models' default).
2. A whole training step of DCNv2 (three 400-wide hidden layers, each followed by dropout) on
   Criteo-shaped batches (criteo_shape.py; speed only), `unified` embedding with 2^18 rows,
   dense Adam: two networks built from one random state, identical but for the dropout
   layers, timed in interleaved blocks of steps.
3. Training on real MovieLens-100K with the trainer's defaults (`unified`, 0.25x, DCNv2,
   batch 1,024) for a fixed number of epochs, the models built with either dropout: the
   training seconds of `ue train`, interleaved runs.

    python benchmarks/dropout_speed.py [--reps 7] [--steps 10] [--epochs 3] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from unittest import mock

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from criteo_shape import criteo_batch, criteo_features
from train_speed import interleaved_samples, train_steps

from unified_embedding.embeddings import UnifiedEmbedding
from unified_embedding.models import layers
from unified_embedding.models.dropout import CounterDropout
from unified_embedding.models.layers import DEFAULT_DROPOUT
from unified_embedding.network import CTRNetwork
from unified_embedding.train import Optimizers, TrainConfig, Trainer

WIDTH = 400
BATCHES = (1024, 4096)
RESULTS = Path(__file__).parent / "results" / "dropout_speed.json"
Built = TypeVar("Built")


def interleaved_medians(timed: dict[str, Callable[[], float]], reps: int) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in interleaved_samples(timed, reps).items()}


def layer_seconds(layer: nn.Module, x: torch.Tensor, calls: int = 20) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            layer(x).sum().backward()
        return (time.perf_counter() - start) / calls

    return run


def step_seconds(network: CTRNetwork, batches: list) -> Callable[[], float]:
    optimizers = Optimizers(network, "adam", None)
    return lambda: train_steps(network, optimizers, batches) / len(batches)


def built_with(dropout_class: type[nn.Module], build: Callable[[], Built]) -> Built:
    """`build()` with the models' dropout layers of `dropout_class`, from the same random state."""
    torch.manual_seed(0)
    with mock.patch.object(layers, "CounterDropout", dropout_class):
        return build()


def training_seconds(data_dir: str, epochs: int, dropout_class: type[nn.Module]) -> Callable[[], float]:
    config = TrainConfig("movielens-100k", budget="0.25x", epochs=epochs, patience=epochs, data_dir=data_dir)

    def run() -> float:
        return built_with(dropout_class, lambda: Trainer(config, progress=False).run())["train_seconds"]

    return run


def show(part: str, times: dict[str, float], unit: float) -> None:
    print(f"{part:<34}{times['torch'] * unit:>12.2f}{times['counter'] * unit:>16.2f}"
          f"{times['torch'] / times['counter']:>8.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed block")
    parser.add_argument("--epochs", type=int, default=3, help="MovieLens-100K epochs per timed run")
    parser.add_argument("--data-dir", default=str(Path(__file__).parents[2] / "shared" / "datasets"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__, "p": DEFAULT_DROPOUT}

    print(f"{torch.get_num_threads()} threads, p = {DEFAULT_DROPOUT}; medians of interleaved rounds, ms unless marked")
    print(f"{'part':<34}{'nn.Dropout':>12}{'CounterDropout':>16}{'speedup':>9}")
    rng = np.random.default_rng(0)
    features = criteo_features()
    for batch_size in BATCHES:
        x = torch.randn(batch_size, WIDTH, requires_grad=True)
        layer = interleaved_medians(
            {
                "torch": layer_seconds(nn.Dropout(DEFAULT_DROPOUT), x),
                "counter": layer_seconds(CounterDropout(DEFAULT_DROPOUT), x),
            },
            args.reps,
        )
        batches = [criteo_batch(batch_size, rng) for _ in range(args.steps)]
        networks = {
            name: built_with(cls, lambda: CTRNetwork.build(UnifiedEmbedding(features, num_rows=2**18), "dcnv2"))
            for name, cls in (("torch", nn.Dropout), ("counter", CounterDropout))
        }
        step = interleaved_medians(
            {name: step_seconds(network, batches) for name, network in networks.items()},
            args.reps,
        )
        show(f"layer fwd+bwd [{batch_size}, {WIDTH}]", layer, 1e3)
        show(f"DCNv2 step, batch {batch_size}", step, 1e3)
        results[str(batch_size)] = {"layer_seconds": layer, "step_seconds": step}
    movielens = interleaved_medians(
        {
            "torch": training_seconds(args.data_dir, args.epochs, nn.Dropout),
            "counter": training_seconds(args.data_dir, args.epochs, CounterDropout),
        },
        max(1, args.reps // 2),
    )
    show(f"MovieLens-100K, {args.epochs} epochs (s)", movielens, 1.0)
    results["movielens_100k_train_seconds"] = movielens

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
