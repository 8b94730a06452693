"""Physical line numbers for the rows of a streaming pyarrow CSV reader.

pyarrow numbers only the lines it refuses (through ``invalid_row_handler``, and only with
``use_threads=False``); the rows it returns carry no line. Every physical line is either a
returned row or a refused one (``ignore_empty_lines=False`` keeps blank lines as rows), so
row k of the file sits at ``first_line + k + (refused lines before it)``, computed here for
a whole batch at once with a binary search over the refused lines.

pyarrow parses ahead on a background thread and calls the handler from there, so the
refused lines are shared state, guarded by a lock and kept in line order.
"""

from __future__ import annotations

import bisect
import threading

import numpy as np
from pyarrow.csv import InvalidRow

from unified_embedding.data.badrows import Rejected


class LineTracker:
    """Pass `on_invalid_row` to pyarrow, then call `next_rows` for each batch in order."""

    def __init__(self, first_line: int, pyarrow_line_one: int = 1) -> None:
        """`first_line`: the line of the first row; `pyarrow_line_one`: the line pyarrow numbers 1.

        They differ by the header when pyarrow reads a whole file; a block of a file's lines
        starts at both.
        """
        self._first_line = first_line
        self._line_shift = pyarrow_line_one - 1
        self._rows = 0  # rows returned so far
        self._reported = 0  # refused lines handed back by next_rows / rest
        self._pending: list[Rejected] = []  # refused lines not yet handed back, ascending
        self._lock = threading.Lock()

    def on_invalid_row(self, row: InvalidRow) -> str:
        """pyarrow's invalid-row callback: remember the line, let pyarrow drop it."""
        reason = f"expected {row.expected_columns} columns, got {row.actual_columns}"
        with self._lock:
            bisect.insort(self._pending, Rejected(row.number + self._line_shift, reason), key=lambda r: r.line)
        return "skip"

    def next_rows(self, count: int) -> tuple[np.ndarray, list[Rejected]]:
        """Lines of the next `count` rows, and the refused lines that come before the last of them."""
        rows = np.arange(self._rows, self._rows + count, dtype=np.int64)
        with self._lock:
            pending = list(self._pending)
        refused = np.fromiter((r.line for r in pending), dtype=np.int64, count=len(pending))
        # Rows returned before refused line j: its line, less the lines before it that are refused.
        rows_before = refused - self._first_line - self._reported - np.arange(len(refused), dtype=np.int64)
        lines = self._first_line + self._reported + rows + np.searchsorted(rows_before, rows, side="right")
        passed = int(np.searchsorted(rows_before, rows[-1], side="right")) if count else 0
        with self._lock:  # lines refused meanwhile come later in the file, after these
            del self._pending[:passed]
        rejected = pending[:passed]
        self._reported += passed
        self._rows += count
        return lines, rejected

    def rest(self) -> list[Rejected]:
        """Refused lines after the last returned row (call once the reader is exhausted)."""
        with self._lock:
            rejected, self._pending = self._pending, []
        self._reported += len(rejected)
        return rejected

    @property
    def lines_seen(self) -> int:
        """Data lines accounted for so far, returned or refused."""
        with self._lock:
            return self._rows + self._reported + len(self._pending)
