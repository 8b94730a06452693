"""Statistics over seeds and method labels, one definition for every section of the report."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import t as student_t


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


#: two-sided p-value of Welch's t-test below which a report calls a difference a win or a loss.
#: A fixed count of standard errors would not do: with three seeds a side the test has about
#: four degrees of freedom, and p < 0.05 takes about 2.8 standard errors, with two seeds 4.3.
CLEAR_P = 0.05


@dataclass(frozen=True)
class Difference:
    """Mean of a minus mean of b over seeds: its standard error and Welch's p (NaN when a side has one seed)."""

    diff: float
    se: float
    p: float

    @property
    def clear(self) -> bool:
        return self.p < CLEAR_P

    def p_text(self) -> str:
        return "p < 0.001" if self.p < 0.001 else f"p = {self.p:.3f}"


def mean_difference(a: Iterable[float | None], b: Iterable[float | None]) -> Difference:
    """a against b over seeds; a side with one run says nothing about the seed noise, so se and p are NaN."""
    xa, xb = (np.asarray([v for v in x if v is not None], dtype=float) for x in (a, b))
    (ma, _, sa), (mb, _, sb) = mean_std_se(xa), mean_std_se(xb)
    diff, se = ma - mb, math.sqrt(sa**2 + sb**2)
    if math.isnan(se) or se == 0:  # no spread at all: any gap is exact, no gap is none
        return Difference(diff, se, se if math.isnan(se) else float(diff == 0))
    dof = se**4 / (sa**4 / (len(xa) - 1) + sb**4 / (len(xb) - 1))  # Welch-Satterthwaite
    return Difference(diff, se, float(2 * student_t.sf(abs(diff) / se, dof)))


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
