"""The columnar cache: each column a raw little-endian file, memory-mapped on later loads.

Parsing Criteo's text takes minutes; mapping its columns takes milliseconds. The first load
streams chunks into a temporary folder (bounded memory, one append per column per chunk)
and renames it into place only once complete, so a parse that is killed or fails leaves no
cache that a later load could mistake for a whole one. The folder name is a digest of
everything the parsed columns depend on (`cache_key`), so changed inputs never reuse a
stale cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

import numpy as np

from unified_embedding.data.chunk import Chunk
from unified_embedding.data.dataset import CTRData
from unified_embedding.features import FeatureKind, FeatureSet

# Bump whenever a reader's output changes for the same input files, so old caches are not reused.
READER_VERSION = 1
_META = "meta.json"
_FLOAT = np.dtype("<f4")
_INT = np.dtype("<i8")


def cache_key(name: str, identity: str, sources: Sequence[Path], on_bad_rows: str) -> str:
    """Folder name for a parse of `sources` by the reader `identity` names (a dataset name, or a TOML's text).

    Sizes and modification times stand in for the files' content: hashing 11 GB on every
    load would cost as much as parsing it.
    """
    stats = [(str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in sources]
    blob = json.dumps([READER_VERSION, identity, stats, on_bad_rows])
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40]
    return f"{slug}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}"


class CacheWriter:
    """Appends `Chunk`s to column files in a temporary folder; `commit` moves it to `folder`.

    Use as a context manager: leaving the block by an exception deletes the temporary folder.
    """

    def __init__(self, folder: Path, features: FeatureSet, has_time: bool) -> None:
        self.folder = folder
        self.features = features
        self.num_rows = 0
        self._tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self._tmp.mkdir(parents=True)
        self._files: dict[str, BinaryIO] = {}
        self._nnz = {f.name: 0 for f in features if f.kind is FeatureKind.MULTIVALENT}
        self._layout = _file_names(features, has_time)
        for name in self._layout.values():
            self._files[name] = (self._tmp / name).open("wb")
        for feature in self._nnz:
            np.zeros(1, dtype=_INT).tofile(self._files[self._layout[f"offsets:{feature}"]])

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is not None:
            self._close()
            shutil.rmtree(self._tmp, ignore_errors=True)

    def append(self, chunk: Chunk) -> None:
        files, layout = self._files, self._layout
        chunk.labels.astype(_FLOAT, copy=False).tofile(files[layout["labels"]])
        np.ascontiguousarray(chunk.dense, dtype=_FLOAT).tofile(files[layout["dense"]])
        for name, ids in chunk.categorical.items():
            ids.astype(_INT, copy=False).tofile(files[layout[f"categorical:{name}"]])
        for name, (values, lengths) in chunk.multivalent.items():
            values.astype(_INT, copy=False).tofile(files[layout[f"values:{name}"]])
            (self._nnz[name] + np.cumsum(lengths, dtype=np.int64)).astype(_INT, copy=False).tofile(
                files[layout[f"offsets:{name}"]]
            )
            self._nnz[name] += int(lengths.sum())
        if "time" in layout:
            chunk.time.astype(_INT, copy=False).tofile(files[layout["time"]])
        self.num_rows += chunk.num_rows

    def commit(self, name: str, sources: Sequence[str], bad_rows_skipped: int) -> None:
        """Write the metadata last and rename the folder into place (replacing a stale one)."""
        for file in self._files.values():
            file.flush()
            os.fsync(file.fileno())
        self._close()
        meta = {
            "reader_version": READER_VERSION,
            "name": name,
            "num_rows": self.num_rows,
            "nnz": self._nnz,
            "features": self.features.to_config(),
            "files": self._layout,
            "bad_rows_skipped": bad_rows_skipped,
            "sources": list(sources),
        }
        (self._tmp / _META).write_text(json.dumps(meta, indent=1))
        try:
            os.rename(self._tmp, self.folder)
        except OSError:  # the folder exists: a concurrent load won, or an unreadable cache is being replaced
            old = self.folder.parent / f".{self.folder.name}.old-{secrets.token_hex(4)}"
            os.rename(self.folder, old)
            os.rename(self._tmp, self.folder)
            shutil.rmtree(old, ignore_errors=True)

    def _close(self) -> None:
        for file in self._files.values():
            file.close()


def _file_names(features: FeatureSet, has_time: bool) -> dict[str, str]:
    """Column -> file name; files are numbered, not named after features, whose names may be any string."""
    names = {"labels": "labels.f32", "dense": "dense.f32"}
    for i, feature in enumerate(features):
        if feature.kind is FeatureKind.CATEGORICAL:
            names[f"categorical:{feature.name}"] = f"categorical-{i}.i64"
        elif feature.kind is FeatureKind.MULTIVALENT:
            names[f"values:{feature.name}"] = f"values-{i}.i64"
            names[f"offsets:{feature.name}"] = f"offsets-{i}.i64"
    if has_time:
        names["time"] = "time.i64"
    return names


class _Incomplete(Exception):
    """A cache file is missing or has the wrong size (e.g. deleted by hand): rebuild the cache."""


def open_cache(folder: Path) -> CTRData | None:
    """The cached dataset, memory-mapped read-only; None if there is no complete cache here."""
    try:
        meta = json.loads((folder / _META).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if meta.get("reader_version") != READER_VERSION:
        return None
    features = FeatureSet.from_config(meta["features"])
    n, files = meta["num_rows"], meta["files"]
    try:
        return CTRData(
            name=meta["name"],
            features=features,
            labels=_map(folder / files["labels"], _FLOAT, (n,)),
            dense=_map(folder / files["dense"], _FLOAT, (n, len(features.dense))),
            categorical={
                f.name: _map(folder / files[f"categorical:{f.name}"], _INT, (n,))
                for f in features
                if f.kind is FeatureKind.CATEGORICAL
            },
            multivalent={
                name: (
                    _map(folder / files[f"values:{name}"], _INT, (nnz,)),
                    _map(folder / files[f"offsets:{name}"], _INT, (n + 1,)),
                )
                for name, nnz in meta["nnz"].items()
            },
            time=_map(folder / files["time"], _INT, (n,)) if "time" in files else None,
            bad_rows_skipped=meta["bad_rows_skipped"],
            sources=meta["sources"],
        )
    except _Incomplete:
        return None


def _map(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only plain-ndarray view of a memory-mapped column file."""
    expected = int(np.prod(shape)) * dtype.itemsize
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _Incomplete(path) from None
    if size != expected:
        raise _Incomplete(path)
    if expected == 0:  # mmap cannot map an empty file
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape).view(np.ndarray)
