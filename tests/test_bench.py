"""The Pareto lab: a tiny real sweep that is interrupted and resumed, its report, inspect, decomposition."""

import argparse
import json
import shlex
import sqlite3
from typing import ClassVar

import numpy as np
import pytest
import torch

from unified_embedding import cli
from unified_embedding.bench import commands, sweep
from unified_embedding.bench.colours import METHOD_COLOURS, method_colour
from unified_embedding.bench.decomposition import decompose
from unified_embedding.bench.inspect import inspect_collisions
from unified_embedding.bench.report import Cell, _verdict, busy_seconds, dominated, frontier, write_report
from unified_embedding.bench.runs import make_config
from unified_embedding.bench.store import ResultStore
from unified_embedding.bench.stream_report import StreamSection, verdict_lines
from unified_embedding.bench.summary import seeds_text
from unified_embedding.bench.sweep import SweepSpec, describe_command, run_sweep
from unified_embedding.embeddings import METHODS
from unified_embedding.train import Trainer, build_network, prepare

TINY_MODEL = {"hidden": [16], "num_cross_layers": 1}


def tiny_spec(data_dir, **overrides) -> SweepSpec:
    values = {
        "datasets": ["movielens-100k"], "methods": ["unified", "hashing"], "budgets": ["0.1x", "1x"], "seeds": 1,
        "epochs": 1, "batch_size": 256, "max_rows": 2000, "model_options": TINY_MODEL, "data_dir": str(data_dir),
    }  # fmt: skip
    return SweepSpec(**(values | overrides))


class CountingTrainer(Trainer):
    """The real Trainer, counting runs; raises KeyboardInterrupt (a kill) at run number `interrupt_at`."""

    calls: ClassVar[list[str]] = []
    interrupt_at: ClassVar[int | None] = None

    def run(self, *, resume: bool = False):
        CountingTrainer.calls.append(self.config.fingerprint())
        if len(CountingTrainer.calls) == CountingTrainer.interrupt_at:
            raise KeyboardInterrupt
        return super().run(resume=resume)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train several times faster on one thread when the machine's cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def swept(data_dir, tmp_path_factory):
    """A 2 methods x 2 budgets x 1 seed sweep on 2,000 rows, killed during its 2nd run, then resumed, then re-run."""
    root = tmp_path_factory.mktemp("bench")
    results = root / "results.db"
    spec = tiny_spec(data_dir)
    log = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep, "Trainer", CountingTrainer)
        CountingTrainer.calls, CountingTrainer.interrupt_at = [], 2
        with pytest.raises(KeyboardInterrupt):
            run_sweep(spec, results, progress=False)
        log["first"] = list(CountingTrainer.calls)
        with ResultStore(results) as store:
            log["after_kill"] = {r["fingerprint"]: r["status"] for r in store.runs(status=None)}
        CountingTrainer.calls, CountingTrainer.interrupt_at = [], None
        log["resumed"] = run_sweep(spec, results, progress=False)
        log["second"] = list(CountingTrainer.calls)
        CountingTrainer.calls = []
        log["again"] = run_sweep(spec, results, progress=False)
        log["third"] = list(CountingTrainer.calls)
    return spec, results, log


def test_killed_sweep_resumes_without_rerunning_finished_runs(swept):
    spec, results, log = swept
    fingerprints = [c.fingerprint() for c in spec.configs()]
    assert len(fingerprints) == len(set(fingerprints)) == 4
    assert log["first"] == fingerprints[:2]
    assert log["after_kill"] == {fingerprints[0]: "finished", fingerprints[1]: "running"}
    assert log["second"] == fingerprints[1:]  # the finished first run is not trained again
    assert (log["resumed"].planned, log["resumed"].skipped, log["resumed"].finished) == (4, 1, 3)
    assert log["third"] == [] and log["again"].skipped == 4
    with ResultStore(results) as store:
        runs = store.runs()
        assert sorted(r["fingerprint"] for r in runs) == sorted(fingerprints)
        for run in runs:
            assert 0 < run["test_auc"] <= 1 and run["test_logloss"] > 0
            assert 0 < run["num_embedding_params"] <= run["budget_params"] and run["num_embedding_bytes"] > 0
            assert run["config"]["max_rows"] == 2000 and run["result"]["rows"]["train"] == 1600
            assert run["torch_version"] == torch.__version__ and run["package_version"]
            assert run["wall_seconds"] > 0
        assert [s["status"] for s in store.sweeps()] == ["interrupted", "finished", "finished"]
        unified_runs = {r["fingerprint"] for r in runs if r["method"] == "unified"}
        assert set(store.decompositions()) == unified_runs  # measured for the decomposed method only
    assert not list((results.parent / "results.db.runs").glob("*.ckpt"))  # in-flight checkpoints are cleaned up


