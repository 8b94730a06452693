"""Low-rank output compression (`ue compress`): quality, bytes and inference speed against the original.

For each pair (a trained run, the run `ue compress` made of it): test AUC of the original, of
the compressed network before fine-tuning (from its run.json) and of the compressed run as
saved, all as `ue evaluate` scores them; bytes of every compressed layer before and after,
and of the whole network; and inference examples/s of both networks on the same test
batches, in interleaved repetitions (original, compressed, original, ...), median reported.

    OMP_NUM_THREADS=1 python benchmarks/compress_speed.py --pair ORIGINAL.json COMPRESSED.json [--pair ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from unified_embedding.batch import Batch
from unified_embedding.data import BatchLoader
from unified_embedding.network import CTRNetwork
from unified_embedding.train import evaluate, load_run

RESULTS = Path(__file__).parent / "results" / "compress.json"


@torch.inference_mode()
def examples_per_second(network: CTRNetwork, batches: list[Batch]) -> float:
    started = time.perf_counter()
    for batch in batches:
        network(batch)
    return sum(b.batch_size for b in batches) / (time.perf_counter() - started)


def measure(original_file: Path, compressed_file: Path, batch_size: int, reps: int) -> dict[str, Any]:
    run, config, prepared, original = load_run(original_file)
    compressed_run, _, _, compressed = load_run(compressed_file)
    compression = compressed_run["compression"]
    if Path(compression["source"]).resolve() != original_file.resolve():
        raise ValueError(f"{compressed_file} was compressed from {compression['source']}, not {original_file}")
    loader = BatchLoader(prepared.data, prepared.split.test, batch_size)
    batches = list(loader.batches())
    networks = {"original": original.eval(), "compressed": compressed.eval()}
    speeds: dict[str, list[float]] = {name: [] for name in networks}
    for network in networks.values():  # warm-up pass, not timed
        examples_per_second(network, batches)
    for _ in range(reps):
        for name, network in networks.items():
            speeds[name].append(examples_per_second(network, batches))
    layers = {"embedding": compression["embedding"], **compression["layers"]}
    return {
        "dataset": config.dataset,
        "method": config.method,
        "model": config.model,
        "ratio": compression["ratio"],
        "auc": {
            "original": evaluate(original, loader)["auc"],
            "compressed_before_finetune": compression["before_finetune"]["test_auc"],
            "compressed": evaluate(compressed, loader)["auc"],
        },
        "finetune_best_epoch": compression.get("finetune", {}).get("best_epoch"),
        "layers": {
            name: {
                "rank": layer.get("rank", layer.get("ranks")),
                "bytes_before": layer["bytes_before"],
                "bytes_after": layer["bytes_after"],
            }
            for name, layer in layers.items()
        },
        "compressed_layers_bytes": {
            "before": sum(layer["bytes_before"] for layer in layers.values()),
            "after": sum(layer["bytes_after"] for layer in layers.values()),
        },
        "network_bytes": {name: 4 * sum(p.numel() for p in network.parameters()) for name, network in networks.items()},
        "examples_per_second": {name: statistics.median(values) for name, values in speeds.items()},
        "examples_per_second_all": speeds,
        "test_examples": len(prepared.split.test),
        "runs": {"original": str(original_file), "compressed": str(compressed_file)},
        "run_test_auc": {"original": run["test_auc"], "compressed": compressed_run["test_auc"]},
    }


def print_table(results: list[dict[str, Any]]) -> None:
    header = (
        f"{'dataset':<16} {'AUC before':>10} {'after PCA':>10} {'fine-tuned':>10} "
        f"{'bytes before':>13} {'bytes after':>12} {'ex/s before':>12} {'ex/s after':>11} {'speed-up':>8}"
    )
    print(header)
    for r in results:
        auc, size, speed = r["auc"], r["compressed_layers_bytes"], r["examples_per_second"]
        print(
            f"{r['dataset']:<16} {auc['original']:>10.4f} {auc['compressed_before_finetune']:>10.4f} "
            f"{auc['compressed']:>10.4f} {size['before']:>13,} {size['after']:>12,} {speed['original']:>12,.0f} "
            f"{speed['compressed']:>11,.0f} {speed['compressed'] / speed['original']:>7.2f}x"
        )
    for r in results:
        print(f"\n{r['dataset']}: bytes per compressed layer (rank)")
        for name, layer in r["layers"].items():
            print(f"  {name:<30} {layer['bytes_before']:>10,} -> {layer['bytes_after']:>9,}   {layer['rank']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar=("ORIGINAL", "COMPRESSED"))
    parser.add_argument("--batch", type=int, default=4096, help="inference batch size")
    parser.add_argument("--reps", type=int, default=7, help="timed passes over the test split per network")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = [measure(Path(original), Path(compressed), args.batch, args.reps) for original, compressed in args.pair]
    print_table(results)
    setup = {
        "batch": args.batch,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
