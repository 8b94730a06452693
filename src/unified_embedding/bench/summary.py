"""Statistics over seeds and method labels, one definition for every section of the report."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def mean_std_se(values: Iterable[float | None]) -> tuple[float, float, float]:
    """Mean, standard deviation (n-1) and standard error of the values given (None skipped);
    NaN spread with one value, all NaN with none."""
    array = np.asarray([v for v in values if v is not None], dtype=float)
    if len(array) == 0:
        return math.nan, math.nan, math.nan
    mean = float(array.mean())
    if len(array) < 2:
        return mean, math.nan, math.nan
    std = float(array.std(ddof=1))
    return mean, std, std / math.sqrt(len(array))


def format_stats(stats: tuple[float, float, float]) -> str:
    """`mean ± std (standard error)`, the mean alone for one seed, n/a for none."""
    mean, std, se = stats
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f} ({se:.4f})"


def method_label(method: str, options: Mapping[str, Any] | None) -> str:
    """The method with its options: `full[unseen=grow]` is a variant of its own."""
    if not options:
        return method
    return method + "[" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + "]"


def seeds_text(counts: Iterable[int]) -> str:
    """How many seeds the cells of a plot have: "3 seeds", "1 seed", or a range "1-2 seeds"."""
    counts = list(counts)
    low, high = (min(counts), max(counts)) if counts else (0, 0)
    number = str(high) if low == high else f"{low}-{high}"
    return f"{number} seed{'' if number == '1' else 's'}"
