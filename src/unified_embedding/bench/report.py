"""The Markdown report of a results database: per dataset, the table, the frontier, the plot, the verdict.

`write_report(results, out)` reads every run in the database and writes `out/README.md`
plus, per dataset, `<dataset>_auc_vs_params.png` and (when the sweep measured it)
`<dataset>_decomposition.png`. Runs are grouped by dataset and by *setting* (everything in
their config but method, budget and seed); a database holding several settings for one
dataset gets one section per setting.

Statistics over seeds: mean, standard deviation (n-1) and standard error (std / sqrt(n)). A
difference between two methods is reported with the standard error of the difference of
means, sqrt(se_a^2 + se_b^2) (seeds are independent runs). A method is *dominated* at a
budget when another method at that budget has at least its mean test AUC with at most its
parameters (one of the two strictly); the *frontier* is the methods that are not.
"""

from __future__ import annotations

import json
import math
import shlex
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from unified_embedding.bench.colours import method_colour
from unified_embedding.bench.decomposition import plot_decomposition
from unified_embedding.bench.store import ResultStore
from unified_embedding.bench.stream_report import stream_lines, stream_sections
from unified_embedding.bench.summary import (
    CLEAR_P,
    Difference,
    format_stats,
    mean_difference,
    mean_std_se,
    method_label,
    seeds_text,
)

PRODUCT = "unified"
BASELINE = "hashing"
#: the method without collisions, where it fits the budget (`ue methods`)
COLLISION_FREE = "full"
#: how many more parameters than `unified` a rival may have and still count as "the same size"
SAME_SIZE = 1.05
#: The report's raw data beside it: `ResultStore.export` of the runs it shows.
RUNS_FILE = "runs.jsonl"
MIXED_MARK = "‡"
#: config fields that vary inside one section (the grid's axes) or do not define a result
_AXES = ("method", "budget", "seed", "method_options", "data_dir", "checkpoint_every")


@dataclass
class Cell:
    """All seeds of one method at one budget."""

    method: str  # label: the method name, with its options when it has any
    budget: str
    budget_params: int
    params: float
    bytes: float
    auc: np.ndarray
    logloss: np.ndarray
    seconds: float  # mean wall seconds per run
    #: its seeds ran under more than one package version or platform (their bits may differ by
    #: more than the seeds do: docs/performance.md)
    mixed: bool = False

    @property
    def n(self) -> int:
        return len(self.auc)

    @staticmethod
    def _stats(values: np.ndarray) -> tuple[float, float, float]:
        return mean_std_se(values)

    @property
    def auc_stats(self) -> tuple[float, float, float]:
        return self._stats(self.auc)

    @property
    def logloss_stats(self) -> tuple[float, float, float]:
        return self._stats(self.logloss)


@dataclass
class Section:
    dataset: str
    setting: dict[str, Any]
    label: str
    cells: list[Cell] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    interrupted: int = 0  # runs left `running` by a killed sweep: no result, resumed by the next `ue bench`
    decompositions: list[dict[str, Any]] = field(default_factory=list)  # {"method", "budget", "budget_params", "data"}

    def budgets(self) -> list[str]:
        """Budgets in increasing order of parameters."""
        params: dict[str, int] = {}
        for cell in self.cells:
            params.setdefault(cell.budget, cell.budget_params)
        for run in self.refused + self.failed:
            params.setdefault(run["budget"], run.get("budget_params") or 0)
        return sorted(params, key=lambda b: (params[b], b))

    def at(self, budget: str) -> list[Cell]:
        return [c for c in self.cells if c.budget == budget]


# ---------------------------------------------------------------------------- statistics
def dominated(cell: Cell, others: Iterable[Cell]) -> Cell | None:
    """A cell that dominates `cell` (>= mean AUC with <= parameters, one strictly), if any."""
    auc = cell.auc_stats[0]
    best = None
    for other in others:
        if other is cell:
            continue
        o_auc = other.auc_stats[0]
        beats = o_auc >= auc and other.params <= cell.params and (o_auc > auc or other.params < cell.params)
        if beats and (best is None or o_auc > best.auc_stats[0]):
            best = other
    return best


