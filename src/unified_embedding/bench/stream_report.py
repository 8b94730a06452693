"""The report's streaming section (`ue bench --protocol stream`): per-window AUC over time, and
the new-id table that tests the paper's dynamic-data claim.

Per dataset and budget: one line per method variant of the seeds' mean AUC per window
(time on x), a table of overall and new-id AUC and log loss (mean ± std (standard error)
over seeds), and the answer to "does `unified` beat `full` with an OOV row on examples
whose ids were new?", with the difference's standard error.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from unified_embedding.bench.colours import method_colour
from unified_embedding.bench.store import ResultStore
from unified_embedding.bench.summary import (
    format_stats,
    mean_difference,
    mean_std_se,
    method_label,
    seeds_text,
)

PRODUCT = "unified"
#: the vocabulary baseline the claim is about: `full` as built, unseen ids on one OOV row
OOV_BASELINE = "full"


def pm(values: Sequence[float | None]) -> str:
    return format_stats(mean_std_se(values))


@dataclass
class StreamSection:
    dataset: str
    budget: str
    setting: dict[str, Any]
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))  # label -> stream.json


def stream_sections(store: ResultStore, datasets: Sequence[str] | None = None) -> list[StreamSection]:
    sections: dict[tuple[str, str], StreamSection] = {}
    for run in store.runs(status="finished"):
        if "train" not in run["config"] or (datasets and run["dataset"] not in datasets):
            continue
        config, train = run["config"], run["config"]["train"]
        setting = {"model": train["model"], "window": config["window"], "warmup": config["warmup"],
                   "batch_size": train["batch_size"], "max_rows": train.get("max_rows")}  # fmt: skip
        key = (run["dataset"], run["budget"])
        section = sections.setdefault(key, StreamSection(run["dataset"], run["budget"], setting))
        section.runs[method_label(train["method"], train.get("method_options"))].append(run["result"])
    return [sections[key] for key in sorted(sections)]


def _window_times(results: list[dict[str, Any]]) -> tuple[list[Any], str]:
    """x values of the windows: dates when the stream's times are unix seconds, else window numbers."""
    windows = results[0]["windows"]
    if windows and "last_time" in windows[0] and windows[0]["last_time"] > 10**8:
        return [datetime.fromtimestamp(w["last_time"], UTC) for w in windows], "end of window (UTC date)"
    return [w["window"] for w in windows], "window (time order)"


def plot_windows(section: StreamSection, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    for name in sorted(section.runs, key=lambda m: (not m.startswith(PRODUCT), m)):
        results = section.runs[name]
        x, xlabel = _window_times(results)
        per_window = np.array([[w["auc"] if w["auc"] is not None else np.nan for w in r["windows"]] for r in results])
        mean = np.nanmean(per_window, axis=0)
        main = name == PRODUCT
        ax.plot(x, mean, label=name, color=method_colour(name), linewidth=2.6 if main else 1.4,
                linestyle="--" if "[" in name else "-", marker="o" if main else ".")  # fmt: skip
        if len(results) > 1:
            std = np.nanstd(per_window, axis=0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, color=method_colour(name), alpha=0.12)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("window AUC (mean over seeds, ±1 std shaded)")
    seeds = seeds_text(len(r) for r in section.runs.values())
    ax.set_title(f"{section.dataset}, budget {section.budget}: progressive validation per window ({seeds})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False, title="method")
    fig.autofmt_xdate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def verdict_lines(section: StreamSection) -> list[str]:
    runs = section.runs
    if PRODUCT not in runs:
        return [f"- `{PRODUCT}` was not streamed at this budget."]
    lines = []
    for other in sorted(set(runs) - {PRODUCT}):
        parts = []
        for key, examples in (("new_auc", "new-id"), ("cold_auc", "cold-id"), ("auc", "all")):
            d = mean_difference([r[key] for r in runs[PRODUCT]], [r[key] for r in runs[other]])
            if math.isnan(d.se):
                side = "ahead of" if d.diff > 0 else "behind"
                parts.append(f"on {examples} examples it is {side} it ({d.diff:+.4f} AUC; one seed: no error estimate)")
                continue
            call = ("beats" if d.diff > 0 else "loses to") if d.clear else "ties with"
            parts.append(
                f"on {examples} examples it {call} it ({d.diff:+.4f} AUC, standard error {d.se:.4f}, {d.p_text()})"
            )
        lines.append(f"- `{PRODUCT}` against `{other}`: " + "; ".join(parts) + ".")
    if OOV_BASELINE not in runs:
        lines.append(f"- `{OOV_BASELINE}` with an OOV row was not streamed, so the paper's claim is not tested here.")
    return lines


def stream_lines(sections: Sequence[StreamSection], out: Path, notes: Mapping[str, str] | None = None) -> list[str]:
    """The streaming section; `notes["stream <dataset>"]`, if any, goes under the dataset's first budget."""
    if not sections:
        return []
    lines = [
        "## Streaming: progressive validation in time order",
        "",
        (
            "Each window of the stream is predicted before the model trains on it, once, in time order (`ue stream`). "
            "*AUC* is over every scored example; *new-id AUC* over the examples that carry at least one (feature, id) "
            "the stream had not shown before their window; *cold-id AUC* over those with one the warm-up never showed "
            "(what `full` maps to its OOV row, however often seen since). The warm-up (the stream's first part) only "
            "trains, and is "
            "all `full` learns its vocabulary from; `full[unseen=grow]` gives each new id a row of its own as it "
            "arrives, so its size grows past the budget (params is its size at the end)."
        ),
        "",
    ]
    noted: set[str] = set()
    for section in sections:
        note = (notes or {}).get(f"stream {section.dataset}")
        if note and section.dataset not in noted:
            noted.add(section.dataset)
            lines += [f"### Notes on {section.dataset}", "", note, ""]
        title = f"{section.dataset}, budget {section.budget}"
        setting = ", ".join(f"{k}={v}" for k, v in section.setting.items() if v is not None)
        lines += [f"### {title}", "", f"Setting: {setting}.", ""]
        plot = f"stream_{section.dataset}_{section.budget}.png".replace("/", "_")
        plot_windows(section, out / plot)
        lines += [f"![window AUC over time on {title}]({plot})", ""]
        lines += verdict_lines(section) + [""]
        lines += [
            "| method | params at end | seeds | AUC | log loss | new-id AUC | new-id share | cold-id AUC | cold-id share |",
            "|---|---:|---:|---|---|---|---:|---|---:|",
        ]
        for name in sorted(section.runs, key=lambda m: -mean_std_se([r["new_auc"] for r in section.runs[m]])[0]):
            results = section.runs[name]
            new_share = np.mean([r["new_examples"] / r["examples"] for r in results])
            cold_share = np.mean([r["cold_examples"] / r["examples"] for r in results])
            params = np.mean([r["num_embedding_params"] for r in results])
            lines.append(
                f"| {name} | {params:,.0f} | {len(results)} | {pm([r['auc'] for r in results])} | "
                f"{pm([r['logloss'] for r in results])} | {pm([r['new_auc'] for r in results])} | {new_share:.1%} | "
                f"{pm([r['cold_auc'] for r in results])} | {cold_share:.1%} |"
            )
        lines.append("")
    return lines
