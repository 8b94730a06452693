"""What happens to a bad row: raise at the first one, or drop and count it.

Readers check a whole chunk of rows at once and describe every failed check as a
`Problem` (a row mask plus how to word the error). `BadRowPolicy.screen` turns those into
either the error for the earliest bad line of the chunk, or a mask of rows to keep, so the
rule "raise names the first bad row; skip never loses a valid row" lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from unified_embedding.data.errors import BadInputError

OnBadRows = Literal["raise", "skip"]


@dataclass(frozen=True)
class Problem:
    """One failed check over a chunk: `rows[i]` is True where row i fails it.

    `reason(i)` words the failure for row i; it is only called for the one row that is
    reported, so it may be as slow and specific as it likes (e.g. quote the cell).
    """

    rows: np.ndarray
    column: str | None
    reason: Callable[[int], str]


@dataclass(frozen=True)
class Rejected:
    """A line the parser itself refused (wrong number of columns): it never became a row."""

    line: int
    reason: str


class BadRowPolicy:
    """Applies `on_bad_rows` to each checked chunk and counts the rows it drops."""

    def __init__(self, on_bad_rows: OnBadRows) -> None:
        if on_bad_rows not in get_args(OnBadRows):
            raise ValueError(f"on_bad_rows must be one of {get_args(OnBadRows)}, got {on_bad_rows!r}")
        self.on_bad_rows = on_bad_rows
        self.skipped = 0

    def screen(
        self,
        path: str | Path,
        lines: np.ndarray,
        problems: Sequence[Problem],
        rejected: Sequence[Rejected] = (),
    ) -> np.ndarray:
        """The mask of rows to keep, after raising for (or counting) the bad ones.

        `lines` holds the physical line of each row (ascending); `rejected` are lines the
        parser dropped in the same stretch of the file. Where one line fails several checks,
        the earlier entry of `problems` words the error, so callers list structural checks
        (field counts) before value checks.
        """
        bad = np.zeros(len(lines), dtype=bool)
        for problem in problems:
            bad |= problem.rows
        if self.on_bad_rows == "raise" and (rejected or bad.any()):
            raise self._first_error(path, lines, problems, rejected)
        self.skipped += int(bad.sum()) + len(rejected)
        return ~bad

    @staticmethod
    def _first_error(
        path: str | Path, lines: np.ndarray, problems: Sequence[Problem], rejected: Sequence[Rejected]
    ) -> BadInputError:
        # (line, rank, build): rejected lines rank first, then problems in the caller's order.
        candidates: list[tuple[int, int, Callable[[], BadInputError]]] = []
        if rejected:
            first = min(rejected, key=lambda r: r.line)
            candidates.append((first.line, -1, lambda: BadInputError(path, first.line, None, first.reason)))
        for rank, problem in enumerate(problems):
            hits = np.flatnonzero(problem.rows)
            if hits.size:
                row, line = int(hits[0]), int(lines[hits[0]])
                candidates.append(
                    (line, rank, lambda p=problem, r=row, n=line: BadInputError(path, n, p.column, p.reason(r)))
                )
        return min(candidates, key=lambda c: (c[0], c[1]))[2]()
