"""The grid: datasets x methods x budgets x seeds, one training run each, resumable.

Two protocols: ``train`` (early stopping on the validation split, test scored once) and
``stream`` (progressive validation in time order, `unified_embedding.stream`). A method may
be given with options of its own, ``full[unseen=grow]``, so that variants of one method
are compared in one sweep.

`run_sweep(spec, results)` trains every run of the grid that the results database does not
already hold as finished (or refused), records each outcome in one transaction as soon as
it is known, and shows a progress bar over runs with the time left. With `jobs` > 1 the
runs train in that many worker processes (`bench.workers`) and this process alone writes
the database. A sweep killed at any point loses only the runs in flight, and each resumes
from its last epoch checkpoint (kept under `work_dir` until the run is recorded). A method
that cannot meet a budget is recorded as ``refused`` with its `BudgetError` message; any
other error of a run is recorded as ``failed`` (and retried by the next sweep) unless
`stop_on_error`.
"""

from __future__ import annotations

import ast
import shlex
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from unified_embedding.bench.decomposition import decompose_saved
from unified_embedding.bench.runs import RunConfig, make_config, train_config
from unified_embedding.bench.store import ResultStore
from unified_embedding.bench.workers import run_in_workers
from unified_embedding.embeddings import METHODS, BudgetError, get_method
from unified_embedding.stream import DEFAULT_STREAM_BATCH_SIZE, StreamConfig, StreamRunner
from unified_embedding.train import TrainConfig, Trainer

#: Methods whose decomposition is measured after training (seed `decompose_seed` only).
DECOMPOSED = ("multiplexed", "unified")