def frontier(cells: Sequence[Cell]) -> list[Cell]:
    """The cells no other cell dominates, by increasing parameters."""
    return sorted((c for c in cells if dominated(c, cells) is None), key=lambda c: (c.params, -c.auc_stats[0]))


def difference(a: Cell, b: Cell) -> Difference:
    """Mean test AUC of a minus b, its standard error and Welch's p (nan with a single seed on either side)."""
    return mean_difference(a.auc, b.auc)


def compare(a: Cell, b: Cell) -> str:
    """a's mean test AUC against b's, with its standard error and whether it clears the noise."""
    d = difference(a, b)
    if math.isnan(d.se):
        return f"{d.diff:+.4f} AUC (one seed: no error estimate)"
    if d.se == 0:
        return f"{d.diff:+.4f} ± 0.0000 AUC"
    verdict = ("a clear win" if d.diff > 0 else "a clear loss") if d.clear else f"within noise (Welch p >= {CLEAR_P:g})"
    return f"{d.diff:+.4f} ± {d.se:.4f} AUC ({d.diff / d.se:+.1f} standard errors, {d.p_text()}: {verdict})"


def base_method(label: str) -> str:
    """The registry name of a cell's method label (`unified[probes=log]` -> `unified`)."""
    return label.split("[", 1)[0]


def verdicts(section: Section, budget: str) -> list[str]:
    """Plain-language paragraphs: is `unified` (each variant of it) on the frontier here, and by how much does it win."""
    cells = section.at(budget)
    products = [c for c in cells if base_method(c.method) == PRODUCT]
    params = cells[0].budget_params if cells else 0
    head = f"**{budget}** ({params:,} parameters)"
    if not products:
        why = [r for r in section.refused + section.failed if r["budget"] == budget and r["method"] == PRODUCT]
        reason = f" ({why[0]['status']}: {_first_line(why[0].get('error') or '')})" if why else ""
        return [f"{head}: `unified` has no finished run at this budget{reason}."]
    return [_verdict(head, u, cells) for u in products]


def _verdict(head: str, u: Cell, cells: Sequence[Cell]) -> str:
    beaten_by = dominated(u, cells)
    name = f"`{u.method}`"
    if beaten_by is None:
        parts = [f"{head}: {name} **is on the frontier** (AUC {u.auc_stats[0]:.4f} with {u.params:,.0f} parameters)."]
    else:
        parts = [
            (
                f"{head}: {name} **is not on the frontier**: `{beaten_by.method}` reaches AUC "
                f"{beaten_by.auc_stats[0]:.4f} with {beaten_by.params:,.0f} parameters against its "
                f"{u.auc_stats[0]:.4f} with {u.params:,.0f}."
            )
        ]
    hashing = [c for c in cells if base_method(c.method) == BASELINE]
    if hashing:
        h = max(hashing, key=lambda c: c.auc_stats[0])
        parts.append(f"Against `{h.method}`: {compare(u, h)}.")
    others = [c for c in cells if base_method(c.method) != PRODUCT]
    if others:
        best = max(others, key=lambda c: c.auc_stats[0])
        parts.append(
            f"Against the best other method, `{best.method}` (AUC {best.auc_stats[0]:.4f}): {compare(u, best)}."
        )
        if best.auc_stats[0] > u.auc_stats[0]:  # unified behind: say what bears on why
            parts.append(_why_not(u, best, cells))
    return " ".join(parts)


