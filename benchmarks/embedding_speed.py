"""Embedding-layer speed: lookups/s of the forward, and of a whole training step, on a CPU.

Every system looks up the same 26 x batch ids in a table of the same bytes (2^22 x 64
float32 = 1 GiB by default) and, for a training step, runs forward + backward + an Adagrad
update:

- `unified`: `UnifiedEmbedding` (one probe of width 64 per feature, so the same lookups),
  from raw ids, hashing included, with the fused row update (`--fused`, fused.py);
- `eb_per_feature`: the usual model, one `nn.EmbeddingBag(sparse=True)` per feature (rows
  split evenly) + `torch.optim.Adagrad`;
- `eb_shared`: one bare `nn.EmbeddingBag(sparse=True)` call on the row indices `unified`
  computes, precomputed outside the timing + `torch.optim.Adagrad`;
- `torchrec`: TorchRec's `FusedEmbeddingBagCollection` (FBGEMM TBE, exact Adagrad fused in
  backward) on the same precomputed rows, when torchrec is installed;
- the row-wise Adagrad pair (`unified_rowwise`, `torchrec_rowwise`), whose state is 1/64 the size.

Repetitions are interleaved (one forward, then later one step, of each system in turn), so
drift and noise hit every system alike; the table reports the median and the interquartile
range, and ratios to `eb_shared` from this one run. Peak RSS is measured per system in a fresh subprocess. The
memory-bandwidth floor is the bytes a step must move over this machine's measured copy
bandwidth.

    python benchmarks/embedding_speed.py [--rows 4194304] [--batch 4096] [--reps 15]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from criteo_shape import CRITEO_CARDINALITIES, criteo_batch

from unified_embedding.batch import Batch
from unified_embedding.embeddings import UnifiedEmbedding
from unified_embedding.features import FeatureSet, FeatureSpec

DIM = 64
LR = 0.01
RESULTS = Path(__file__).parent / "results" / "embedding_speed.json"


class System:
    """One way to look the batch up: `forward()` (no grad) and `train_step()`, plus its bytes."""

    def __init__(self, forward: Callable[[], torch.Tensor], step: Callable[[], None], bytes_: int) -> None:
        self.forward, self.train_step, self.bytes = forward, step, bytes_


def _unified(batch: Batch, rows: int, optimizer: str) -> tuple[System, torch.Tensor]:
    features = FeatureSet([FeatureSpec(name) for name in batch.keys])
    embedding = UnifiedEmbedding(features, rows, chunk_dim=DIM, probes=1)
    state = embedding.fuse_optimizer(optimizer, LR)[0]
    grad = torch.randn(batch.batch_size, embedding.output_dim)

    def step() -> None:
        embedding(batch).backward(grad)

    with torch.no_grad():
        precomputed = embedding.slot_rows(batch)[0]
    return System(lambda: embedding(batch), step, _bytes(embedding.weight) + state.state_bytes()), precomputed


def _torch_bags(tables: list[nn.EmbeddingBag], indices: list[torch.Tensor], batch_size: int) -> System:
    """`len(indices)` lookups per example; table i % len(tables) serves index list i."""
    optimizer = torch.optim.Adagrad([t.weight for t in tables], lr=LR)
    grad = torch.randn(batch_size, DIM * len(indices))
    if len(tables) == 1:  # the bare call: one embedding_bag over every lookup, examples' rows side by side
        ids = torch.stack(indices, 1).reshape(-1)
        offsets = torch.arange(ids.numel())

        def forward() -> torch.Tensor:
            return tables[0](ids, offsets).view(batch_size, -1)
    else:
        offsets = torch.arange(batch_size)

        def forward() -> torch.Tensor:
            return torch.cat([tables[i](ids, offsets) for i, ids in enumerate(indices)], 1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward().backward(grad)
        optimizer.step()

    # Adagrad's state_sum is allocated at construction: a table-sized tensor per table.
    return System(forward, step, sum(2 * _bytes(t.weight) for t in tables))


def _eb_per_feature(batch: Batch, rows: int) -> System:
    per_table = rows // len(batch.keys)
    tables = [nn.EmbeddingBag(per_table, DIM, mode="sum", sparse=True) for _ in batch.keys]
    return _torch_bags(tables, [batch.ids(name) % per_table for name in batch.keys], batch.batch_size)


def _eb_shared(precomputed: torch.Tensor, rows: int, batch_size: int) -> System:
    table = nn.EmbeddingBag(rows, DIM, mode="sum", sparse=True)
    return _torch_bags([table], list(precomputed.view(-1, batch_size)), batch_size)


def _torchrec(precomputed: torch.Tensor, rows: int, batch: Batch, optimizer: str) -> System:
    import torchrec.optim as trec_optim
    from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

    kind = {"adagrad": torch.optim.Adagrad, "rowwise_adagrad": trec_optim.RowWiseAdagrad}[optimizer]
    config = EmbeddingBagConfig(name="table", embedding_dim=DIM, num_embeddings=rows, feature_names=list(batch.keys))
    collection = FusedEmbeddingBagCollection(
        tables=[config], optimizer_type=kind, optimizer_kwargs={"lr": LR}, device=torch.device("cpu")
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(batch.keys), values=precomputed, lengths=torch.ones(precomputed.numel(), dtype=torch.int32)
    )
    grad = torch.randn(batch.batch_size, DIM * len(batch.keys))

    def step() -> None:
        collection(kjt).values().backward(grad)

    state = sum(_bytes(t) for t in collection.state_dict().values())
    state_per_row = 1 if optimizer == "rowwise_adagrad" else DIM
    return System(lambda: collection(kjt).values(), step, state + rows * state_per_row * 4)


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def build_systems(
    names: list[str], rows: int, batch: Batch, precomputed: torch.Tensor | None = None
) -> tuple[dict[str, System], torch.Tensor]:
    """Systems by name, and the rows `unified` reads (which the precomputed-index systems are given).

    With `precomputed` given and "unified" not asked for, no unified table is built: a peak
    RSS measured around one system must not count another system's table.
    """
    unified = None
    if precomputed is None or "unified" in names:
        unified, precomputed = _unified(batch, rows, "adagrad")
    builders: dict[str, Callable[[], System]] = {
        "unified": lambda: unified,
        "unified_rowwise": lambda: _unified(batch, rows, "rowwise_adagrad")[0],
        "eb_per_feature": lambda: _eb_per_feature(batch, rows),
        "eb_shared": lambda: _eb_shared(precomputed, rows, batch.batch_size),
        "torchrec": lambda: _torchrec(precomputed, rows, batch, "adagrad"),
        "torchrec_rowwise": lambda: _torchrec(precomputed, rows, batch, "rowwise_adagrad"),
    }
    return {name: builders[name]() for name in names}, precomputed


def available_systems() -> list[str]:
    names = ["unified", "eb_shared", "eb_per_feature", "unified_rowwise"]
    try:
        import torchrec  # noqa: F401

        names += ["torchrec", "torchrec_rowwise"]
    except ImportError:
        pass
    return names


def copy_bandwidth() -> float:
    """This machine's memory copy bandwidth in bytes/s (read + write of a 512 MiB buffer)."""
    source = torch.ones(128 * 2**20)
    target = torch.empty_like(source)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return 2 * _bytes(source) / min(times)


