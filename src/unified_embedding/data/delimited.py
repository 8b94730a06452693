"""The streaming reader for delimited files: Criteo and Avazu, libFM (Frappe), users' own CSV/TSV.

One `TableLayout` says what each column is; the file is read in blocks of `BLOCK_SIZE`
bytes, each yielded as a `Chunk` of checked, hashed rows. Memory stays at a few blocks
whatever the file size (Criteo's full file is 11 GB).

Two parsers share the work. Plain label/dense/categorical files go to the C parser of
`unified_embedding.data.fastpath`, several blocks at once; it takes only input it is sure
of. Every other block, and every other layout, goes to the careful parser: pyarrow's
streaming CSV reader with every cell as raw ``binary``, checked with vectorised
pyarrow/numpy operations, so that each bad row is named by file, line and column and
``--on-bad-rows`` applies. Both give the same chunks for the same lines.
"""

from __future__ import annotations

import dataclasses
import io
import mmap
import os
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import csv

from unified_embedding.data.badrows import BadRowPolicy, Problem, Rejected
from unified_embedding.data.cells import parse_floats, show, split_lists
from unified_embedding.data.chunk import Chunk
from unified_embedding.data.errors import BadInputError
from unified_embedding.data.fastpath import ColumnPlan, parse_blocks
from unified_embedding.data.layout import TableLayout
from unified_embedding.data.lines import LineTracker
from unified_embedding.data.timefmt import Times, parse_time
from unified_embedding.hashing import hash_bytes

# Bytes per parsed block, for both parsers. pyarrow's streaming reader keeps about 32 blocks
# read ahead, so this sets peak memory (~150 MB at 4 MiB); larger blocks measured no faster
# on Criteo. The C parser keeps two blocks per thread in flight.
BLOCK_SIZE = 4 << 20


