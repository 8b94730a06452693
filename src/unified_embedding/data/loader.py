"""`BatchLoader`: mini-batches of chosen rows as `Batch`es, in file order or a per-epoch shuffle."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from queue import Empty, Queue

import numpy as np
import torch

from unified_embedding.batch import Batch
from unified_embedding.data.dataset import CTRData
from unified_embedding.data.jagged import gather_jagged


class BatchLoader:
    """Batches of `rows` of `data`, `batch_size` rows each (the last one may be smaller).

    With `shuffle`, epoch e visits the rows in ``np.random.default_rng([seed, epoch])``
    order: the order is a pure function of (seed, epoch), so a run resumed mid-epoch with
    ``batches(epoch, start=k)`` sees exactly the batches it would have seen.
    """

    def __init__(
        self, data: CTRData, rows: np.ndarray, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> None:
        rows = np.asarray(rows)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= data.num_rows):
            raise ValueError(f"rows must lie in [0, {data.num_rows}), got [{rows.min()}, {rows.max()}]")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.data = data
        self.rows = rows.astype(np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed

    def __len__(self) -> int:
        return (len(self.rows) + self.batch_size - 1) // self.batch_size

    def batches(self, epoch: int = 0, start: int = 0, *, prefetch: int = 0) -> Iterator[Batch]:
        """The batches of `epoch`, from batch number `start` on (earlier ones are not built).

        `prefetch=N` builds up to N batches ahead on a background thread (the gathers run in
        numpy, which releases the GIL), so the model need not wait for its data; the batches
        and their order are the same.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        built = (self.batch_of(rows) for rows in self.batch_rows(epoch, start))
        return _ahead(built, prefetch) if prefetch else built

    def batch_rows(self, epoch: int = 0, start: int = 0) -> Iterator[np.ndarray]:
        """The rows of each batch `batches(epoch, start)` yields, in order (sharded training splits them)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.rows) if self.shuffle else self.rows
        for first in range(start * self.batch_size, len(order), self.batch_size):
            yield order[first : first + self.batch_size]

    def batch_of(self, rows: np.ndarray) -> Batch:
        """One `Batch` of `rows`: sparse features in `features.sparse_names` order, KJT layout."""
        data = self.data
        values, lengths = [], []
        for name in data.features.sparse_names:
            if name in data.categorical:
                values.append(data.categorical[name][rows])
                lengths.append(np.ones(len(rows), dtype=np.int64))
            else:
                ids, counts = gather_jagged(*data.multivalent[name], rows)
                values.append(ids)
                lengths.append(counts)
        return Batch(
            keys=data.features.sparse_names,
            values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
            dense=torch.from_numpy(np.ascontiguousarray(data.dense[rows], dtype=np.float32)),
            labels=torch.from_numpy(np.ascontiguousarray(data.labels[rows], dtype=np.float32)),
        )


_DONE = object()


def _ahead(items: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """`items`, produced by a daemon thread up to `depth` ahead; its errors re-raised here, in order."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                queue.put(item)
            queue.put(_DONE)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            queue.put(error)

    worker = threading.Thread(target=produce, daemon=True, name="ue-batch-prefetch")
    worker.start()
    try:
        while (item := queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(Empty):
                queue.get_nowait()
            worker.join(timeout=0.01)