def test_database_is_wal_and_a_failed_commit_leaves_nothing_half_written(swept, tmp_path, data_dir):
    _, results, _ = swept
    assert sqlite3.connect(results).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    config = tiny_spec(data_dir).configs()[0]
    with ResultStore(tmp_path / "r.db") as store:
        store.mark_running(config)
        with pytest.raises(TypeError):  # the decomposition cannot be serialised: the whole write rolls back
            store.record_finished(
                config, {"test_auc": 0.7}, wall_seconds=1.0, decomposition={"summary": {}, "x": object()}
            )
        assert store.status(config.fingerprint()) == "running" and store.decompositions() == {}


def test_a_runs_row_carries_the_versions_its_worker_ran_under(tmp_path, data_dir):
    """A row takes the versions its worker reported, not the parent's: a resumed sweep may run newer code."""
    config = tiny_spec(data_dir).configs()[0]
    worker = {"unified_embedding": "9.9.9", "torch": "2.99.0", "python": "3.99.0", "platform": "elsewhere, AVX2"}
    with ResultStore(tmp_path / "r.db") as store:
        store.record_finished(config, {"test_auc": 0.7, "versions": worker}, wall_seconds=1.0)
        (run,) = store.runs()
    assert (run["package_version"], run["torch_version"], run["python_version"], run["platform"]) == (
        "9.9.9", "2.99.0", "3.99.0", "elsewhere, AVX2"
    )  # fmt: skip


