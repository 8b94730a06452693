"""The fast path of the delimited reader: blocks of whole lines parsed by C, in parallel.

Most files are clean: every line is a label, numbers and ids, and nothing needs wording.
For those, `_fastcsv.parse` (a small C extension built at install) turns a block of lines
straight into labels, log1p'd dense floats and hashed ids, with the GIL released, so
`parse_blocks` keeps several blocks in flight on a thread pool. A block the C parser does
not certainly understand (a bad row, a decimal dense value, a quote, ``\\r\\n``) comes back
as ``None``, and the reader parses just that block the careful way (pyarrow), so errors and
``--on-bad-rows`` behave exactly as without the fast path.

Without a C compiler at install time the extension is missing, `FAST_PARSER` is None, and
the reader uses pyarrow for everything.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from unified_embedding.data.chunk import Chunk
from unified_embedding.data.layout import TableLayout

try:
    from unified_embedding.data import _fastcsv as FAST_PARSER
except ImportError:  # built without a C compiler
    FAST_PARSER = None

_SKIP, _LABEL, _DENSE, _CATEGORICAL = 0, 1, 2, 3


@dataclass(frozen=True)
class ColumnPlan:
    """What the C parser does with each column of a file: its kind and its output position."""

    kinds: bytes  # int8 per column
    targets: bytes  # int32 per column: index among the dense or the categorical columns
    layout: TableLayout

    @classmethod
    def for_file(cls, layout: TableLayout, columns: list[str]) -> ColumnPlan | None:
        """The plan for a file with these columns, or None when the layout needs the careful reader."""
        if not fast_path_fits(layout):
            return None
        kinds = np.zeros(len(columns), dtype=np.int8)
        targets = np.zeros(len(columns), dtype=np.int32)
        position = {name: j for j, name in enumerate(columns)}
        kinds[position[layout.label]] = _LABEL
        for kind, names in ((_DENSE, layout.dense), (_CATEGORICAL, layout.categorical)):
            for j, name in enumerate(names):
                kinds[position[name]], targets[position[name]] = kind, j
        return cls(kinds.tobytes(), targets.tobytes(), layout)


def fast_path_fits(layout: TableLayout) -> bool:
    """Plain label/dense/categorical files only: lists, times and libFM tokens go through pyarrow."""
    return (
        FAST_PARSER is not None
        and sys.byteorder == "little"  # the C hash reads words little-endian
        and layout.format == "csv"
        and not layout.multivalent
        and layout.time is None
    )


def parse_blocks(
    data: mmap.mmap, start: int, plan: ColumnPlan, block_size: int, threads: int | None = None
) -> Iterator[tuple[int, int, Chunk | None]]:
    """(block start, block stop, chunk or None) for consecutive blocks of `data[start:]`, in order.

    Blocks are about `block_size` bytes of whole lines; at most two per thread are in flight.

    None means the C parser declined the block; the caller reads it the careful way.
    """
    threads = threads or max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    with ThreadPoolExecutor(threads, thread_name_prefix="ue-parse") as pool:
        in_flight: deque[tuple[int, int, Future]] = deque()
        blocks = _blocks(data, start, block_size)
        released = 0
        while True:
            while len(in_flight) < 2 * threads and (bounds := next(blocks, None)) is not None:
                in_flight.append((*bounds, pool.submit(_parse, data, *bounds, plan)))
            if not in_flight:
                return
            low, high, future = in_flight.popleft()
            yield low, high, future.result()
            # The file's pages behind every finished block leave this process (the page cache
            # keeps them), so resident memory stays at the blocks in flight, not the file.
            done = high - high % mmap.PAGESIZE
            if done > released:
                data.madvise(mmap.MADV_DONTNEED, released, done - released)
                released = done


def _blocks(data: mmap.mmap, start: int, block_size: int) -> Iterator[tuple[int, int]]:
    """Byte ranges of about `block_size` that end just after a newline (or at the end of the data)."""
    size = len(data)
    while start < size:
        newline = data.find(b"\n", min(start + block_size, size) - 1)
        stop = size if newline < 0 else newline + 1
        yield start, stop
        start = stop


def _parse(data: mmap.mmap, low: int, high: int, plan: ColumnPlan) -> Chunk | None:
    layout = plan.layout
    parsed = FAST_PARSER.parse(
        data, low, high, layout.delimiter, plan.kinds, plan.targets, len(layout.dense), len(layout.categorical),
        layout.dense_transform == "log1p", layout.quoting,
    )  # fmt: skip
    if parsed is None:
        return None
    rows, labels, dense, categorical = parsed
    by_column = np.frombuffer(categorical, dtype=np.int64).reshape(len(layout.categorical), rows)
    return Chunk(
        labels=np.frombuffer(labels, dtype=np.float32),
        dense=np.frombuffer(dense, dtype=np.float32).reshape(rows, len(layout.dense)),
        categorical={name: by_column[j] for j, name in enumerate(layout.categorical)},
        multivalent={},
        time=None,
    )