def _why_not(u: Cell, best: Cell, cells: Sequence[Cell]) -> str:
    """Facts that bear on why `unified` did not win here (the report's reader, or a notes file, says more)."""
    reasons = []
    gap = difference(u, best)
    if math.isnan(gap.se):
        reasons.append("with one seed there is no error estimate, so the gap may be chance")
    elif not gap.clear:
        reasons.append("the gap is inside the seed noise, so this budget does not separate the two")
    if best.params > SAME_SIZE * u.params:
        reasons.append(f"`{best.method}` uses {best.params / u.params - 1:.0%} more parameters than `unified` here")
    collision_free = [c for c in cells if c.method == COLLISION_FREE and c.params <= SAME_SIZE * u.params]
    if collision_free:
        free = collision_free[0]
        lead = difference(free, u)
        if lead.diff > 0 and lead.clear:  # one seed (p is nan) is no evidence of a cause
            reasons.append(
                f"the collision-free `{free.method}` fits this budget ({free.params:,.0f} parameters, a row per "
                f"training value) and scores {free.auc_stats[0]:.4f}, {compare(free, u)} over `unified`: "
                "this dataset's values are few enough to have rows of their own here, so the rows `unified` "
                "shares cost accuracy instead of saving parameters"
            )
    spread = [c.auc_stats[0] for c in cells]
    if len(spread) > 2 and max(spread) - min(spread) < 0.005:
        reasons.append("all methods lie within 0.005 AUC: on this dataset the embedding is not the bottleneck")
    if not reasons:
        reasons.append("no simple cause shows in these numbers; see the collision diagnostics (`ue inspect`)")
    return "Why it does not win, as far as these numbers tell: " + "; ".join(reasons) + "."


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


# ------------------------------------------------------------------------------ grouping
def _label(run: Mapping[str, Any]) -> str:
    return method_label(run["method"], run["config"].get("method_options"))


def _setting(run: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run["config"].items() if k not in _AXES}


def load_sections(store: ResultStore, datasets: Sequence[str] | None = None) -> list[Section]:
    runs = store.runs(status=None)
    decompositions = store.decompositions()
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        if "train" in run["config"] or (datasets and run["dataset"] not in datasets):
            continue  # stream runs have a section of their own (stream_report.py)
        groups[(run["dataset"], json.dumps(_setting(run), sort_keys=True))].append(run)
    per_dataset: dict[str, list[str]] = defaultdict(list)
    for dataset, key in groups:
        per_dataset[dataset].append(key)
    sections = []
    for (dataset, key), members in sorted(groups.items()):
        setting = json.loads(key)
        label = dataset
        if len(per_dataset[dataset]) > 1:
            label += f" (setting {sorted(per_dataset[dataset]).index(key) + 1})"
        section = Section(dataset, setting, label)
        cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for run in members:
            if run["status"] == "finished":
                cells[(_label(run), run["budget"])].append(run)
                if run["fingerprint"] in decompositions:
                    item = {"method": _label(run), "budget": run["budget"], "budget_params": run["budget_params"],
                            "seed": run["seed"]}  # fmt: skip
                    section.decompositions.append(item | {"data": decompositions[run["fingerprint"]]})
            elif run["status"] == "refused":
                section.refused.append(run)
            elif run["status"] == "failed":
                section.failed.append(run)
            else:
                section.interrupted += 1
        for (method, budget), items in cells.items():
            section.cells.append(
                Cell(
                    method=method, budget=budget, budget_params=int(items[0]["budget_params"]),
                    params=float(np.mean([r["num_embedding_params"] for r in items])),
                    bytes=float(np.mean([r["num_embedding_bytes"] for r in items])),
                    auc=np.array([r["test_auc"] for r in items]), logloss=np.array([r["test_logloss"] for r in items]),
                    seconds=float(np.mean([r["wall_seconds"] or r["train_seconds"] or 0 for r in items])),
                    mixed=len({(r["package_version"], r["platform"]) for r in items}) > 1,
                )
            )  # fmt: skip
        # refused runs get their budget's resolved size from a finished run at that budget
        sizes = {c.budget: c.budget_params for c in section.cells}
        for run in section.refused + section.failed:
            run["budget_params"] = run.get("budget_params") or sizes.get(run["budget"], 0)
        section.cells.sort(key=lambda c: (c.budget_params, -c.auc_stats[0], c.method))
        sections.append(section)
    return sections


