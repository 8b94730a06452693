"""Argparse wiring for `ue bench`, `ue report`, `ue merge` and `ue inspect`, ready for cli.py.

cli.py adds each command with three lines, e.g.::

    from unified_embedding.bench import commands as bench_commands
    bench_commands.add_bench_arguments(commands.add_parser("bench", help=bench_commands.BENCH_HELP))
    HANDLERS["bench"] = bench_commands.run_bench

(the same for `report` / `merge` / `inspect`). Each `run_*` takes the parsed namespace and returns
the exit code; errors are the usual ValueError / FileNotFoundError / BudgetError that
`cli.main` already turns into a message and exit code 2.
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex
from typing import Any

from unified_embedding.stream import DEFAULT_STREAM_BATCH_SIZE, StreamConfig
from unified_embedding.train import TrainConfig

BENCH_HELP = "sweep methods x budgets x datasets x seeds into a results database (resumes where it stopped)"
REPORT_HELP = "Markdown report with tables, Pareto frontiers and plots from a results database"
MERGE_HELP = "add the runs of exported results (runs.jsonl) or of other databases to a results database"
INSPECT_HELP = "collision diagnostics of a method at a budget: per-feature collisions and row load"


def _csv(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _seeds(text: str) -> int | list[int]:
    """`3` means seeds 0, 1, 2; `0,5,7` means exactly those; `2,` means seed 2 alone."""
    try:
        return [int(s) for s in _csv(text)] if "," in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be a count (3) or a list (0,1,2), got {text!r}") from None


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _method_option(text: str) -> tuple[str | None, str, Any]:
    """[METHOD:]KEY=VALUE -> (method or None for every method, key, value)."""
    head, sep, value = text.partition("=")
    if not sep or not head:
        raise argparse.ArgumentTypeError(f"expected [METHOD:]KEY=VALUE, got {text!r}")
    method, colon, key = head.rpartition(":")
    return (method if colon else None), key.replace("-", "_"), _value(value)


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.replace("-", "_"), _value(value)


# --------------------------------------------------------------------------------- bench
def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datasets", type=_csv, required=True, help="comma-separated dataset names (or TOML files)")
    p.add_argument(
        "--methods",
        default="all",
        help="comma-separated methods, or 'all' (every registered method); a variant "
        "takes options of its own: full[unseen=grow]",
    )
    p.add_argument("--budgets", type=_csv, default=["0.01x", "0.03x", "0.1x", "0.3x", "1x"],
                   help="comma-separated budgets: multiples of `full` (0.1x) or parameter counts")  # fmt: skip
    p.add_argument("--seeds", type=_seeds, default=3, help="a count (3: seeds 0,1,2) or a list (0,4,9; one seed: 2,)")
    p.add_argument("--model", default="dcnv2", help="CTR model: lr, fm, deepfm, dcnv2, dlrm, mlp")
    p.add_argument("--results", default="results.db", help="the SQLite results database (created if missing)")
    p.add_argument(
        "--data-dir", help="where dataset folders are (default $UE_DATA_DIR, else ~/.cache/unified_embedding)"
    )
    p.add_argument(
        "--epochs", type=int, default=TrainConfig.epochs, help="at most this many; early stopping on val AUC"
    )
    p.add_argument("--patience", type=int, default=TrainConfig.patience)
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"default {TrainConfig.batch_size}, or {DEFAULT_STREAM_BATCH_SIZE} with --protocol stream",
    )
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3 for adam, 1e-2 for adagrad)")
    p.add_argument("--optimizer", choices=["adam", "adagrad"], default="adam")
    p.add_argument("--split", choices=["random", "time"], default="random")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--on-bad-rows", choices=["raise", "skip"], default="raise")
    p.add_argument("--max-rows", type=int, help="train on the first N rows of each dataset (smoke runs)")
    p.add_argument("--method-option", type=_method_option, action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                   help="an option for every method, or (METHOD:KEY=VALUE) for one method")  # fmt: skip
    p.add_argument("--model-option", type=_option, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--decompose", default="multiplexed,unified",
                   help="methods whose feature-multiplexing decomposition is measured (first seed); 'none' for none")  # fmt: skip
    p.add_argument("--work-dir", help="checkpoints of runs in flight (default: <results>.runs beside the database)")
    p.add_argument(
        "--keep-models", action="store_true", help="keep each finished run's run.json and model in --work-dir"
    )
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first failing run instead of recording it")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest for small models on shared cores)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in a worker process with --threads threads (default 1)")  # fmt: skip
    p.add_argument(
        "--protocol",
        choices=["train", "stream"],
        default="train",
        help="train: early stopping on validation, test scored once; stream: progressive validation in time order",
    )
    p.add_argument(
        "--window", type=int, default=StreamConfig.window, help="stream protocol: examples per scored window"
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=StreamConfig.warmup,
        help="stream protocol: share of the stream that only trains (and gives `full` its vocabulary)",
    )
    p.add_argument("--dry-run", action="store_true", help="list the runs still to do and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def spec_from_args(args: argparse.Namespace):
    from unified_embedding.bench.sweep import SweepSpec

    common: dict[str, Any] = {}
    per_method: dict[str, dict[str, Any]] = {}
    for method, key, value in args.method_option:
        (per_method.setdefault(method, {}) if method else common)[key] = value
    decompose = [] if args.decompose.strip().lower() == "none" else _csv(args.decompose)
    return SweepSpec(
        datasets=args.datasets, methods=args.methods, budgets=args.budgets, seeds=args.seeds, model=args.model,
        epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        split=args.split, split_seed=args.split_seed, on_bad_rows=args.on_bad_rows, data_dir=args.data_dir,
        method_options=common, options_by_method=per_method, model_options=dict(args.model_option),
        max_rows=args.max_rows, decompose=decompose, protocol=args.protocol, window=args.window, warmup=args.warmup,
    )  # fmt: skip


def run_bench(args: argparse.Namespace) -> int:
    from unified_embedding.bench.runs import train_config
    from unified_embedding.bench.store import ResultStore
    from unified_embedding.bench.sweep import describe_command, run_sweep

    spec = spec_from_args(args)
    if args.dry_run:
        configs = spec.configs()
        with ResultStore(args.results) as store:
            done = store.done_fingerprints()
        todo = [c for c in configs if c.fingerprint() not in done]
        for c in todo:
            t = train_config(c)
            print(f"{t.dataset}\t{t.method}\t{t.budget}\tseed {t.seed}\t{c.fingerprint()}")
        print(f"{len(todo)} of {len(configs)} runs to do")
        return 0
    summary = run_sweep(
        spec, args.results, command=describe_command(spec, args.results, args.jobs), work_dir=args.work_dir,
        progress=not args.quiet, stop_on_error=args.stop_on_error, keep_models=args.keep_models, threads=args.threads,
        jobs=args.jobs,
    )  # fmt: skip
    print(summary.line())
    print(
        f"results in {args.results}; `ue report --results {shlex.quote(str(args.results))} --out report/` writes the report"
    )
    return 0


# -------------------------------------------------------------------------------- report
def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="results.db", help="the results database written by `ue bench`")
    p.add_argument("--out", default="report", help="folder for the Markdown report and its PNGs")
    p.add_argument("--datasets", type=_csv, help="only these datasets (default: all in the database)")
    p.add_argument("--notes", help="Markdown file whose '## <dataset>' sections are inserted under each dataset")
    p.add_argument("--name", default="README.md", help="file name of the Markdown report inside --out")


def run_report(args: argparse.Namespace) -> int:
    from unified_embedding.bench.report import write_report

    command = ["ue", "report", "--results", str(args.results), "--out", str(args.out)]
    if args.datasets:
        command += ["--datasets", ",".join(args.datasets)]
    if args.notes:
        command += ["--notes", str(args.notes)]
    path = write_report(args.results, args.out, datasets=args.datasets, command=shlex.join(command), notes=args.notes,
                        name=args.name)  # fmt: skip
    print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------- merge
def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="results.db", help="the results database to add to (created if missing)")
    p.add_argument("sources", nargs="+", help="a report's runs.jsonl, or another results database")


def run_merge(args: argparse.Namespace) -> int:
    from unified_embedding.bench.store import ResultStore

    with ResultStore(args.results) as store:
        for source in args.sources:
            counts = store.merge(source)
            print(f"{source}: {counts.added} runs added, {counts.kept} already in {args.results}")
    return 0


# ------------------------------------------------------------------------------- inspect
def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True)
    p.add_argument("--method", default="unified")
    p.add_argument("--budget", default="1x", help="a count (250000) or a multiple of `full` (0.25x)")
    p.add_argument("--data-dir")
    p.add_argument("--split", choices=["random", "time"], default="random")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--on-bad-rows", choices=["raise", "skip"], default="raise")
    p.add_argument("--method-option", type=_option, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-rows", type=int, help="inspect the first N rows of the dataset only")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def run_inspect(args: argparse.Namespace) -> int:
    from unified_embedding.bench.inspect import inspect_collisions

    report = inspect_collisions(
        args.dataset, args.method, args.budget, data_dir=args.data_dir, method_options=dict(args.method_option),
        split=args.split, split_seed=args.split_seed, on_bad_rows=args.on_bad_rows, max_rows=args.max_rows,
    )  # fmt: skip
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0