def floor_seconds(lookups: int, unique_rows: int, bandwidth: float, state_per_row: int) -> dict[str, float]:
    """The least time the bytes of a forward and of a training step take at `bandwidth`.

    Forward: read each looked-up row once, write the pooled rows. Step: that forward, then
    read every row's pooled gradient, and for every unique row read and write the row and its
    optimizer state.
    """
    row = DIM * 4
    forward = 2 * lookups * row
    step = forward + lookups * row + unique_rows * 2 * (row + state_per_row * 4)
    return {"forward": forward / bandwidth, "train_step": step / bandwidth}


def time_interleaved(systems: dict[str, System], reps: int, warmup: int = 3) -> dict[str, dict[str, list[float]]]:
    """Each phase on its own, systems interleaved within it. A forward timed right after another
    system's training step pays for that step's cache and TLB churn: with both phases in one
    loop, the same forward code measured 7.5 ms in one position and 5.3 ms in another."""
    times: dict[str, dict[str, list[float]]] = {name: {"forward": [], "train_step": []} for name in systems}
    for phase in ("forward", "train_step"):
        for rep in range(warmup + reps):
            for name, system in systems.items():
                with torch.no_grad() if phase == "forward" else torch.enable_grad():
                    start = time.perf_counter()
                    system.forward() if phase == "forward" else system.train_step()
                    elapsed = time.perf_counter() - start
                if rep >= warmup:
                    times[name][phase].append(elapsed)
    return times


