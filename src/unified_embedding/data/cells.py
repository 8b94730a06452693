"""Vectorised conversion of raw cells (pyarrow ``binary`` arrays) into numbers and id lists.

Cells stay bytes until they are converted, so bytes that are not UTF-8 are just values in
an id column and a precise, per-cell error in a numeric one, never a decoding crash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from unified_embedding.hashing import hash_bytes

# The number syntaxes accepted, written out so that one bad cell can be found without
# converting cells one at a time. pyarrow accepts a little more (nan, inf), which are bad
# values anyway; anything these accept and pyarrow still refuses (an int64 overflow) is
# found by bisection.
_FLOAT_SYNTAX = r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"
_INT_SYNTAX = r"^-?[0-9]+$"


@dataclass(frozen=True)
class Numbers:
    """Numbers parsed from cells: `values` is 0 wherever the cell is `missing` (empty) or `invalid`."""

    values: np.ndarray
    missing: np.ndarray
    invalid: np.ndarray


def parse_floats(cells: pa.Array) -> Numbers:
    """float64 values of decimal cells (``1``, ``-2.5``, ``1e-3``; ``nan``/``inf`` parse, callers reject them)."""
    return _parse(cells, pa.float64(), _FLOAT_SYNTAX)


def parse_ints(cells: pa.Array) -> Numbers:
    """int64 values of integer cells (``-12``; no sign ``+``, no decimal point)."""
    return _parse(cells, pa.int64(), _INT_SYNTAX)


def _parse(cells: pa.Array, to: pa.DataType, syntax: str) -> Numbers:
    missing = pc.equal(pc.binary_length(cells), 0)
    present = pc.if_else(missing, pa.scalar(None, cells.type), cells)

    def convert(array: pa.Array) -> pa.Array:
        return pc.cast(pc.cast(array, pa.string()), to)

    invalid = np.zeros(len(cells), dtype=bool)
    try:
        parsed = convert(present)
    except pa.ArrowInvalid:
        # Slow path, only for a chunk that has a bad cell: a regex pass catches malformed
        # cells in bulk; bisection finds the rare well-formed cell pyarrow still refuses.
        invalid = ~pc.fill_null(pc.match_substring_regex(present, syntax), True).to_numpy(zero_copy_only=False)
        present = _null_where(present, invalid)
        rest = failing_positions(present, convert)
        invalid[rest] = True
        parsed = convert(_null_where(present, invalid))
    values = pc.fill_null(parsed, 0).to_numpy(zero_copy_only=False)
    return Numbers(values, missing.to_numpy(zero_copy_only=False), invalid)


def _null_where(array: pa.Array, mask: np.ndarray) -> pa.Array:
    return pc.if_else(pa.array(mask), pa.scalar(None, array.type), array) if mask.any() else array


def failing_positions(cells: pa.Array, convert: Callable[[pa.Array], pa.Array]) -> np.ndarray:
    """Ascending positions of the cells that make `convert` raise ``ArrowInvalid``.

    A pyarrow cast fails as a whole when one cell is bad, so halves are retried: the cost is
    about (bad cells) x log2(n) casts, not one Python call per cell.
    """
    found: list[int] = []
    stack = [(0, len(cells))]
    while stack:
        start, stop = stack.pop()
        try:
            convert(cells.slice(start, stop - start))
            continue
        except pa.ArrowInvalid:
            pass
        if stop - start == 1:
            found.append(start)
            continue
        middle = (start + stop) // 2
        stack.append((middle, stop))
        stack.append((start, middle))  # popped first: positions come out ascending
    return np.asarray(found, dtype=np.int64)


def split_lists(cells: pa.Array, separator: str) -> tuple[np.ndarray, np.ndarray]:
    """(value ids [nnz], lengths [n]) of separator-joined lists; an empty cell is an empty list.

    An empty item inside a non-empty list (``a||b``) is kept as the empty value, just as an
    empty categorical cell is its own value.
    """
    lists = pc.split_pattern(cells, separator)
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    empty = pc.equal(pc.binary_length(cells), 0).to_numpy(zero_copy_only=False)
    ids = hash_bytes(pc.list_flatten(lists))
    if empty.any():
        ids = ids[~np.repeat(empty, lengths)]
        lengths[empty] = 0
    return ids, lengths


def show(cell: bytes | str | None, limit: int = 40) -> str:
    """A cell as it would be quoted in an error message: repr, cut to `limit` characters."""
    text = repr(cell if cell is not None else b"")
    return text if len(text) <= limit else text[: limit - 3] + "..."
