"""Streaming memory: `ue stream`'s loop over a Criteo-shaped stream of 50 M examples, with
resident memory reported every 5 M (it must stay flat: the stream is far longer than memory).

Synthetic, because only memory and time are measured (never a quality claim): 26 categorical
features with the Criteo Kaggle cardinalities and 13 dense features (criteo_shape.py), ids
drawn from a continuous power law (rank = floor(u^(-1/0.05)), Zipf-like with exponent 1.05
and so fast enough to make 1.3 G ids; numpy's exact `zipf` takes ~0.7 us per id here), so
new ids keep arriving for the whole stream. Each window is generated when the loop asks for
it, from a generator seeded by the window's number, so the stream exists nowhere at once.
What stays bounded by design: the unified table (fixed size), the seen-id Bloom filters (2^30 bits, 128 MiB, each here),
the score histograms; what grows is one small record per window.

    python benchmarks/stream_memory.py [--examples 50000000] [--window 100000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from criteo_shape import CRITEO_CARDINALITIES, NUM_DENSE, criteo_features

from unified_embedding.data import CTRData
from unified_embedding.embeddings import build_embedding
from unified_embedding.network import CTRNetwork
from unified_embedding.stream import Stream, StreamConfig, StreamRunner, Window
from unified_embedding.stream.runner import current_rss_mib
from unified_embedding.train import TrainConfig

RESULTS = Path(__file__).parent / "results" / "stream_memory.json"
#: 2^20 rows x 16 floats: a 64 MiB table, sized so that the run measures the loop, not the table
BUDGET = 2**20 * 16
POWER = 1 / 0.05


def synthetic_window(index: int, rows: int, first_row: int) -> CTRData:
    rng = np.random.default_rng([7, index])
    features = criteo_features()
    categorical = {}
    for i, cardinality in enumerate(CRITEO_CARDINALITIES):
        rank = np.minimum(np.floor(rng.random(rows) ** -POWER), 2.0**62).astype(np.int64) - 1
        categorical[f"C{i + 1}"] = (rank * 2654435761 + i) % cardinality
    return CTRData(
        name="criteo-shaped-stream", features=features,
        labels=(rng.random(rows) < 0.25).astype(np.float32),
        dense=rng.lognormal(0, 1, (rows, NUM_DENSE)).astype(np.float32),
        categorical=categorical, multivalent={}, time=np.arange(first_row, first_row + rows, dtype=np.int64),
        bad_rows_skipped=0, sources=[],
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=50_000_000)
    parser.add_argument("--window", type=int, default=100_000)
    parser.add_argument("--report-every", type=int, default=5_000_000)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default="/tmp/stream_memory/stream.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    embedding = build_embedding("unified", criteo_features(), BUDGET)
    network = CTRNetwork.build(embedding, "mlp", hidden=[64])
    count = -(-args.examples // args.window)
    stream = Stream(
        network=network, count=count,
        window=lambda i: Window(synthetic_window(i, min(args.window, args.examples - i * args.window), i * args.window),
                                np.arange(min(args.window, args.examples - i * args.window)), i > 0),
        describe={"rows": args.examples, "warmup_rows": args.window, "budget": BUDGET},
    )  # fmt: skip
    config = StreamConfig(TrainConfig(dataset="criteo-shaped-stream", budget=str(BUDGET), batch_size=args.batch,
                                      fused=True), window=args.window, checkpoint_every=50, seen_bits_log2=30)  # fmt: skip
    Path(args.output).unlink(missing_ok=True)
    Path(args.output).with_suffix(".ckpt").unlink(missing_ok=True)
    rss_start = current_rss_mib()
    started = time.perf_counter()
    result = StreamRunner(config, args.output, progress=True).run(stream)
    wall = time.perf_counter() - started
    every = max(1, args.report_every // args.window)
    rows = []
    for record in result["windows"]:
        seen = (record["window"] + 1) * args.window
        if seen % (every * args.window) == 0 or record is result["windows"][-1]:
            rows.append({"examples": seen, "rss_mib": round(record["rss_mib"], 1), "seconds": round(record["seconds"], 1),
                         "window_auc": record["auc"], "new_share": record["new_examples"] / record["examples"]})  # fmt: skip
    print(f"{'examples':>12} {'RSS MiB':>9} {'seconds':>9} {'new-id share':>13}")
    for row in rows:
        print(f"{row['examples']:>12,} {row['rss_mib']:>9.1f} {row['seconds']:>9.1f} {row['new_share']:>13.3f}")
    growth = rows[-1]["rss_mib"] - rows[0]["rss_mib"]
    print(f"RSS before the stream {rss_start:.1f} MiB; from {rows[0]['examples']:,} to {rows[-1]['examples']:,} "
          f"examples it changed by {growth:+.1f} MiB; peak {result['peak_rss_mib']:.1f} MiB; "
          f"{args.examples / wall:,.0f} examples/s over {wall:,.0f} s ({args.threads} threads)")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "examples": args.examples, "window": args.window, "batch": args.batch, "threads": args.threads,
        "torch": torch.__version__, "embedding_params": embedding.num_parameters(), "rss_before_mib": rss_start,
        "rss_every_5m": rows, "rss_growth_mib": growth, "peak_rss_mib": result["peak_rss_mib"],
        "wall_seconds": wall, "examples_per_second": args.examples / wall,
        "note": "synthetic Criteo-shaped ids: memory and time only, AUC meaningless (random labels)",
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