class DelimitedReader:
    """Reads files laid out as `layout` (see `unified_embedding.data.config`)."""

    def __init__(self, layout: TableLayout) -> None:
        self.layout = layout
        self.features = layout.features()
        self.has_time = layout.has_time

    def read(self, paths: Sequence[Path], bad_rows: BadRowPolicy) -> Iterator[Chunk]:
        """Chunks of every file in turn; row-order time counts kept rows across all files."""
        position = 0
        for path in paths:
            for chunk in self._read_file(Path(path), bad_rows):
                if self.layout.row_order_time:
                    chunk = dataclasses.replace(
                        chunk, time=np.arange(position, position + chunk.num_rows, dtype=np.int64)
                    )
                position += chunk.num_rows
                yield chunk

    def _read_file(self, path: Path, bad_rows: BadRowPolicy) -> Iterator[Chunk]:
        names = self._column_names(path)
        first_line = 2 if self.layout.header else 1
        plan = ColumnPlan.for_file(self.layout, names)
        if plan is None:
            lines = yield from self._careful_chunks(path, path, names, first_line, bad_rows)
        else:
            lines = yield from self._fast_chunks(path, names, plan, first_line, bad_rows)
        if lines == 0:
            raise BadInputError(path, None, None, "no data rows")

    def _fast_chunks(
        self, path: Path, names: list[str], plan: ColumnPlan, first_line: int, bad_rows: BadRowPolicy
    ) -> Generator[Chunk, None, int]:
        """Chunks of the C parser; a block it declines is read the careful way. Returns the lines read."""
        with path.open("rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                raise BadInputError(path, None, None, "no data rows: the file is empty")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                start = 0
                if self.layout.header:  # already read by _column_names
                    newline = data.find(b"\n")
                    start = len(data) if newline < 0 else newline + 1
                line = first_line
                for low, high, chunk in parse_blocks(data, start, plan, BLOCK_SIZE):
                    if chunk is None:
                        block = pa.BufferReader(data[low:high])
                        line += yield from self._careful_chunks(path, block, names, line, bad_rows)
                    else:
                        line += chunk.num_rows
                        if chunk.num_rows:
                            yield chunk
        return line - first_line

    def _careful_chunks(
        self, path: Path, source: Path | pa.BufferReader, names: list[str], first_line: int, bad_rows: BadRowPolicy
    ) -> Generator[Chunk, None, int]:
        """Chunks of pyarrow's parser, every check worded; `source` is the file or one block of its lines.

        Returns the lines read.
        """
        tracker = LineTracker(first_line, pyarrow_line_one=1 if source is path else first_line)
        for batch in self._batches(path, source, names, tracker):
            lines, rejected = tracker.next_rows(batch.num_rows)
            chunk = self._convert(batch, path, lines, rejected, bad_rows)
            if chunk.num_rows:
                yield chunk
        bad_rows.screen(path, np.zeros(0, dtype=np.int64), [], tracker.rest())
        return tracker.lines_seen

    def _parse_options(self, tracker: LineTracker | None = None) -> csv.ParseOptions:
        return csv.ParseOptions(
            delimiter=self.layout.delimiter,
            quote_char='"' if self.layout.quoting else False,
            ignore_empty_lines=False,  # a blank line stays a (bad) row, so line numbers stay exact
            invalid_row_handler=None if tracker is None else tracker.on_invalid_row,
        )

    def _column_names(self, path: Path) -> list[str]:
        """The file's columns, from the layout or from its header (checked against the layout)."""
        if not self.layout.header:
            assert self.layout.columns is not None  # config guarantees columns when there is no header
            return list(self.layout.columns)
        with path.open("rb") as file:
            first = file.readline()
        if not first:
            raise BadInputError(path, None, None, "no data rows: the file is empty")
        try:
            names = csv.read_csv(
                io.BytesIO(first if first.endswith(b"\n") else first + b"\n"),
                read_options=csv.ReadOptions(use_threads=False),
                parse_options=self._parse_options(),
            ).column_names
        except pa.ArrowInvalid as error:
            raise BadInputError(path, 1, None, f"cannot read the header: {error}") from None
        for name, key in self.layout.roles().items():
            if name not in names:
                raise BadInputError(
                    path,
                    1,
                    name,
                    f"not in the header ({', '.join(names)}); {self.layout.origin} names it under {key!r}",
                )
            if names.count(name) > 1:
                raise BadInputError(path, 1, name, "appears more than once in the header")
        return names

    def _batches(
        self, path: Path, source: Path | pa.BufferReader, names: list[str], tracker: LineTracker
    ) -> Iterator[pa.RecordBatch]:
        needed = list(self.layout.roles())
        whole_file = source is path
        try:
            reader = csv.open_csv(
                source,
                read_options=csv.ReadOptions(
                    use_threads=False,  # pyarrow numbers refused lines only when single-threaded
                    block_size=BLOCK_SIZE,
                    column_names=None if self.layout.header and whole_file else names,
                ),
                parse_options=self._parse_options(tracker),
                convert_options=csv.ConvertOptions(
                    column_types={name: pa.binary() for name in needed}, include_columns=needed
                ),
            )
            for batch in reader:
                if batch.num_rows:
                    yield batch
        except pa.ArrowInvalid as error:
            if "Empty CSV file" in str(error):
                raise BadInputError(path, None, None, "no data rows: the file is empty") from None
            raise BadInputError(path, None, None, f"cannot parse: {error}") from None

    def _convert(
        self, batch: pa.RecordBatch, path: Path, lines: np.ndarray, rejected: list[Rejected], bad_rows: BadRowPolicy
    ) -> Chunk:
        layout = self.layout
        problems: list[Problem] = []
        labels = self._labels(batch.column(layout.label), problems)
        dense = np.zeros((batch.num_rows, len(layout.dense)), dtype=np.float32)
        for j, name in enumerate(layout.dense):
            dense[:, j] = self._dense(batch.column(name), name, problems)
        times = self._time(batch.column(layout.time), problems) if layout.time is not None else None
        if layout.format == "libfm":
            problems.extend(_libfm_token_problem(batch.column(name), name) for name in layout.categorical)
        keep = bad_rows.screen(path, lines, problems, rejected)
        if not keep.all():
            batch = batch.filter(pa.array(keep))
            labels, dense = labels[keep], dense[keep]
        categorical = {name: hash_bytes(self._ids(batch.column(name))) for name in layout.categorical}
        if times is not None:
            categorical.update({name: ids[keep] for name, ids in times.features.items()})
        return Chunk(
            labels=labels,
            dense=dense,
            categorical=categorical,
            multivalent={c.name: split_lists(batch.column(c.name), c.separator) for c in layout.multivalent},
            time=None if times is None else times.values[keep],
        )

    def _labels(self, cells: pa.Array, problems: list[Problem]) -> np.ndarray:
        numbers = parse_floats(cells)
        libfm = self.layout.format == "libfm"
        positive = numbers.values == 1.0
        negative = (numbers.values == 0.0) | (libfm & (numbers.values == -1.0))
        allowed = "1 or -1" if libfm else "0 or 1"
        bad = numbers.invalid | numbers.missing | ~(positive | negative)
        problems.append(Problem(bad, self.layout.label, lambda i: f"label {show(cells[i].as_py())} is not {allowed}"))
        return positive.astype(np.float32)

    def _dense(self, cells: pa.Array, name: str, problems: list[Problem]) -> np.ndarray:
        """float values of a dense column; an empty cell is missing, read as 0."""
        numbers = parse_floats(cells)
        bad = numbers.invalid | ~np.isfinite(numbers.values)
        problems.append(Problem(bad, name, lambda i: f"{show(cells[i].as_py())} is not a finite number"))
        values = numbers.values
        if self.layout.dense_transform == "log1p":
            # Counts span orders of magnitude; log1p tames them. Negatives (Criteo I2 has a
            # few) have no log and stay as they are.
            values = np.where(values >= 0, np.log1p(np.maximum(values, 0)), values)
        return values

    def _time(self, cells: pa.Array, problems: list[Problem]) -> Times:
        layout = self.layout
        times = parse_time(cells, layout.time_format, layout.time_features)
        kind = "an integer" if layout.time_format == "integer" else "a valid yymmddhh date-hour"
        problems.append(Problem(times.invalid, layout.time, lambda i: f"time {show(cells[i].as_py())} is not {kind}"))
        return times

    def _ids(self, cells: pa.Array) -> pa.Array:
        """The raw bytes that name a categorical value: the whole cell, or libFM's index before ':'."""
        if self.layout.format != "libfm":
            return cells
        return pc.list_element(pc.split_pattern(cells, ":", max_splits=1), 0)


def _libfm_token_problem(cells: pa.Array, name: str) -> Problem:
    colon = pc.find_substring(cells, ":").to_numpy(zero_copy_only=False)
    return Problem(colon < 1, name, lambda i: f"{show(cells[i].as_py())} is not an index:value pair")
