"""Quality of embedding methods on the bundled real datasets: test AUC / log loss per run.

Each (dataset, method, budget, seed) is one `ue train` run with default settings (early
stopping on validation AUC; the test split scored once). Prints a Markdown table with the
mean and standard error over seeds and writes every run's figures to a JSON file.

    python benchmarks/quality.py --datasets movielens-100k,frappe --methods full,unified,hashing \
        --budgets 0.25x --seeds 0 --output benchmarks/results/quality.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from unified_embedding.provenance import versions
from unified_embedding.train import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="movielens-100k,frappe")
    parser.add_argument("--methods", default="full,unified,hashing")
    parser.add_argument("--budgets", default="0.25x")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--model", default="dcnv2")
    parser.add_argument("--data-dir")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--output", default="benchmarks/results/quality.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = []
    started = time.time()
    for dataset in args.datasets.split(","):
        for budget in args.budgets.split(","):
            for method in args.methods.split(","):
                for seed in map(int, args.seeds.split(",")):
                    config = TrainConfig(dataset=dataset, method=method, model=args.model, budget=budget,
                                         seed=seed, data_dir=args.data_dir)  # fmt: skip
                    result = Trainer(config, progress=False).run()
                    keep = ("dataset", "method", "budget", "seed", "num_embedding_params", "full_embedding_params",
                            "val_auc", "test_auc", "test_logloss", "best_epoch", "train_seconds",
                            "examples_per_second")  # fmt: skip
                    runs.append({k: result[k] for k in keep} | {"budget_spec": budget})
                    print(f"{dataset} {method} {budget} seed {seed}: test AUC {result['test_auc']:.4f} "
                          f"({result['train_seconds']:.0f} s)", flush=True)  # fmt: skip
    print(f"\n{len(runs)} runs in {time.time() - started:.0f} s\n")
    print(table(runs))
    write_runs(args, runs)


def write_runs(args: argparse.Namespace, runs: list[dict]) -> None:
    """The runs, the arguments and the versions they ran under, as JSON at `args.output`."""
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "versions": versions(), "runs": runs}, indent=2) + "\n")
    print(f"\nwrote {out}")


def table(runs: list[dict]) -> str:
    """Mean +- standard error over seeds per (dataset, budget, method)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["budget_spec"], run["method"]), []).append(run)
    lines = ["| dataset | budget | method | params | seeds | test AUC | test log loss | train s |", "|" + "---|" * 8]
    for (dataset, budget, method), group in groups.items():
        lines.append(
            f"| {dataset} | {budget} | {method} | {group[0]['num_embedding_params']:,} | {len(group)} | "
            f"{mean_se([r['test_auc'] for r in group])} | {mean_se([r['test_logloss'] for r in group])} | "
            f"{statistics.mean(r['train_seconds'] for r in group):.0f} |"
        )
    return "\n".join(lines)


def mean_se(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) / len(values) ** 0.5:.4f}"


if __name__ == "__main__":
    main()
