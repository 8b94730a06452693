"""Reader throughput: parsing the Criteo TSV into model-ready columns, against `pandas.read_csv`.

The file is the bundled real Criteo Kaggle rows repeated to about `--mb` megabytes. Our reader
(the C fast path on a thread per core, falling back to pyarrow for any block it declines;
dense log1p and categorical hashing to int64 included) produces what training consumes;
pandas only parses into strings and floats, so the comparison flatters pandas. Each reader
runs in a fresh process, so its peak RSS is its own; throughput is the best of `--reps` runs,
interleaved.

    python benchmarks/read_speed.py [--mb 500] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import pandas
from embedding_speed import high_water_rss

from unified_embedding.data.badrows import BadRowPolicy
from unified_embedding.data.registry import DATASETS

RESULTS = Path(__file__).parent / "results" / "read_speed.json"
SAMPLE = "criteo/criteo_kaggle_sample.tsv"


def make_file(source: Path, target: Path, megabytes: int) -> int:
    """`source` repeated until `target` holds at least `megabytes` MB; returns its row count."""
    text = source.read_bytes()
    if not text.endswith(b"\n"):
        text += b"\n"
    copies = max(1, -(-megabytes * 10**6 // len(text)))
    with target.open("wb") as out:
        for _ in range(copies):
            out.write(text)
    return copies * text.count(b"\n")


def read_ours(path: Path) -> int:
    rows = 0
    for chunk in DATASETS["criteo"].reader.read([path], BadRowPolicy("raise")):
        rows += chunk.num_rows
    return rows


def read_pandas(path: Path) -> int:
    return len(pandas.read_csv(path, sep="\t", header=None))


def run_one(reader: str, path: Path) -> None:
    """Subprocess mode: time one read (imports done first), print seconds, rows and peak RSS as JSON."""
    start = time.perf_counter()
    rows = {"ours": read_ours, "pandas": read_pandas}[reader](path)
    print(json.dumps({"seconds": time.perf_counter() - start, "rows": rows, "peak_rss_bytes": high_water_rss()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).parents[2] / "shared" / "datasets")
    parser.add_argument("--one", nargs=2, metavar=("READER", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one[0], Path(args.one[1]))
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.txt"
        rows = make_file(args.data_dir / SAMPLE, path, args.mb)
        size = path.stat().st_size
        print(f"{path.name}: {size / 1e6:,.0f} MB, {rows:,} rows (real Criteo rows, repeated)")
        results: dict[str, dict] = {}
        for _ in range(args.reps):  # interleaved, fresh process each
            for reader in ("ours", "pandas"):
                command = [sys.executable, __file__, "--one", reader, str(path)]
                run = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                if run["rows"] != rows:
                    raise RuntimeError(f"{reader} read {run['rows']:,} rows, the file has {rows:,}")
                best = results.get(reader)
                if best is None or run["seconds"] < best["seconds"]:
                    results[reader] = run
    print(f"{'reader':<8}{'seconds':>9}{'MB/s':>8}{'rows/s':>12}{'peak RSS MiB':>14}{'vs pandas':>11}")
    for reader, run in results.items():
        run.update(mb_per_s=size / 1e6 / run["seconds"], rows_per_s=rows / run["seconds"],
                   speedup_vs_pandas=results["pandas"]["seconds"] / run["seconds"])  # fmt: skip
        print(f"{reader:<8}{run['seconds']:>9.2f}{run['mb_per_s']:>8.0f}{run['rows_per_s']:>12,.0f}"
              f"{run['peak_rss_bytes'] / 2**20:>14,.0f}{run['speedup_vs_pandas']:>10.2f}x")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"file_bytes": size, "rows": rows, "readers": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