@dataclass
class SweepSpec:
    """What to run. `methods="all"` is every registered method; `seeds` is a count or a list."""

    datasets: Sequence[str]
    methods: Sequence[str] | str = "all"
    budgets: Sequence[str] = ("0.01x", "0.03x", "0.1x", "0.3x", "1x")
    seeds: int | Sequence[int] = 3
    model: str = "dcnv2"
    epochs: int = TrainConfig.epochs
    patience: int = TrainConfig.patience
    #: None: the protocol's default (TrainConfig's, or the stream's smaller one)
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str = "adam"
    split: str = "random"
    split_seed: int = 0
    on_bad_rows: str = "raise"
    data_dir: str | None = None
    #: options for every method ({"storage": "int8"}) ...
    method_options: Mapping[str, Any] = field(default_factory=dict)
    #: ... and per method ({"unified": {"probes": "log"}}), applied after the common ones
    options_by_method: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    model_options: Mapping[str, Any] = field(default_factory=dict)
    #: train on the first `max_rows` rows of each dataset (tests, smoke runs); None: all rows
    max_rows: int | None = None
    #: methods whose feature-multiplexing decomposition is measured and stored
    decompose: Sequence[str] = DECOMPOSED
    protocol: Literal["train", "stream"] = "train"
    #: the stream protocol's window and warm-up (see `StreamConfig`)
    window: int = StreamConfig.window
    warmup: float = StreamConfig.warmup

    def method_names(self) -> list[str]:
        """Method entries as given: registry names, each optionally with ``[KEY=VALUE,...]``."""
        if isinstance(self.methods, str):
            names = list(METHODS) if self.methods == "all" else split_methods(self.methods)
        else:
            names = list(self.methods)
        for name in names:
            get_method(parse_method(name)[0])  # unknown names fail before any run
        return list(dict.fromkeys(names))

    def seed_list(self) -> list[int]:
        if isinstance(self.seeds, int) and not isinstance(self.seeds, bool):
            if self.seeds < 1:
                raise ValueError(
                    f"a count of seeds must be >= 1, got {self.seeds}; "
                    f"for seed {self.seeds} alone give a list: [{self.seeds}] (`--seeds {self.seeds},`)"
                )
            return list(range(self.seeds))
        return [int(s) for s in self.seeds]

    def batch_size_used(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return DEFAULT_STREAM_BATCH_SIZE if self.protocol == "stream" else TrainConfig.batch_size

    def configs(self) -> list[RunConfig]:
        """Every run of the grid, validated, in the order they run: dataset, seed, budget, method."""
        if not self.datasets or not self.budgets:
            raise ValueError("a sweep needs at least one dataset and one budget")
        if self.protocol not in ("train", "stream"):
            raise ValueError(f"protocol must be 'train' or 'stream', got {self.protocol!r}")
        out = []
        for dataset in self.datasets:
            for seed in self.seed_list():
                for budget in self.budgets:
                    for entry in self.method_names():
                        method, own = parse_method(entry)
                        options = dict(self.method_options) | dict(self.options_by_method.get(method, {})) | own
                        out.append(
                            make_config(
                                dataset=dataset, method=method, model=self.model, budget=str(budget), seed=seed,
                                epochs=self.epochs, patience=self.patience, batch_size=self.batch_size_used(), lr=self.lr,
                                optimizer=self.optimizer, split=self.split, split_seed=self.split_seed,
                                on_bad_rows=self.on_bad_rows, data_dir=self.data_dir, method_options=options,
                                model_options=dict(self.model_options), max_rows=self.max_rows,
                            )
                        )  # fmt: skip
                        if self.protocol == "stream":
                            out[-1] = StreamConfig(out[-1], window=self.window, warmup=self.warmup).validate()
        return out

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["methods"] = self.method_names()
        values["seeds"] = self.seed_list()
        values["datasets"] = list(self.datasets)
        values["budgets"] = [str(b) for b in self.budgets]
        values["decompose"] = list(self.decompose)
        return values


@dataclass
class SweepSummary:
    planned: int  # runs in the grid
    skipped: int  # already finished or refused before this sweep
    finished: int = 0
    refused: int = 0
    failed: int = 0
    wall_seconds: float = 0.0
    sweep_id: int | None = None
    jobs: int = 1

    def line(self) -> str:
        return (
            f"{self.planned} runs planned, {self.skipped} already done; this sweep: {self.finished} finished, "
            f"{self.refused} refused by their method, {self.failed} failed, in {self.wall_seconds:,.0f} s"
            + (f" with {self.jobs} workers" if self.jobs > 1 else "")
        )


@dataclass
class Outcome:
    """What training one run gave, ready to record; made by `execute_run` in whichever process trained it."""

    status: Literal["finished", "refused", "failed"]
    wall_seconds: float
    result: dict[str, Any] | None = None
    decomposition: dict[str, Any] | None = None
    message: str = ""  # the refusal, or the failure's traceback


def run_sweep(
    spec: SweepSpec,
    results: str | Path,
    *,
    command: str | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
    run_progress: bool = False,
    stop_on_error: bool = False,
    keep_models: bool = False,
    threads: int | None = None,
    jobs: int = 1,
) -> SweepSummary:
    """Run the runs of `spec` that `results` does not hold yet; see the module docstring.

    `command` is stored with the sweep (the report prints it); `work_dir` holds in-flight
    checkpoints (default: beside the database, ``<results>.runs/``); `keep_models` keeps each
    finished run's run.json and model there. `threads` sets torch's CPU threads for the sweep
    (1 is much faster for small models on a machine whose cores are shared; with `jobs` > 1
    it is per worker and defaults to 1). Runs are seeded, so a run gives the same result in a
    worker as in this process.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    configs = spec.configs()
    results = Path(results)
    work = Path(work_dir) if work_dir is not None else results.with_name(results.name + ".runs")
    started = time.perf_counter()
    with ResultStore(results) as store:
        done = store.done_fingerprints()
        todo = [c for c in configs if c.fingerprint() not in done]
        summary = SweepSummary(planned=len(configs), skipped=len(configs) - len(todo), jobs=jobs)
        summary.sweep_id = store.start_sweep(
            command or describe_command(spec, results, jobs), spec.to_dict(), len(configs), summary.skipped
        )
        counts: Counter[str] = Counter()
        status = "interrupted"
        bar = tqdm(total=len(todo), desc="bench", unit="run", disable=not progress, dynamic_ncols=True)

        def start(config: RunConfig) -> None:
            store.mark_running(config, summary.sweep_id)
            if jobs == 1:
                train = train_config(config)
                bar.set_postfix_str(f"{train.dataset} {train.method} {train.budget} seed {train.seed}", refresh=True)

        def finish(config: RunConfig, outcome: Outcome) -> None:
            _record(store, config, outcome, summary.sweep_id, work, keep_models)
            counts[outcome.status] += 1
            bar.update(1)
            # so that a sweep killed outright still has its wall time up to its last run
            store.end_sweep(summary.sweep_id, time.perf_counter() - started, counts, "running")

        def decomposed(config: RunConfig) -> bool:
            return (
                isinstance(config, TrainConfig) and config.method in spec.decompose
                and config.seed == min(spec.seed_list())
            )  # fmt: skip

        try:
            if jobs == 1:
                with torch_threads(threads):
                    for config in todo:
                        start(config)
                        finish(config, execute_run(config, work, decomposed(config), run_progress, stop_on_error))
            else:
                tasks = [(c, (c, work, decomposed(c), False, stop_on_error)) for c in todo]
                run_in_workers(
                    execute_run, tasks, jobs=jobs, threads=threads or 1, start=start, finish=finish,
                    died=lambda config, message, seconds: finish(config, Outcome("failed", seconds, message=message)),
                )  # fmt: skip
            status = "finished"
        finally:
            bar.close()
            summary.finished, summary.refused, summary.failed = counts["finished"], counts["refused"], counts["failed"]
            summary.wall_seconds = time.perf_counter() - started
            store.end_sweep(summary.sweep_id, summary.wall_seconds, counts, status)
    return summary


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to `threads` (None: unchanged) for the block."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def execute_run(config: RunConfig, work: Path, decompose: bool, run_progress: bool, stop_on_error: bool) -> Outcome:
    """Train one run (resuming its checkpoint under `work`) and say how it went; writes no database.

    Runs in the sweeping process or in a worker, so it returns everything the record needs.
    """
    output = work / f"{config.fingerprint()}.json"
    started = time.perf_counter()
    try:
        decomposition = None
        if isinstance(config, StreamConfig):
            result = StreamRunner(config, output, progress=run_progress).run(resume=True)
        else:
            result = Trainer(config, output, progress=run_progress).run(resume=True)
        if decompose:
            decomposition = _decomposition(config, output.with_suffix(".pt"))
    except BudgetError as error:
        return Outcome("refused", time.perf_counter() - started, message=str(error))
    except Exception:
        if stop_on_error:
            raise
        return Outcome("failed", time.perf_counter() - started, message=traceback.format_exc())
    return Outcome("finished", time.perf_counter() - started, result, decomposition)


def _record(
    store: ResultStore, config: RunConfig, outcome: Outcome, sweep_id: int | None, work: Path, keep_models: bool
) -> None:
    """Write the outcome; only then drop the run's files, so that a kill in between loses no training."""
    if outcome.status == "finished":
        store.record_finished(config, outcome.result or {}, wall_seconds=outcome.wall_seconds, sweep_id=sweep_id,
                              decomposition=outcome.decomposition)  # fmt: skip
    elif outcome.status == "refused":
        store.record_refused(config, outcome.message, sweep_id=sweep_id)
    else:
        store.record_failed(config, outcome.message, wall_seconds=outcome.wall_seconds, sweep_id=sweep_id)
        train = train_config(config)
        tqdm.write(f"bench: {train.dataset} {train.method} {train.budget} seed {train.seed} failed (recorded)")
        return  # a failed run keeps its checkpoint: the next sweep retries from it
    if outcome.status == "refused" or not keep_models:
        _clean(work / f"{config.fingerprint()}.json")


def split_methods(text: str) -> list[str]:
    """Comma-separated method entries; commas inside ``[...]`` belong to an entry's options."""
    entries, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            entries.append(current.strip())
            current = ""
        else:
            current += ch
    entries.append(current.strip())
    return [e for e in entries if e]


def parse_method(entry: str) -> tuple[str, dict[str, Any]]:
    """``full[unseen=grow,dim=8]`` -> ("full", {"unseen": "grow", "dim": 8}); values read as Python literals."""
    name, bracket, rest = entry.partition("[")
    if not bracket:
        return entry.strip(), {}
    if not rest.endswith("]"):
        raise ValueError(f"method entry {entry!r}: options go in one [KEY=VALUE,...] at the end")
    options = {}
    for item in filter(None, (part.strip() for part in split_methods(rest[:-1]))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"method entry {entry!r}: expected KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return name.strip(), options


def _decomposition(config: TrainConfig, model_path: Path) -> dict[str, Any]:
    try:
        return decompose_saved(config, model_path).to_dict()
    except ValueError as error:  # e.g. a model without a linear first layer
        return {"summary": {}, "error": str(error)}


def _clean(output: Path) -> None:
    for suffix in (".json", ".ckpt", ".pt"):
        output.with_suffix(suffix).unlink(missing_ok=True)


def describe_command(spec: SweepSpec, results: str | Path, jobs: int = 1) -> str:
    """The `ue bench` command line that runs `spec` (what the report prints as the exact command)."""
    args = ["ue", "bench", "--datasets", ",".join(spec.datasets)]
    methods = spec.methods if isinstance(spec.methods, str) else ",".join(spec.methods)
    args += ["--methods", methods, "--budgets", ",".join(str(b) for b in spec.budgets)]
    seeds = spec.seeds
    if not isinstance(seeds, int):  # a one-seed list is written "2,", or it would read back as the count 2
        seeds = ",".join(str(s) for s in seeds) + "," * (len(seeds) == 1)
    args += ["--seeds", str(seeds), "--model", spec.model, "--results", str(results)]
    defaults = SweepSpec(datasets=spec.datasets)
    for name in ("epochs", "patience", "batch_size", "lr", "optimizer", "split", "split_seed", "on_bad_rows", "data_dir",
                 "max_rows"):  # fmt: skip
        value = getattr(spec, name)
        if value != getattr(defaults, name):
            args += [f"--{name.replace('_', '-')}", str(value)]
    for key, value in spec.method_options.items():
        args += ["--method-option", f"{key}={_literal(value)}"]
    for method, options in spec.options_by_method.items():
        for key, value in options.items():
            args += ["--method-option", f"{method}:{key}={_literal(value)}"]
    for key, value in spec.model_options.items():
        args += ["--model-option", f"{key}={_literal(value)}"]
    if spec.protocol != "train":
        args += ["--protocol", spec.protocol, "--window", str(spec.window), "--warmup", str(spec.warmup)]
    if list(spec.decompose) != list(DECOMPOSED):
        args += ["--decompose", ",".join(spec.decompose) or "none"]
    if jobs > 1:  # not a result's setting, but the wall time the report prints depends on it
        args += ["--jobs", str(jobs)]
    return shlex.join(args)


def _literal(value: Any) -> str:
    """How a KEY=VALUE option writes `value` so that the CLI reads it back (a plain word stays plain)."""
    if isinstance(value, str):
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return repr(value)
