"""End-to-end DCNv2 training speed: our fast path against the same model built the usual way.

The usual way (what a PyTorch user writes first): one `nn.EmbeddingBag` per feature and
`torch.optim.Adam` over everything (`usual_adam`), or the same tables with sparse gradients
and `torch.optim.SparseAdam` (`usual_sparse_adam`, the usual way for big tables). Ours:
`unified` with the fused row update (`--fused`), and `full` with it (the usual model's
exact tables, updated the fast way). `unified` with dense Adam separates what hashing into
one table costs in AUC from what the fused update costs.

1. Criteo-shaped data (speed only, synthetic ids; criteo_shape.py): 26 features with the
   real Criteo Kaggle cardinalities, each feature's table capped at 2^20 rows by taking ids
   modulo the cap (DLRM's `--max-ind-range`), 16 floats per feature; `unified` gets the
   same number of parameters. Examples/s over interleaved blocks of steps.
2. Real MovieLens-100K: each system trained with the library's trainer (early stopping on
   validation AUC, test scored once) over several seeds, so the AUCs show whether the fast
   path learns as good a model.

    python benchmarks/train_speed.py [--batch 4096] [--steps 20] [--reps 5] [--seeds 0,1,2]
                                     [--parts criteo,movielens]

A run of some parts replaces those parts in the JSON and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Self

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from criteo_shape import CRITEO_CARDINALITIES, criteo_batch, criteo_features
from embedding_speed import high_water_rss

from unified_embedding.batch import Batch
from unified_embedding.embeddings import UnifiedEmbedding
from unified_embedding.embeddings.base import EmbeddingMethod, Vocabularies, as_tensor, register
from unified_embedding.features import FeatureSet, Pooling
from unified_embedding.network import CTRNetwork
from unified_embedding.train import Optimizers, TrainConfig, Trainer

DIM = 16
CAP = 2**20
RESULTS = Path(__file__).parent / "results" / "train_speed.json"


@register
class PerFeatureBags(EmbeddingMethod):
    """The usual model: one `nn.EmbeddingBag` per feature (registered here only, for this benchmark).

    With vocabularies, ids map to their vocabulary index (unknown ids to a last row); without,
    to `id % rows` (the hashing trick of DLRM's `--max-ind-range`).
    """

    name = "usual_bags"
    description = "one nn.EmbeddingBag per feature (benchmark baseline)"

    def __init__(self, features: FeatureSet, rows: dict[str, int], vocabularies: Vocabularies | None,
                 sparse: bool = False) -> None:  # fmt: skip
        super().__init__(features)
        self.sparse = sparse
        self.bags = nn.ModuleDict({
            f.name: nn.EmbeddingBag(rows[f.name], DIM, mode="mean" if f.pooling is Pooling.MEAN else "sum", sparse=sparse)
            for f in features.sparse
        })  # fmt: skip
        for bag in self.bags.values():
            nn.init.uniform_(bag.weight, -0.05, 0.05)
        self.vocabularies = {k: torch.unique(as_tensor(v)) for k, v in (vocabularies or {}).items()}

    @property
    def out_dims(self) -> dict[str, int]:
        return {f.name: DIM for f in self.features.sparse}

    def forward(self, batch: Batch) -> Tensor:
        offsets = batch.feature_offsets()
        outputs = []
        for i, name in enumerate(batch.keys):
            ids = batch.values[offsets[i, 0] : offsets[i, -1]]
            rows = self.bags[name].num_embeddings
            if name in self.vocabularies:
                vocabulary = self.vocabularies[name]
                position = torch.searchsorted(vocabulary, ids).clamp_(max=vocabulary.numel() - 1)
                index = torch.where(vocabulary[position] == ids, position, rows - 1)
            else:
                index = ids % rows
            outputs.append(self.bags[name](index, offsets[i, :-1] - offsets[i, 0]))
        return torch.cat(outputs, 1)

    @classmethod
    def from_budget(cls, features: FeatureSet, budget: int, *, vocabularies: Vocabularies | None = None,
                    sparse: bool = False) -> Self:  # fmt: skip
        """Ignores the budget: the usual model is sized by its vocabularies (or the cap)."""
        if vocabularies is not None:
            rows = {name: len(np.unique(np.asarray(v))) + 1 for name, v in vocabularies.items()}
        else:
            rows = {f.name: min(f.cardinality, CAP) for f in features.sparse}
        return cls(features, rows, vocabularies, sparse=sparse)


def criteo_systems() -> dict[str, tuple[CTRNetwork, Optimizers]]:
    features = criteo_features()
    usual = PerFeatureBags.from_budget(features, 1)
    params = usual.num_parameters()
    torch.manual_seed(0)
    systems = {}
    for name, embedding, fused in (
        ("usual_adam", usual, False),
        ("usual_sparse_adam", PerFeatureBags.from_budget(features, 1, sparse=True), False),
        ("unified_fused", UnifiedEmbedding.from_budget(features, params), True),
        ("unified_dense_adam", UnifiedEmbedding.from_budget(features, params), False),
    ):
        network = CTRNetwork.build(embedding, "dcnv2")
        systems[name] = (network, Optimizers(network, "adam", None, fused=fused))
    return systems


def train_steps(network: CTRNetwork, optimizers: Optimizers, batches: list[Batch]) -> float:
    """Seconds to train on `batches`, one step each."""
    loss_fn = nn.BCEWithLogitsLoss()
    start = time.perf_counter()
    for batch in batches:
        optimizers.zero_grad()
        loss_fn(network(batch), batch.labels).backward()
        optimizers.step()
    return time.perf_counter() - start


def interleaved_samples(timed: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Seconds of each callable over `reps` rounds that take each in turn, after one warm-up round."""
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for rep in range(reps + 1):
        for name, run in timed.items():
            seconds = run()
            if rep:
                samples[name].append(seconds)
    return samples


def criteo_speed(batch_size: int, steps: int, reps: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    batches = [criteo_batch(batch_size, rng) for _ in range(steps)]
    systems = criteo_systems()
    seconds = interleaved_samples(
        {name: partial(train_steps, network, optimizers, batches) for name, (network, optimizers) in systems.items()},
        reps,
    )
    usual = statistics.median(seconds["usual_adam"])
    results = {}
    for name, samples in seconds.items():
        median = statistics.median(samples)
        results[name] = {
            "examples_per_s": batch_size * steps / median,
            "spread": (max(samples) - min(samples)) / median,
            "speedup_vs_usual_adam": usual / median,
            "embedding_params": systems[name][0].embedding.num_parameters(),
        }
    return results


QUALITY_KEYS = ("val_auc", "test_auc", "test_logloss", "best_epoch", "examples_per_second")


def movielens_quality(data_dir: str, batch_size: int, seeds: list[int]) -> dict[str, dict]:
    """Each system trained to early stopping on MovieLens-100K per seed; per-seed figures, mean and sd."""
    systems = {
        "usual_adam": {"method": "usual_bags"},
        "full_fused": {"method": "full", "fused": True},
        "unified_fused_1x": {"method": "unified", "fused": True},
        "unified_dense_adam_1x": {"method": "unified"},
    }
    results = {}
    for name, options in systems.items():
        runs = [
            Trainer(TrainConfig("movielens-100k", data_dir=data_dir, batch_size=batch_size, seed=seed, **options),
                    progress=False).run()
            for seed in seeds
        ]  # fmt: skip
        results[name] = {
            "num_embedding_params": runs[0]["num_embedding_params"],
            "seeds": {seed: {key: run[key] for key in QUALITY_KEYS} for seed, run in zip(seeds, runs, strict=True)},
            "mean": {key: statistics.fmean(run[key] for run in runs) for key in QUALITY_KEYS},
            "sd": {key: statistics.stdev(run[key] for run in runs) if len(runs) > 1 else 0.0 for key in QUALITY_KEYS},
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--reps", type=int, default=5, help="timed blocks per system, interleaved")
    parser.add_argument("--seeds", default="0,1,2", help="MovieLens-100K seeds, comma-separated")
    parser.add_argument("--parts", default="criteo,movielens", help="which of criteo,movielens to run")
    parser.add_argument("--data-dir", default=str(Path(__file__).parents[2] / "shared" / "datasets"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts or not parts <= {"criteo", "movielens"}:
        parser.error(f"--parts takes criteo and/or movielens, got {args.parts!r}")
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.update(threads=torch.get_num_threads(), torch=torch.__version__)

    if "criteo" in parts:
        print(f"Criteo-shaped DCNv2, batch {args.batch}, {torch.get_num_threads()} threads, "
              f"{len(CRITEO_CARDINALITIES)} features capped at {CAP:,} rows x {DIM}")  # fmt: skip
        criteo = criteo_speed(args.batch, args.steps, args.reps)
        print(f"{'system':<20}{'examples/s':>12}{'spread':>9}{'vs usual_adam':>15}{'embedding params':>18}")
        for name, row in criteo.items():
            print(f"{name:<20}{row['examples_per_s']:>12,.0f}{row['spread']:>8.0%}"
                  f"{row['speedup_vs_usual_adam']:>14.2f}x{row['embedding_params']:>18,}")  # fmt: skip
        peak = high_water_rss()
        print(f"peak RSS of this process so far: {peak / 2**30:.2f} GiB")
        results.update(batch=args.batch, criteo_shaped=criteo, criteo_peak_rss_bytes=peak)

    if "movielens" in parts:
        seeds = [int(seed) for seed in args.seeds.split(",")]
        print(f"\nMovieLens-100K, DCNv2, batch 1024, early stopping on validation AUC, seeds {seeds}: mean (sd)")
        movielens = movielens_quality(args.data_dir, 1024, seeds)
        print(f"{'system':<20}{'val AUC':>18}{'test AUC':>18}{'log loss':>18}{'epochs':>8}{'examples/s':>12}")
        for name, row in movielens.items():
            mean, sd = row["mean"], row["sd"]
            cells = "".join(f"{mean[key]:>9.4f} ({sd[key]:.4f})" for key in ("val_auc", "test_auc", "test_logloss"))
            print(f"{name:<20}{cells}{mean['best_epoch']:>8.1f}{mean['examples_per_second']:>12,.0f}")
        results["movielens_100k"] = movielens

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
