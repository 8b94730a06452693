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


#: standard errors a difference needs before a report calls it a win or a loss, not noise
CLEAR_SE = 2.0


def mean_difference(a: Iterable[float | None], b: Iterable[float | None]) -> tuple[float, float]:
    """Mean of a minus mean of b, and its standard error (NaN when either side has one value:
    one run says nothing about the seed noise)."""
    (ma, _, sa), (mb, _, sb) = mean_std_se(a), mean_std_se(b)
    return ma - mb, math.sqrt(sa**2 + sb**2)


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