def test_report_has_tables_frontier_verdicts_and_plots(swept, tmp_path):
    spec, results, _ = swept
    out = tmp_path / "report"
    path = write_report(results, out, command="ue report --results results.db --out report")
    text = path.read_text()
    assert describe_command(spec, results) in text and "Wall time" in text
    assert "| 0.1x | unified |" in text and "| 1x | hashing |" in text and "★" in text
    assert "on the frontier" in text and "Against `hashing`:" in text and "Against the best other method" in text
    assert "Trained on the first 2,000 rows" in text
    assert "Runs: 4 finished runs in 4 cells (4 with 1 seed), 0 refused, 0 failed." in text
    assert "decompose" in text and "decomposition.png" in text
    assert "| unified | 0.1x | 0 |" in text  # one decomposition row per seed, the seed named
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["movielens-100k_auc_vs_params.png", "movielens-100k_decomposition.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 10_000
        assert f"]({name})" in text


def test_a_reports_runs_file_merges_into_a_new_database_that_reports_the_same(swept, tmp_path):
    spec, results, _ = swept
    first = write_report(results, tmp_path / "first", command="ue report")
    runs_file = tmp_path / "first" / "runs.jsonl"
    assert "[runs.jsonl](runs.jsonl)" in first.read_text()
    assert len(runs_file.read_text().splitlines()) == 4 + 2  # four runs and the two sweeps that ran them
    merged = tmp_path / "merged.db"
    assert cli.main(["merge", "--results", str(merged), str(runs_file)]) == 0
    with ResultStore(results) as original, ResultStore(merged) as store:
        assert store.done_fingerprints() == original.done_fingerprints()
        assert store.decompositions() == original.decompositions()
        assert store.merge(runs_file) == (0, 4) and store.merge(results) == (0, 4)  # nothing twice
        assert len(store.sweeps()) == 2
    second = write_report(merged, tmp_path / "second", command="ue report")

    def body(path):  # all but the line with the time the report was written
        return [line for line in path.read_text().splitlines() if not line.startswith("Report written")]

    assert body(second) == body(first)
    # a run the database lacks is added from another database; the runs it has are kept
    extra = tmp_path / "extra.db"
    run_sweep(tiny_spec(spec.data_dir, budgets=["0.3x"], methods=["hashing"]), extra, progress=False)
    with ResultStore(merged) as store:
        assert store.merge(extra) == (1, 0) and len(store.runs()) == 5
    # two sweeps of one command that started within the same second stay two
    same_second = tmp_path / "same_second.db"
    with ResultStore(results) as original:
        original.conn.execute("VACUUM INTO ?", (str(same_second),))
    with sqlite3.connect(same_second) as conn:
        conn.execute("UPDATE sweeps SET started_at = '2026-01-01T00:00:00+00:00'")
    with ResultStore(tmp_path / "fresh.db") as store:
        assert store.merge(same_second) == (4, 0) and len(store.sweeps()) == 2


def test_merge_names_the_line_of_a_broken_runs_file(tmp_path):
    broken = tmp_path / "runs.jsonl"
    broken.write_text('{"sweep": {"id": 1}}\n{"run": \n')
    with ResultStore(tmp_path / "r.db") as store, pytest.raises(ValueError, match=r"runs.jsonl, line 2"):
        store.merge(broken)
    with ResultStore(tmp_path / "r.db") as store, pytest.raises(FileNotFoundError, match="no results file"):
        store.merge(tmp_path / "missing.jsonl")
    (tmp_path / "notes.txt").write_text("not results")
    with ResultStore(tmp_path / "r.db") as store, pytest.raises(ValueError, match="neither a runs.jsonl"):
        store.merge(tmp_path / "notes.txt")


def test_a_report_of_some_datasets_names_only_their_sweeps(swept, tmp_path, data_dir):
    movielens, swept_results, _ = swept
    results = tmp_path / "results.db"
    with ResultStore(swept_results) as store:
        store.conn.execute("VACUUM INTO ?", (str(results),))
    frappe = tiny_spec(data_dir, datasets=["frappe"], methods=["hashing"], budgets=["1x"])
    run_sweep(frappe, results, progress=False)
    only_frappe = write_report(results, tmp_path / "frappe", datasets=["frappe"]).read_text()
    assert describe_command(frappe, results) in only_frappe
    recorded = describe_command(movielens, swept_results)  # recorded with the database it was run on
    assert recorded not in only_frappe and "## movielens-100k" not in only_frappe
    both = write_report(results, tmp_path / "both").read_text()
    assert describe_command(frappe, results) in both and recorded in both


def test_a_report_says_how_much_of_the_grid_is_missing(swept, tmp_path):
    _, swept_results, _ = swept
    results = tmp_path / "results.db"
    with ResultStore(swept_results) as store:
        store.conn.execute("VACUUM INTO ?", (str(results),))
    with sqlite3.connect(results) as conn:  # a sweep killed during this run: it stays `running`
        conn.execute("UPDATE runs SET status = 'running' WHERE method = 'hashing' AND budget = '1x'")
    text = write_report(results, tmp_path / "report").read_text()
    assert "Runs: 3 finished runs in 3 cells (3 with 1 seed), 0 refused, 0 failed, 1 interrupted" in text
    assert "| 1x | hashing |" not in text
    assert "‡" not in text  # every run on this machine and version


def test_a_cell_whose_seeds_ran_on_different_versions_is_marked(swept, tmp_path):
    spec, swept_results, _ = swept
    results = tmp_path / "results.db"
    with ResultStore(swept_results) as store:
        store.conn.execute("VACUUM INTO ?", (str(results),))
    run_sweep(tiny_spec(spec.data_dir, seeds=[1], methods=["hashing"], budgets=["1x"]), results, progress=False)
    with sqlite3.connect(results) as conn:
        conn.execute("UPDATE runs SET package_version = '0.0.1' WHERE seed = 1")
    text = write_report(results, tmp_path / "report").read_text()
    assert "| 2‡ |" in text and "| 1‡ |" not in text
    assert "‡: the cell's seeds ran under more than one package version or platform" in text


def test_a_sweep_in_two_workers_gives_the_results_of_one_process(swept, tmp_path):
    spec, sequential, _ = swept
    results = tmp_path / "parallel.db"
    summary = run_sweep(spec, results, progress=False, jobs=2, threads=1)
    assert (summary.finished, summary.failed, summary.jobs) == (4, 0, 2)
    with ResultStore(sequential) as store:
        expected = {r["fingerprint"]: (r["val_auc"], r["test_auc"], r["test_logloss"]) for r in store.runs()}
        expected_decompositions = store.decompositions()
    with ResultStore(results) as store:
        assert {r["fingerprint"]: (r["val_auc"], r["test_auc"], r["test_logloss"]) for r in store.runs()} == expected
        assert store.decompositions() == expected_decompositions
        assert store.sweeps()[0]["command"].endswith("--jobs 2")
    assert not list((tmp_path / "parallel.db.runs").glob("*.ckpt"))
    assert run_sweep(spec, results, progress=False, jobs=2).skipped == 4


def test_refused_budgets_are_recorded_not_crashing_and_not_retried(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "Trainer", CountingTrainer)
    CountingTrainer.calls, CountingTrainer.interrupt_at = [], None
    spec = tiny_spec(data_dir, methods=["hashing", "full"], budgets=["10"])
    summary = run_sweep(spec, tmp_path / "r.db", progress=False)
    assert (summary.refused, summary.finished, summary.failed) == (2, 0, 0)
    with ResultStore(tmp_path / "r.db") as store:
        refused = store.runs(status="refused")
    assert {r["method"] for r in refused} == {"hashing", "full"}
    assert all("needs at least" in r["error"] for r in refused)
    CountingTrainer.calls = []
    assert run_sweep(spec, tmp_path / "r.db", progress=False).skipped == 2 and CountingTrainer.calls == []


def test_failing_runs_are_recorded_and_retried(data_dir, tmp_path, monkeypatch):
    class Broken(Trainer):
        def run(self, *, resume=False):
            raise RuntimeError("boom")

    monkeypatch.setattr(sweep, "Trainer", Broken)
    spec = tiny_spec(data_dir, budgets=["1x"])
    assert run_sweep(spec, tmp_path / "r.db", progress=False).failed == 2
    with ResultStore(tmp_path / "r.db") as store:
        assert all("RuntimeError: boom" in r["error"] for r in store.runs(status="failed"))
    assert run_sweep(spec, tmp_path / "r.db", progress=False).failed == 2  # failures are retried, not skipped
    with pytest.raises(RuntimeError, match="boom"):
        run_sweep(spec, tmp_path / "r.db", progress=False, stop_on_error=True)


@pytest.mark.parametrize("seeds", [2, [2], [0, 4]])  # a count, a one-seed list (not the count 2), a list
def test_grid_expands_all_methods_and_the_printed_command_reproduces_it(data_dir, seeds):
    spec = tiny_spec(data_dir, methods="all", budgets=["0.1x", "1x"], seeds=seeds,
                     options_by_method={"unified": {"probes": "log"}})  # fmt: skip
    configs = spec.configs()
    assert len(configs) == len(METHODS) * 2 * len(spec.seed_list())
    assert {c.method for c in configs} == set(METHODS)
    assert all(c.method_options == ({"probes": "log"} if c.method == "unified" else {}) for c in configs)
    parser = argparse.ArgumentParser()
    commands.add_bench_arguments(parser)
    argv = shlex.split(describe_command(spec, "r.db"))
    assert argv[:2] == ["ue", "bench"]
    again = commands.spec_from_args(parser.parse_args(argv[2:]))
    assert [c.fingerprint() for c in again.configs()] == [c.fingerprint() for c in configs]


def test_a_seed_count_of_zero_points_to_the_one_seed_list(data_dir):
    with pytest.raises(ValueError, match=r"a count of seeds must be >= 1, got 0.*`--seeds 0,`"):
        tiny_spec(data_dir, seeds=0).seed_list()


def test_inspect_shares_are_sane_and_a_bigger_table_collides_less(data_dir):
    small = inspect_collisions("movielens-100k", "unified", "0.1x", data_dir=str(data_dir))
    large = inspect_collisions("movielens-100k", "unified", "1x", data_dir=str(data_dir))
    for report in (small, large):
        assert [f.feature for f in report.features][:2] == ["user", "item"]
        for f in report.features:
            for share in (f.within, f.across, f.any, f.whole, f.within_weighted, f.across_weighted, f.any_weighted):
                assert 0.0 <= share <= 1.0
            assert f.any >= max(f.within, f.across) and f.whole <= f.any
        assert 0.0 <= report.empty_rows <= 1.0 and report.load_max >= report.load_mean > 0
    assert large.table_rows > small.table_rows
    assert np.mean([f.any for f in large.features]) < np.mean([f.any for f in small.features])
    assert large.load_mean < small.load_mean and large.empty_rows > small.empty_rows
    hashing = inspect_collisions("movielens-100k", "hashing", "0.3x", data_dir=str(data_dir))
    assert all(f.across == 0 for f in hashing.features)  # a table per feature: no cross-feature collisions
    full = inspect_collisions("movielens-100k", "full", "1x", data_dir=str(data_dir))
    assert all(f.any == 0 for f in full.features) and full.load_max == 1
    assert "row load" in small.format() and "user" in small.format()
    with pytest.raises(ValueError, match="does not read rows of a table"):
        inspect_collisions("movielens-100k", "dhe", "0.1x", data_dir=str(data_dir))


def test_decomposition_shares_sum_to_one_per_shared_row(data_dir):
    config = make_config(dataset="movielens-100k", method="multiplexed", budget="0.1x", data_dir=str(data_dir),
                         model_options=TINY_MODEL, max_rows=2000)  # fmt: skip
    prepared = prepare(config)
    network = build_network(config, prepared)
    result = decompose(network, prepared.vocabularies)
    assert len(result.rows) > 0 and (result.tenants >= 2).all()
    assert np.allclose(result.shares.sum(1), 1.0) and (result.shares >= 0).all()
    assert ((result.shares > 0).sum(1) <= result.tenants).all()
    assert ((0 <= result.cosine) & (result.cosine <= 1 + 1e-9)).all() and np.isfinite(result.cosine).all()
    assert ((0 <= result.readout) & (result.readout <= 1 + 1e-9)).all()
    assert result.readout_random[0, 1] < 0.5  # random projections of different features are far from identical
    assert (
        np.allclose(result.overlap, result.overlap.T)
        and (0 <= result.overlap).all()
        and (result.overlap <= 1 + 1e-9).all()
    )
    stored = json.loads(json.dumps(result.to_dict()))
    assert len(stored["rows"]) <= 40 and stored["summary"]["shared_rows"] == len(result.rows)
    assert 0 < stored["summary"]["mean_dominant_share"] <= 1


def cell(method: str, params: float, aucs: list[float]) -> Cell:
    """One budget's cell of `method` with these per-seed test AUCs."""
    return Cell(method, "b", 100, params, 4 * params, np.array(aucs), np.array([0.5] * len(aucs)), 1.0)


def test_frontier_and_domination():
    a, b, c = cell("a", 100, [0.70, 0.72]), cell("b", 50, [0.71, 0.71]), cell("c", 200, [0.80, 0.80])
    assert dominated(a, [a, b, c]) is b  # b: same mean AUC with fewer parameters
    assert frontier([a, b, c]) == [b, c]


def test_a_verdict_names_a_collision_free_table_that_beats_unified_at_its_size():
    unified, hashing = cell("unified", 100, [0.70, 0.71, 0.70]), cell("hashing", 100, [0.66, 0.67, 0.66])
    beaten = _verdict("**b**", unified, [unified, hashing, cell("full", 99, [0.75, 0.76, 0.75])])
    assert "is not on the frontier" in beaten and "the collision-free `full` fits this budget" in beaten
    level = _verdict(
        "**b**", unified, [unified, hashing, cell("full", 99, [0.71, 0.70, 0.70]), cell("pep", 90, [0.8] * 3)]
    )
    assert "`pep`" in level and "collision-free" not in level  # full is level with unified: not a cause
    one_seed = _verdict("**b**", cell("unified", 100, [0.70]), [cell("unified", 100, [0.70]), cell("full", 99, [0.75])])
    assert "collision-free" not in one_seed and "the gap may be chance" in one_seed  # one seed is no evidence


def test_a_clear_gap_is_one_welch_test_passes_not_a_count_of_standard_errors():
    two = [cell("unified", 100, [0.70, 0.72]), cell("hashing", 100, [0.66, 0.68])]
    three = [cell("unified", 100, [0.70, 0.72, 0.71]), cell("hashing", 100, [0.66, 0.68, 0.67])]
    # +2.8 standard errors on two seeds a side (2 degrees of freedom) is p = 0.11: noise
    assert "(+2.8 standard errors, p = 0.106: within noise (Welch p >= 0.05))" in _verdict("**b**", two[0], two)
    assert "(+4.9 standard errors, p = 0.008: a clear win)" in _verdict("**b**", three[0], three)


def test_sweeps_run_side_by_side_count_once_in_the_wall_time():
    def sweep(start, seconds):
        return {"started_at": f"2026-01-01T{start}+00:00", "wall_seconds": seconds}

    # 10:00-10:10 and 10:05-10:20 overlap (20 min busy); 11:00-11:01 is apart; a sweep with no time adds nothing
    sweeps = [sweep("10:05:00", 900.0), sweep("10:00:00", 600.0), sweep("11:00:00", 60.0), sweep("12:00:00", None)]
    assert busy_seconds(sweeps) == 1260.0


def test_method_colours_are_fixed_and_distinct():
    assert method_colour("unified") == METHOD_COLOURS["unified"] == "#d62728"
    assert len(set(METHOD_COLOURS.values())) == len(METHOD_COLOURS)
    assert set(METHODS) <= set(METHOD_COLOURS)
    assert method_colour("some_new_method") == method_colour("some_new_method")
    assert method_colour("unified[probes=log]") == method_colour("unified")


def test_a_run_killed_mid_way_resumes_from_its_checkpoint_with_identical_results(data_dir, tmp_path, monkeypatch):
    from unified_embedding import train

    spec = tiny_spec(data_dir, methods=["hashing"], budgets=["0.3x"], epochs=2, patience=5, decompose=[])
    reference = run_sweep(spec, tmp_path / "reference.db", progress=False)
    assert reference.finished == 1
    real_evaluate, calls = train.evaluate, {"n": 0}

    def evaluate_then_die(*args, **kwargs):  # killed at the end of epoch 2, after epoch 1's checkpoint
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", evaluate_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, tmp_path / "r.db", progress=False)
    assert len(list((tmp_path / "r.db.runs").glob("*.ckpt"))) == 1
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    assert run_sweep(spec, tmp_path / "r.db", progress=False).finished == 1
    with ResultStore(tmp_path / "reference.db") as a, ResultStore(tmp_path / "r.db") as b:
        (first,), (second,) = a.runs(), b.runs()
    assert second["test_auc"] == first["test_auc"] and second["result"]["history"] == first["result"]["history"]
    assert not list((tmp_path / "r.db.runs").iterdir())


def test_method_variants_parse_and_get_runs_of_their_own(data_dir):
    assert sweep.split_methods("unified,full[unseen=grow,dim=8],zch") == ["unified", "full[unseen=grow,dim=8]", "zch"]
    assert sweep.parse_method("full[unseen=grow,dim=8]") == ("full", {"unseen": "grow", "dim": 8})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sweep.parse_method("full[grow]")
    configs = tiny_spec(data_dir, methods="full,full[unseen=grow]", budgets=["1x"]).configs()
    assert [c.method_options for c in configs] == [{}, {"unseen": "grow"}]
    assert len({c.fingerprint() for c in configs}) == 2


def test_a_stream_sweep_is_stored_resumable_and_reported(data_dir, tmp_path):
    spec = tiny_spec(data_dir, methods="unified,full", budgets=["0.25x"], protocol="stream", window=500,
                     max_rows=3000)  # fmt: skip
    results = tmp_path / "stream.db"
    first = run_sweep(spec, results, progress=False)
    assert (first.finished, first.failed) == (2, 0)
    assert run_sweep(spec, results, progress=False).skipped == 2
    with ResultStore(results) as store:
        runs = store.runs()
    assert {r["method"] for r in runs} == {"unified", "full"}
    for run in runs:
        assert run["test_auc"] == run["result"]["auc"] and run["result"]["windows"]
        assert run["config"]["window"] == 500
    report = write_report(results, tmp_path / "report").read_text()
    assert "## Streaming" in report and "new-id AUC" in report and "`unified`" in report
    assert (tmp_path / "report" / "stream_movielens-100k_0.25x.png").stat().st_size > 10_000
    assert "--protocol stream --window 500" in describe_command(spec, results)


def test_plot_titles_say_how_many_seeds_the_cells_have():
    assert seeds_text([3, 3, 3]) == "3 seeds" and seeds_text([1]) == "1 seed"
    assert seeds_text([1, 2, 1]) == "1-2 seeds"  # a sweep still filling in seeds says so


def test_stream_verdicts_call_a_gap_only_beyond_the_noise_and_never_on_one_seed():
    def runs(*aucs):
        return [{"auc": a, "new_auc": a, "cold_auc": a} for a in aucs]

    section = StreamSection("d", "b", {}, {"unified": runs(0.80, 0.81, 0.80), "hashing": runs(0.70, 0.71, 0.70)})
    assert "on all examples it beats it" in verdict_lines(section)[0]
    section.runs["hashing"] = runs(0.80, 0.79, 0.81)
    assert "on all examples it ties with it" in verdict_lines(section)[0]
    one_seed = StreamSection("d", "b", {}, {"unified": runs(0.80), "hashing": runs(0.70)})
    line = verdict_lines(one_seed)[0]
    assert (
        "beats" not in line and "on all examples it is ahead of it (+0.1000 AUC; one seed: no error estimate)" in line
    )