def high_water_rss() -> int:
    """This process's peak resident bytes (VmHWM: unlike ru_maxrss, not inherited through fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss(name: str, args: argparse.Namespace, precomputed: torch.Tensor) -> int:
    """Peak resident bytes of a fresh process that builds one system and trains it a few steps."""
    with tempfile.TemporaryDirectory() as folder:
        rows_file = Path(folder) / "rows.pt"
        torch.save(precomputed, rows_file)
        command = [sys.executable, __file__, "--only", name, "--precomputed", str(rows_file),
                   "--rows", str(args.rows), "--batch", str(args.batch)]  # fmt: skip
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return int(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2**22)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--systems", help="comma-separated (default: all; torchrec's where it imports)")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # subprocess mode for peak RSS
    parser.add_argument("--precomputed", type=Path, help=argparse.SUPPRESS)  # the rows, from the parent
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    batch = criteo_batch(args.batch, np.random.default_rng(0))
    if args.only:
        system = build_systems([args.only], args.rows, batch, torch.load(args.precomputed))[0][args.only]
        for _ in range(5):
            system.train_step()
        print(high_water_rss())
        return

    # Only here: importing torchrec (and FBGEMM) adds ~75 MiB to a process, which the peak RSS
    # of a subprocess measuring another system must not carry.
    names = args.systems.split(",") if args.systems else available_systems()
    systems, precomputed = build_systems(names, args.rows, batch)
    lookups = batch.values.numel()
    unique_rows = int(torch.unique(precomputed).numel())
    bandwidth = copy_bandwidth()
    times = time_interleaved(systems, args.reps)
    rss = {name: peak_rss(name, args, precomputed) for name in names}
    results = {
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "copy_bandwidth_gb_s": bandwidth / 1e9},
        "shape": {"rows": args.rows, "dim": DIM, "batch": args.batch, "features": len(CRITEO_CARDINALITIES),
                  "lookups": lookups, "unique_rows": unique_rows, "reps": args.reps},
        "floor_ms": {k: 1e3 * v for k, v in floor_seconds(lookups, unique_rows, bandwidth, DIM).items()},
        "systems": {},
    }  # fmt: skip
    reference = {phase: statistics.median(times["eb_shared"][phase]) for phase in ("forward", "train_step")}
    print(f"{lookups:,} lookups ({unique_rows:,} unique rows) in a {args.rows:,} x {DIM} table; "
          f"{torch.get_num_threads()} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s")  # fmt: skip
    print(f"{'system':<18}{'forward ms':>12}{'IQR':>8}{'M lookups/s':>13}{'vs eb_shared':>14}"
          f"{'step ms':>10}{'IQR':>8}{'M lookups/s':>13}{'vs eb_shared':>14}{'peak RSS MiB':>14}{'table+state MiB':>17}")  # fmt: skip
    for name in names:
        row = {"peak_rss_bytes": rss[name], "table_and_state_bytes": systems[name].bytes}
        line = f"{name:<18}"
        for phase in ("forward", "train_step"):
            samples = times[name][phase]
            median = statistics.median(samples)
            q1, _, q3 = statistics.quantiles(samples, n=4)
            row[phase] = {"median_ms": 1e3 * median, "iqr_ms": 1e3 * (q3 - q1), "lookups_per_s": lookups / median,
                          "speedup_vs_eb_shared": reference[phase] / median,
                          "times_floor": median / (results["floor_ms"][phase] / 1e3)}  # fmt: skip
            line += f"{1e3 * median:>12.2f}{1e3 * (q3 - q1):>8.2f}{lookups / median / 1e6:>13.2f}{reference[phase] / median:>13.2f}x"
        line += f"{rss[name] / 2**20:>14,.0f}{systems[name].bytes / 2**20:>17,.0f}"
        print(line)
        results["systems"][name] = row
    print(f"memory-bandwidth floor: forward {results['floor_ms']['forward']:.2f} ms, "
          f"train step {results['floor_ms']['train_step']:.2f} ms")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
