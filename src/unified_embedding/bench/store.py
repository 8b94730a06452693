"""The results database: one SQLite row per run, written atomically, safe to read while a sweep runs.

SQLite from the standard library, in WAL mode (a report can read while a sweep writes) with
full synchronisation: a run's row (and its decomposition, if any) is committed in one
transaction after the run finishes, so a sweep killed at any instant leaves every finished
run intact and no half-written one. A run is keyed by its configuration's fingerprint
(`TrainConfig.fingerprint()`), which is how a resumed sweep knows what is already done.

A database lives on one machine; `export` writes the sweeps and the finished and refused runs
as JSON lines (text a repository can keep beside its report), and `merge` loads such a file, or
another database, into this one. That is how sweeps run on several machines, or in several
sittings whose machines are not kept, add up to one set of results.

Statuses: ``running`` (started, not finished: a killed run, re-run on resume), ``finished``,
``refused`` (the method cannot meet the budget: `BudgetError`, with its message; not re-run),
``failed`` (any other error, with the traceback; re-run on resume).

Runs of the stream protocol (`StreamConfig`) share the table: their dataset, method, budget
and seed are their model's, `test_auc` / `test_logloss` hold the stream's progressive
validation score (every example scored before it was trained on), `config` holds the whole
stream configuration and `result` the stream.json, with its windows and new-id scores.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Self

from unified_embedding import provenance
from unified_embedding.bench.runs import RunConfig, train_config

SCHEMA_VERSION = 1
DONE = ("finished", "refused")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sweeps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    command TEXT NOT NULL,
    spec TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    wall_seconds REAL,
    planned INTEGER NOT NULL,
    skipped INTEGER NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'running'
);
CREATE TABLE IF NOT EXISTS runs (
    fingerprint TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'refused', 'failed')),
    dataset TEXT NOT NULL,
    method TEXT NOT NULL,
    model TEXT NOT NULL,
    budget TEXT NOT NULL,
    seed INTEGER NOT NULL,
    budget_params INTEGER,
    full_embedding_params INTEGER,
    num_embedding_params INTEGER,
    num_embedding_bytes INTEGER,
    num_params INTEGER,
    val_auc REAL,
    val_logloss REAL,
    test_auc REAL,
    test_logloss REAL,
    best_epoch INTEGER,
    epochs_run INTEGER,
    train_seconds REAL,
    wall_seconds REAL,
    examples_per_second REAL,
    config TEXT NOT NULL,
    result TEXT,
    error TEXT,
    package_version TEXT NOT NULL,
    torch_version TEXT NOT NULL,
    python_version TEXT NOT NULL,
    platform TEXT NOT NULL,
    sweep_id INTEGER REFERENCES sweeps(id),
    started_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_dataset ON runs (dataset, method, budget);
CREATE TABLE IF NOT EXISTS decompositions (
    fingerprint TEXT PRIMARY KEY REFERENCES runs(fingerprint),
    summary TEXT NOT NULL,
    data TEXT NOT NULL
);
"""

#: Columns copied from a run's result dict (run.json) into their own columns.
_RESULT_COLUMNS = (
    "num_embedding_params", "num_embedding_bytes", "num_params", "full_embedding_params", "val_auc", "val_logloss",
    "test_auc", "test_logloss", "best_epoch", "epochs_run", "train_seconds", "examples_per_second",
)  # fmt: skip


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def versions(found: Mapping[str, str] | None = None) -> dict[str, str]:
    """`found` (a run's own `versions`), else this process's, under the results table's column names."""
    found = found or provenance.versions()
    return {
        "package_version": found["unified_embedding"],
        "torch_version": found["torch"],
        "python_version": found["python"],
        "platform": found["platform"],
    }