def coverage(section: Section) -> str:
    """How complete the grid is, so that a partial sweep is never read as a finished one."""
    per_seeds = Counter(cell.n for cell in section.cells)
    spread = ", ".join(f"{cells} with {seeds_text([seeds])}" for seeds, cells in sorted(per_seeds.items()))
    parts = [
        f"{sum(c.n for c in section.cells)} finished runs in {len(section.cells)} cells ({spread or 'none'})",
        f"{len(section.refused)} refused",
        f"{len(section.failed)} failed",
    ]
    if section.interrupted:
        parts.append(f"{section.interrupted} interrupted (still to finish)")
    return "Runs: " + ", ".join(parts) + "."


# ---------------------------------------------------------------------------------- plot
def plot_section(section: Section, path: str | Path) -> Path:
    """AUC against parameters (log x), one line per method with ±1 std error bars, the frontier ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    by_method: dict[str, list[Cell]] = defaultdict(list)
    for cell in section.cells:
        by_method[cell.method].append(cell)
    for method in sorted(by_method, key=lambda m: (base_method(m) != PRODUCT, m)):
        cells = sorted(by_method[method], key=lambda c: c.params)
        x = [c.params for c in cells]
        y = [c.auc_stats[0] for c in cells]
        err = [0.0 if math.isnan(c.auc_stats[1]) else c.auc_stats[1] for c in cells]
        main = base_method(method) == PRODUCT
        ax.errorbar(
            x, y, yerr=err, label=method, color=method_colour(method), marker="o" if main else ".",
            markersize=7 if main else 6, linewidth=2.6 if main else 1.3, capsize=3, zorder=3 if main else 2,
            linestyle="-" if "[" not in method else "--",
        )  # fmt: skip
    front = frontier(section.cells)
    if front:
        fx = [c.params for c in front]
        fy = [c.auc_stats[0] for c in front]
        ax.step(fx, fy, where="post", color="black", linestyle=":", linewidth=1.2, zorder=1, label="Pareto frontier")
        ax.scatter(
            fx, fy, s=170, facecolors="none", edgecolors="black", linewidths=1.3, zorder=4, label="on the frontier"
        )
    ax.set_xscale("log")
    ax.set_xlabel("embedding parameters (log scale)")
    ax.set_ylabel("test AUC (mean ± 1 std over seeds)")
    seeds = seeds_text(c.n for c in section.cells)
    ax.set_title(f"{section.label}: test AUC vs embedding size ({section.setting.get('model', '?')}, {seeds})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False, title="method")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------- report
def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def _read_notes(path: str | Path | None) -> dict[str, str]:
    """`## <dataset>` sections of a Markdown notes file, by dataset name (text inserted under that dataset;
    `## stream <dataset>` goes under the dataset's streaming results)."""
    if path is None:
        return {}
    notes: dict[str, list[str]] = {}
    current = None
    for line in Path(path).read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            notes[current] = []
        elif current is not None:
            notes[current].append(line)
    return {k: "\n".join(v).strip() for k, v in notes.items()}


def _command_lines(sweeps: list[dict[str, Any]]) -> list[str]:
    if not sweeps:
        return ["No sweep is recorded in this database (runs were added directly)."]
    by_command: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for sweep in sweeps:
        by_command[sweep["command"]].append(sweep)
    lines = []
    total = 0.0
    for command, items in by_command.items():
        seconds = sum(s["wall_seconds"] or 0.0 for s in items)
        total += seconds
        ran = sum(s["finished"] + s["refused"] + s["failed"] for s in items)
        sessions = f"{len(items)} sessions (resumed {len(items) - 1} times)" if len(items) > 1 else "1 session"
        stopped = sum(s["status"] != "finished" for s in items)
        if stopped:
            sessions += f", {stopped} of them interrupted (counted up to their last finished run)"
        lines += [
            "```",
            command,
            "```",
            (
                f"Wall time: **{_duration(seconds)}** over {sessions}, {ran} runs executed; first started "
                f"{items[0]['started_at']}, last update {items[-1]['finished_at'] or items[-1]['started_at']}."
            ),
            "",
        ]
    if len(by_command) > 1:
        busy = busy_seconds(sweeps)
        overlap = f" (their own times sum to {_duration(total)}: some ran side by side)" if total > busy + 1 else ""
        lines.append(f"Total wall time, while any sweep ran: **{_duration(busy)}**{overlap}.")
    return lines


def busy_seconds(sweeps: Sequence[Mapping[str, Any]]) -> float:
    """Seconds during which at least one sweep ran: sweeps run side by side count once."""
    starts = [datetime.fromisoformat(s["started_at"]).timestamp() for s in sweeps]
    spans = sorted((start, start + (s["wall_seconds"] or 0.0)) for start, s in zip(starts, sweeps, strict=True))
    busy, reach = 0.0, -math.inf
    for start, end in spans:
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return busy


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def _decomposition_lines(section: Section, out: Path) -> list[str]:
    items = [d for d in section.decompositions if "features" in d["data"]]
    if not items:
        return []
    energy = items[0]["data"]["summary"].get("energy", 0.9)
    lines = [
        "### Feature multiplexing: does the shared table decompose?",
        "",
        (
            "After training, each row of the shared table that training values of two or more features read (a "
            "*shared row*) is examined through the first layer of the model (every linear layer reading the "
            "embedding), which reads feature f through its own block of columns W_f. *Dominant share*: the largest "
            "feature's share of a shared row's squared norm (each feature's share is the row's projection onto the "
            f"top singular directions of its W_f holding {energy:.0%} of their energy), beside an even split. "
            "*Projection |cos|*: the cosine between the first layer's images W_f e and W_g e of one shared row e as "
            "read by two of its features, averaged over the row's feature pairs: 0 means the two uses of the row "
            "look unrelated downstream, so the model can tell them apart (the paper's decomposition); 1 means they "
            "collide for real. *Readout similarity*: the same question for a pair of features over all inputs. "
            "*Subspace overlap*: how much the features' input subspaces coincide. Each is shown beside its value "
            "for Gaussian random weights (or random subspaces) of the same shape."
        ),
        "",
        (
            "| method | budget | seed | shared rows | features per shared row | dominant share (even split) "
            "| projection \\|cos\\| (random) | readout similarity (random) | subspace overlap (random) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    items.sort(key=lambda d: (d["method"], d["budget_params"], d["seed"]))
    for d in items:
        s = defaultdict(lambda: math.nan, d["data"]["summary"])
        lines.append(
            f"| {d['method']} | {d['budget']} | {d['seed']} "
            f"| {s['shared_rows']:,} of {s['table_rows']:,} | {s['mean_tenants']:.2f} "
            f"| {s['mean_dominant_share']:.3f} ({s['even_split_share']:.3f}) "
            f"| {s['mean_projection_cosine']:.3f} ({s['mean_projection_cosine_random']:.3f}) "
            f"| {s['mean_readout_similarity']:.3f} ({s['mean_readout_similarity_random']:.3f}) "
            f"| {s['mean_overlap']:.3f} ({s['mean_overlap_random']:.3f}) |"
        )
    # the figure: the product at its median budget with shared rows (multiplexed when unified has none)
    chosen = None
    for method in (PRODUCT, "multiplexed", None):
        candidates = [
            d
            for d in items
            if (method is None or base_method(d["method"]) == method) and d["data"]["summary"]["shared_rows"]
        ]
        if candidates:
            chosen = candidates[len(candidates) // 2]
            break
    if chosen:
        name = f"{_slug(section.label)}_decomposition.png"
        plot_decomposition(
            chosen["data"],
            out / name,
            f"{section.label}: {chosen['method']} at {chosen['budget']} ({chosen['budget_params']:,} parameters)",
        )
        lines += ["", _decomposition_sentence(chosen), ""]
        lines += [f"![decomposition of {chosen['method']} at {chosen['budget']}]({name})", ""]
    return lines


def _decomposition_sentence(item: Mapping[str, Any]) -> str:
    """What the figure's numbers say, in words."""
    s = defaultdict(lambda: math.nan, item["data"]["summary"])
    cos, cos_random = s["mean_projection_cosine"], s["mean_projection_cosine_random"]
    text = (
        f"For `{item['method']}` at {item['budget']}, {s['shared_row_fraction']:.0%} of the table's rows are shared "
        f"by {s['mean_tenants']:.1f} features on average. The first layer's images of a shared row as read by two "
        f"of its features have mean |cos| {cos:.3f}"
    )
    if not (math.isfinite(cos) and math.isfinite(cos_random)):
        return text + "."
    text += f" (random weights: {cos_random:.3f}): "
    if cos < 0.2:
        text += (
            "the features see nearly orthogonal images of the rows they share, so the model can separate their "
            "collisions"
        )
    else:
        text += "the features' images of a shared row are far from orthogonal, so collisions do interfere"
    if cos < 0.8 * cos_random:
        text += ", and training made them more orthogonal than random projections are."
    elif cos > 1.25 * cos_random:
        text += ", although training made them less orthogonal than random projections are."
    else:
        text += (
            "; training kept them about as orthogonal as random projections are, so the separation comes from the "
            "width of the first layer rather than from learning."
        )
    return text


def write_report(
    results: str | Path,
    out: str | Path,
    *,
    datasets: Sequence[str] | None = None,
    command: str | None = None,
    notes: str | Path | None = None,
    name: str = "README.md",
) -> Path:
    """Write the Markdown report and its PNGs into `out`; returns the Markdown file's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(results).exists():
        raise FileNotFoundError(f"no results database at {results}")
    with ResultStore(results) as store:
        sections = load_sections(store, datasets)
        streams = stream_sections(store, datasets)
        reported = {s.dataset for s in sections} | {s.dataset for s in streams}
        # the sweeps that ran runs of the reported datasets, and only those runs' versions
        sweeps = [
            s for s in store.sweeps()
            if reported & set(s["spec"]["datasets"]) and s["finished"] + s["refused"] + s["failed"]
        ]  # fmt: skip
        finished = [r for r in store.runs(status="finished") if r["dataset"] in reported]
        if not sections and not streams:
            raise ValueError(f"{results} holds no runs" + (f" for datasets {', '.join(datasets)}" if datasets else ""))
        store.export(out / RUNS_FILE, reported)
    dataset_notes = _read_notes(notes)
    lines = ["# Embedding methods on the Pareto frontier: test AUC against parameters", ""]
    lines += ["Produced by:", ""] + _command_lines(sweeps)
    report_command = command or shlex.join(["ue", "report", "--results", str(results), "--out", str(out)])
    lines += [f"Report written by `{report_command}` at {datetime.now(UTC).isoformat(timespec='seconds')}.", ""]
    versions = sorted({(r["package_version"], r["torch_version"], r["python_version"]) for r in finished})
    if versions:
        lines.append(
            "Versions: " + "; ".join(f"unified_embedding {p}, torch {t}, Python {py}" for p, t, py in versions) + "."
        )
    platforms = sorted({r["platform"] for r in finished})
    if platforms:
        lines.append("Platform: " + "; ".join(platforms) + ".")
    lines += [
        "",
        (
            f"Every run behind this report, with its configuration, metrics and versions, is in [{RUNS_FILE}]"
            f"({RUNS_FILE}); `ue merge --results results.db {RUNS_FILE}` loads it into a results database, so "
            "that a later `ue bench` adds to these runs instead of repeating them."
        ),
        "",
        (
            "How to read it: each cell is the mean over seeds of the test AUC (higher is better) and log loss (lower "
            "is better), `mean ± std (standard error)`. *params* is the embedding's exact parameter count (what the x "
            "axis shows), *bytes* what it stores. A budget like `0.1x` is a tenth of the collisionless `full` "
            "embedding's parameters on that dataset. ★ marks the frontier at each budget: the methods no other method "
            "beats with at most their parameters. Differences are given with the standard error of the difference of "
            f"means and the p-value of Welch's t-test; a gap with p >= {CLEAR_P:g} is called noise (with three seeds a "
            "side that is a gap under about 2.8 standard errors). *s / run* is a run's mean wall time, which counts "
            "whatever else shared the machine (other runs of a `--jobs` sweep), so it compares methods only roughly."
        ),
        "",
        "Contents: "
        + ", ".join(f"[{s.label}](#{_anchor(s.label)})" for s in sections)
        + (", [streaming](#streaming-progressive-validation-in-time-order)" if streams else ""),
        "",
    ]
    for section in sections:
        lines += _section_lines(section, out, dataset_notes.get(section.dataset))
    lines += stream_lines(streams, out, dataset_notes)
    path = out / name
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _anchor(label: str) -> str:
    return "".join(ch for ch in label.lower().replace(" ", "-") if ch.isalnum() or ch in "-_")


def _section_lines(section: Section, out: Path, note: str | None) -> list[str]:
    setting = section.setting
    lines = [f"## {section.label}", ""]
    described = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(setting.items()) if k != "dataset")
    lines += [f"Setting: {described}.", "", coverage(section), ""]
    if setting.get("max_rows"):
        lines += [f"**Trained on the first {setting['max_rows']:,} rows of the dataset only.**", ""]
    if section.cells:
        plot = f"{_slug(section.label)}_auc_vs_params.png"
        plot_section(section, out / plot)
        lines += [f"![test AUC against embedding parameters on {section.label}]({plot})", ""]
    lines += ["### Is `unified` on the frontier, and by how much does it win?", ""]
    for budget in section.budgets():
        lines += [f"- {line}" for line in verdicts(section, budget)]
    lines.append("")
    if note:
        lines += ["### Notes", "", note, ""]
    lines += [
        "### Results",
        "",
        "| budget | method | params | bytes | seeds | test AUC | test log loss | s / run | frontier |",
        "|---|---|---:|---:|---:|---|---|---:|:---:|",
    ]
    for budget in section.budgets():
        cells = sorted(section.at(budget), key=lambda c: -c.auc_stats[0])
        front = {id(c) for c in frontier(cells)}
        for c in cells:
            lines.append(
                f"| {budget} | {c.method} | {c.params:,.0f} | {c.bytes:,.0f} | {c.n}{MIXED_MARK if c.mixed else ''} | "
                f"{format_stats(c.auc_stats)} | "
                f"{format_stats(c.logloss_stats)} | {c.seconds:,.1f} | {'★' if id(c) in front else ''} |"
            )
    lines.append("")
    if any(c.mixed for c in section.cells):
        lines += [
            (
                f"{MIXED_MARK}: the cell's seeds ran under more than one package version or platform ({RUNS_FILE} "
                "says which); a method's results can move between them by more than between seeds."
            ),
            "",
        ]
    if section.refused:
        lines += ["Refused (the method cannot meet the budget):", ""]
        seen = set()
        for run in sorted(section.refused, key=lambda r: (r["budget_params"], r["method"])):
            key = (run["method"], run["budget"])
            if key not in seen:
                seen.add(key)
                lines.append(f"- `{run['method']}` at {run['budget']}: {_first_line(run['error'] or '')}")
        lines.append("")
    if section.failed:
        lines += ["Failed (re-run by the next `ue bench` with the same arguments):", ""]
        for run in section.failed:
            lines.append(
                f"- `{run['method']}` at {run['budget']}, seed {run['seed']}: {_first_line(run['error'] or '')}"
            )
        lines.append("")
    lines += _decomposition_lines(section, out)
    return lines
