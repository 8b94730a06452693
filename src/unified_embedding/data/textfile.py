"""Whole-file, vectorised field splitting for small files with multi-character separators.

pyarrow's CSV reader takes one-character delimiters; MovieLens-1M separates fields with
``::`` and its titles contain single ``:``. The MovieLens files are small (the largest,
ratings.dat, is 24 MB), so they are read whole and split with pyarrow string kernels: one
pass for lines, one for fields, no Python loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from unified_embedding.data.badrows import Problem
from unified_embedding.data.errors import BadInputError


@dataclass(frozen=True)
class Fields:
    """A file split into lines and fields.

    `columns[j]` holds field j of every line (``b""`` on lines with the wrong number of
    fields, which `wrong_count` flags); `lines` holds each line's 1-based number.
    """

    path: Path
    lines: np.ndarray
    columns: list[pa.Array]
    wrong_count: Problem


def read_fields(path: Path, separator: str, count: int) -> Fields:
    """Split `path` into `count` fields per line; ``\\r\\n`` line ends are accepted."""
    data = path.read_bytes()
    if not data:
        raise BadInputError(path, None, None, "no data rows: the file is empty")
    lines = pc.list_flatten(pc.split_pattern(pa.array([data], pa.large_binary()), "\n"))
    lines = lines.slice(0, len(lines) - data.endswith(b"\n"))  # the final line break ends a line, not starts one
    lines = pc.replace_substring_regex(lines, "\r$", "")
    parts = pc.split_pattern(lines, separator)
    counts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    offsets = parts.offsets.to_numpy()
    starts = offsets[:-1] - offsets[0]  # positions in `flat`, which begins at the first list
    flat = pc.list_flatten(parts)
    right = counts == count
    columns = [
        pc.fill_null(flat.take(pa.array(np.where(right, starts + j, 0), mask=~right)), pa.scalar(b"", flat.type))
        for j in range(count)
    ]
    wrong = Problem(~right, None, lambda i: f"expected {count} fields separated by {separator!r}, got {counts[i]}")
    return Fields(path, np.arange(1, len(lines) + 1, dtype=np.int64), columns, wrong)