class ResultStore:
    """A results database file; open it with `ResultStore(path)` and close it (or use `with`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self.conn.execute(statement)
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        found = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        if int(found) != SCHEMA_VERSION:
            raise ValueError(f"{self.path} has results schema {found}; this version reads schema {SCHEMA_VERSION}")

    # ------------------------------------------------------------------ basics
    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (KeyboardInterrupt included)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------------ sweeps
    def start_sweep(self, command: str, spec: Mapping[str, Any], planned: int, skipped: int) -> int:
        with self.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO sweeps (command, spec, started_at, planned, skipped) VALUES (?, ?, ?, ?, ?)",
                (command, json.dumps(spec, sort_keys=True), now(), planned, skipped),
            )
            return int(cursor.lastrowid)

    def end_sweep(self, sweep_id: int, wall_seconds: float, counts: Mapping[str, int], status: str) -> None:
        """A sweep's outcome; also written after each run (status 'running'): `finished_at` is its last update."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE sweeps SET finished_at = ?, wall_seconds = ?, finished = ?, refused = ?, failed = ?, status = ?"
                " WHERE id = ?",
                (now(), wall_seconds, counts.get("finished", 0), counts.get("refused", 0), counts.get("failed", 0),
                 status, sweep_id),
            )  # fmt: skip

    def sweeps(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM sweeps ORDER BY id").fetchall()
        return [dict(row) | {"spec": json.loads(row["spec"])} for row in rows]

    # -------------------------------------------------------------------- runs
    def status(self, fingerprint: str) -> str | None:
        row = self.conn.execute("SELECT status FROM runs WHERE fingerprint = ?", (fingerprint,)).fetchone()
        return None if row is None else row[0]

    def done_fingerprints(self) -> set[str]:
        """Runs a resumed sweep skips: finished, or refused by their method."""
        marks = ",".join("?" * len(DONE))
        return {row[0] for row in self.conn.execute(f"SELECT fingerprint FROM runs WHERE status IN ({marks})", DONE)}

    def mark_running(self, config: RunConfig, sweep_id: int | None = None) -> None:
        """Record that a run started (kept only until its outcome replaces it)."""
        self._write(config, "running", sweep_id=sweep_id)

    def record_finished(
        self,
        config: RunConfig,
        result: Mapping[str, Any],
        *,
        wall_seconds: float,
        sweep_id: int | None = None,
        decomposition: Mapping[str, Any] | None = None,
    ) -> None:
        """The run's row, with its decomposition if given, in one transaction."""
        self._write(config, "finished", result=result, wall_seconds=wall_seconds, sweep_id=sweep_id,
                    decomposition=decomposition)  # fmt: skip

    def record_refused(self, config: RunConfig, message: str, *, sweep_id: int | None = None) -> None:
        self._write(config, "refused", error=message, sweep_id=sweep_id)

    def record_failed(self, config: RunConfig, error: str, *, wall_seconds: float, sweep_id: int | None = None) -> None:
        self._write(config, "failed", error=error, wall_seconds=wall_seconds, sweep_id=sweep_id)

    def _write(
        self,
        config: RunConfig,
        status: str,
        *,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
        wall_seconds: float | None = None,
        sweep_id: int | None = None,
        decomposition: Mapping[str, Any] | None = None,
    ) -> None:
        fingerprint = config.fingerprint()
        train = train_config(config)
        row: dict[str, Any] = {
            "fingerprint": fingerprint, "status": status, "dataset": train.dataset, "method": train.method,
            "model": train.model, "budget": str(train.budget), "seed": train.seed,
            "config": json.dumps(asdict(config), sort_keys=True), "error": error, "wall_seconds": wall_seconds,
            "sweep_id": sweep_id, "started_at": now(), "finished_at": None if status == "running" else now(),
            **versions(),
        }  # fmt: skip
        if result is not None:
            if result.get("protocol") == "stream":
                result = {**result, "test_auc": result["auc"], "test_logloss": result["logloss"],
                          "train_seconds": result["seconds"]}  # fmt: skip
            row.update({key: result.get(key) for key in _RESULT_COLUMNS})
            row.update(versions(result.get("versions")))  # the worker's own: it imported the code it ran
            row["budget_params"] = result.get("budget")
            row["result"] = json.dumps(result, sort_keys=True)
        with self.transaction() as conn:
            previous = conn.execute("SELECT started_at FROM runs WHERE fingerprint = ?", (fingerprint,)).fetchone()
            if previous is not None and status != "running":
                row["started_at"] = previous[0]
            _put_run(conn, row, decomposition)

    def runs(
        self, *, status: str | Iterable[str] | None = "finished", dataset: str | None = None
    ) -> list[dict[str, Any]]:
        """Runs as dicts, `config` (and `result`) parsed from JSON, oldest first."""
        query, params = "SELECT * FROM runs WHERE 1 = 1", []
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            query += f" AND status IN ({','.join('?' * len(statuses))})"
            params += statuses
        if dataset is not None:
            query += " AND dataset = ?"
            params.append(dataset)
        out = []
        for row in self.conn.execute(query + " ORDER BY started_at, fingerprint", params):
            item = dict(row)
            item["config"] = json.loads(item["config"])
            item["result"] = json.loads(item["result"]) if item["result"] else None
            out.append(item)
        return out

    def decompositions(self) -> dict[str, dict[str, Any]]:
        """Fingerprint -> stored decomposition (see `bench.decomposition.Decomposition.to_dict`)."""
        return {row[0]: json.loads(row[1]) for row in self.conn.execute("SELECT fingerprint, data FROM decompositions")}

    # ------------------------------------------------------------ export, merge
    def export(self, path: str | Path, datasets: Iterable[str] | None = None) -> int:
        """Write the sweeps and the finished and refused runs (of `datasets`, else all) as JSON lines.

        One line per sweep (``{"sweep": ...}``), then one per run (``{"run": ..., "decomposition":
        ...}``), oldest first. Returns the number of runs written.
        """
        wanted = None if datasets is None else set(datasets)
        runs = [r for r in self.runs(status=DONE) if wanted is None or r["dataset"] in wanted]
        used = {r["sweep_id"] for r in runs}
        decompositions = self.decompositions()
        with Path(path).open("w") as out:
            for sweep in self.sweeps():
                if sweep["id"] in used:
                    out.write(json.dumps({"sweep": sweep}, sort_keys=True) + "\n")
            for run in runs:
                line = {"run": run, "decomposition": decompositions.get(run["fingerprint"])}
                out.write(json.dumps(line, sort_keys=True) + "\n")
        return len(runs)

    def merge(self, source: str | Path) -> MergeCounts:
        """Add the finished and refused runs of `source` (an `export` file, or another database).

        A run this database has already finished or refused is kept as it is. The sweeps that
        ran the added runs come with them, once: a sweep equal in every field to one already
        here is that one (two sweeps of one command can start within the same second). So
        merging the same source twice adds nothing.
        """
        sweeps, runs = _read_results(Path(source))
        with self.transaction() as conn:
            done = self.done_fingerprints()
            new = [(run, decomposition) for run, decomposition in runs if run["fingerprint"] not in done]
            needed = {run["sweep_id"] for run, _ in new}
            sweep_ids: dict[int, int] = {}
            for sweep in (s for s in sweeps if s["id"] in needed):
                row = {k: v for k, v in sweep.items() if k != "id"} | {
                    "spec": json.dumps(sweep["spec"], sort_keys=True)
                }
                match = " AND ".join(f"{name} IS ?" for name in row)
                found = conn.execute(f"SELECT id FROM sweeps WHERE {match}", tuple(row.values())).fetchone()
                if found is None:
                    found = (conn.execute(_insert("sweeps", row), tuple(row.values())).lastrowid,)
                sweep_ids[sweep["id"]] = int(found[0])
            for run, decomposition in new:
                row = run | {
                    "config": json.dumps(run["config"], sort_keys=True),
                    "result": None if run["result"] is None else json.dumps(run["result"], sort_keys=True),
                    "sweep_id": sweep_ids.get(run["sweep_id"]),
                }
                _put_run(conn, row, decomposition)
        return MergeCounts(added=len(new), kept=len(runs) - len(new))


class MergeCounts(NamedTuple):
    added: int  # runs new to the database
    kept: int  # runs it had already finished or refused, left as they were


def _insert(table: str, row: Mapping[str, Any], *, replace: bool = False) -> str:
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    return f"{verb} INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})"


def _put_run(conn: sqlite3.Connection, row: Mapping[str, Any], decomposition: Mapping[str, Any] | None) -> None:
    """Write a run's row over any earlier one, with its decomposition (or none), inside the caller's transaction."""
    conn.execute("DELETE FROM decompositions WHERE fingerprint = ?", (row["fingerprint"],))
    conn.execute(_insert("runs", row, replace=True), tuple(row.values()))
    if decomposition is not None:
        conn.execute(
            "INSERT INTO decompositions VALUES (?, ?, ?)",
            (row["fingerprint"], json.dumps(decomposition.get("summary", {})), json.dumps(decomposition)),
        )


def _read_results(source: Path) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], dict[str, Any] | None]]]:
    """(sweeps, [(run, decomposition)]) of an `export` file (.jsonl) or a results database."""
    if not source.is_file():
        raise FileNotFoundError(f"no results file at {source}")
    if source.suffix != ".jsonl":
        with source.open("rb") as head:
            if head.read(16) != b"SQLite format 3\x00":
                raise ValueError(f"{source} is neither a runs.jsonl export nor a results database")
        with ResultStore(source) as other:
            decompositions = other.decompositions()
            return other.sweeps(), [(r, decompositions.get(r["fingerprint"])) for r in other.runs(status=DONE)]
    sweeps, runs = [], []
    with source.open() as lines:
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                if "sweep" in record:
                    sweeps.append(record["sweep"])
                else:
                    runs.append((record["run"], record["decomposition"]))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{source}, line {number}: not a line of `ResultStore.export` ({error})") from None
    return sweeps, runs
