"""The `ue` command: train, stream, evaluate, datasets, methods, and the lab (bench, report, inspect)."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Sequence

from unified_embedding import compress
from unified_embedding.bench import commands as bench_commands
from unified_embedding.data import DATASETS, BadInputError, resolve_data_dir
from unified_embedding.data.download import DownloadError, download
from unified_embedding.dist import plan
from unified_embedding.embeddings import METHODS, BudgetError
from unified_embedding.stream import DEFAULT_STREAM_BATCH_SIZE, StreamConfig, StreamRunner
from unified_embedding.train import TrainConfig, Trainer, evaluate_run


def _option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as true/false, a Python literal (2, 0.5, [8, 8]), or else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if value.lower() in ("true", "false"):
        return key.replace("-", "_"), value.lower() == "true"
    try:
        return key.replace("-", "_"), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.replace("-", "_"), value


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """What defines a model and its training, shared by `ue train` and `ue stream`."""
    p.add_argument(
        "--dataset", required=True, help=f"one of {', '.join(DATASETS)}, or a TOML file describing your data"
    )
    p.add_argument("--method", default="unified", help="embedding method (see `ue methods`)")
    p.add_argument("--model", default="dcnv2", help="CTR model: lr, fm, deepfm, dcnv2, dlrm, mlp")
    p.add_argument(
        "--budget", default="1x", help="embedding parameters: a count (250000) or a multiple of `full` (0.25x)"
    )
    p.add_argument(
        "--data-dir", help="where dataset folders are (default $UE_DATA_DIR, else ~/.cache/unified_embedding)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="examples per training step")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3 for adam, 1e-2 for adagrad)")
    p.add_argument("--optimizer", choices=["adam", "adagrad"], default="adam")
    p.add_argument(
        "--embedding-weight-decay", type=float,
        help="L2 on the embedding's rows (default per model, chosen on validation splits: 1e-2, "
        "1e-3 for lr and fm; 0 with --sparse)",
    )  # fmt: skip
    p.add_argument(
        "--sparse", action="store_true", help="sparse embedding gradients (for tables too large for dense updates)"
    )
    p.add_argument(
        "--fused", action="store_true",
        help="update the embedding table inside backward, touched rows only (fastest; unified, hashing, full, multiplexed)",
    )  # fmt: skip
    p.add_argument("--on-bad-rows", choices=["raise", "skip"], default="raise")
    p.add_argument("--max-rows", type=int, help="use only the first N rows of the data (smoke runs)")
    p.add_argument("--method-option", type=_option, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--model-option", type=_option, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_config(args: argparse.Namespace, **protocol) -> TrainConfig:
    return TrainConfig(
        dataset=args.dataset, method=args.method, model=args.model, budget=args.budget, seed=args.seed,
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, sparse=args.sparse, fused=args.fused,
        embedding_weight_decay=args.embedding_weight_decay, on_bad_rows=args.on_bad_rows, data_dir=args.data_dir,
        max_rows=args.max_rows, method_options=dict(args.method_option), model_options=dict(args.model_option),
        **protocol,
    )  # fmt: skip


def _add_train(commands) -> None:
    p = commands.add_parser("train", help="train and evaluate a CTR model; writes run.json")
    _add_run_arguments(p)
    p.add_argument(
        "--epochs", type=int, default=TrainConfig.epochs, help="at most this many; early stopping on val AUC"
    )
    p.add_argument("--patience", type=int, default=TrainConfig.patience)
    p.add_argument("--split", choices=["random", "time"], default="random", help="random 80/10/10, or by time")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--output", default="run.json", help="run.json path; the checkpoint and model sit beside it")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N batches (0: each epoch)")
    p.add_argument("--nproc", type=int, default=1, help="train sharded over N processes with TorchRec (row-wise)")


def _add_stream(commands) -> None:
    p = commands.add_parser(
        "stream", help="progressive validation in time order: predict each window, then train on it; writes stream.json"
    )
    _add_run_arguments(p)
    p.add_argument("--window", type=int, default=StreamConfig.window, help="examples per scored window")
    p.add_argument(
        "--warmup", type=float, default=StreamConfig.warmup,
        help="share of the stream, from its start, that only trains (and gives `full` its vocabulary)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-every", type=int, default=StreamConfig.checkpoint_every, help="checkpoint every N windows"
    )
    p.add_argument("--output", default="stream.json", help="stream.json path; the checkpoint sits beside it")
    p.set_defaults(batch_size=DEFAULT_STREAM_BATCH_SIZE)  # one pass takes smaller steps (see stream/runner.py)


def _stream(args: argparse.Namespace) -> int:
    config = StreamConfig(_train_config(args), window=args.window, warmup=args.warmup,
                          checkpoint_every=args.checkpoint_every)  # fmt: skip
    result = StreamRunner(config, args.output, progress=not args.quiet).run(resume=args.resume)
    keys = ["dataset", "method", "model", "num_embedding_params", "auc", "logloss", "new_auc", "new_examples",
            "examples", "seconds", "peak_rss_mib"]  # fmt: skip
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    print(f"wrote {args.output}")
    return 0


def _train(args: argparse.Namespace) -> int:
    config = _train_config(
        args, epochs=args.epochs, patience=args.patience, split=args.split, split_seed=args.split_seed,
        checkpoint_every=args.checkpoint_every,
    )  # fmt: skip
    if args.nproc > 1:
        from unified_embedding.dist import require_torchrec

        require_torchrec()
        from unified_embedding.dist.train import launch

        result = launch(config, args.output, nproc=args.nproc, resume=args.resume, progress=not args.quiet)
    else:
        result = Trainer(config, args.output, progress=not args.quiet).run(resume=args.resume)
    keys = ["dataset", "method", "model", "num_embedding_params", "val_auc", "test_auc", "test_logloss",
            "train_seconds", "examples_per_second", "bad_rows_skipped"]  # fmt: skip
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    print(f"wrote {args.output}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    print(json.dumps(evaluate_run(args.run, args.split), indent=2))
    return 0


def _datasets(args: argparse.Namespace) -> int:
    if args.action == "download":
        if not args.name:
            raise SystemExit("usage: ue datasets download NAME")
        for path in download(
            args.name, resolve_data_dir(args.data_dir), base_url=args.base_url, checksum=args.checksum
        ):
            print(path)
        return 0
    root = resolve_data_dir(args.data_dir)
    print(f"data dir: {root}")
    for name, info in DATASETS.items():
        found = info.find(root)
        where = ", ".join(str(p) for p in found) if found else f"not found (looked in {root / info.folder})"
        print(f"  {name:<16} {info.description}\n  {'':<16} {where}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    for name, cls in sorted(METHODS.items()):
        print(f"{name:<14} {cls.description}" + (f"\n{'':<14} paper: {cls.paper}" if cls.paper else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ue", description="Unified Embedding and friends for CTR models.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)
    _add_stream(commands)
    p = commands.add_parser("evaluate", help="score a finished run's model on its valid or test split")
    p.add_argument("--run", required=True, help="the run.json written by `ue train`")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p = commands.add_parser("datasets", help="list known datasets and where they are; `download NAME` fetches one")
    p.add_argument("action", nargs="?", choices=["list", "download"], default="list")
    p.add_argument("name", nargs="?")
    p.add_argument("--data-dir")
    p.add_argument("--base-url", help="mirror to download from instead of the official address")
    p.add_argument("--checksum", help="expected sha256:HEX or md5:HEX, overriding the stored one")
    commands.add_parser("methods", help="list embedding methods with their papers")
    bench_commands.add_bench_arguments(commands.add_parser("bench", help=bench_commands.BENCH_HELP))
    bench_commands.add_report_arguments(commands.add_parser("report", help=bench_commands.REPORT_HELP))
    bench_commands.add_inspect_arguments(commands.add_parser("inspect", help=bench_commands.INSPECT_HELP))
    bench_commands.add_merge_arguments(commands.add_parser("merge", help=bench_commands.MERGE_HELP))
    plan.add_arguments(
        commands.add_parser("plan", help="TorchRec sharding plan and per-rank memory for a unified table")
    )
    compress.add_arguments(
        commands.add_parser("compress", help="low-rank output compression of a trained run; writes a new run")
    )
    return parser


HANDLERS = {
    "train": _train,
    "stream": _stream,
    "evaluate": _evaluate,
    "datasets": _datasets,
    "methods": _methods,
    "bench": bench_commands.run_bench,
    "report": bench_commands.run_report,
    "inspect": bench_commands.run_inspect,
    "merge": bench_commands.run_merge,
    "plan": plan.run,
    "compress": compress.run,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except (
        BadInputError,
        BudgetError,
        DownloadError,
        FileNotFoundError,
        ImportError,
        RuntimeError,
        ValueError,
    ) as error:
        print(f"ue {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
