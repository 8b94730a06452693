"""`load_dataset`: a built-in dataset or a user's TOML-described file, parsed once, then cached."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from unified_embedding.data.badrows import BadRowPolicy, OnBadRows
from unified_embedding.data.cache import CacheWriter, cache_key, open_cache
from unified_embedding.data.chunk import Reader
from unified_embedding.data.config import load_config
from unified_embedding.data.dataset import CTRData
from unified_embedding.data.delimited import DelimitedReader
from unified_embedding.data.errors import BadInputError
from unified_embedding.data.registry import DATASETS

_HOME_CACHE = Path("~/.cache/unified_embedding")


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """Where dataset folders live: the argument, else ``$UE_DATA_DIR``, else ``~/.cache/unified_embedding``."""
    chosen = data_dir if data_dir is not None else os.environ.get("UE_DATA_DIR") or _HOME_CACHE
    return Path(chosen).expanduser()


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """Where parsed columns are cached: the argument, else ``$UE_CACHE_DIR``, else ``~/.cache/unified_embedding/cache``.

    Separate from the data directory, which may be read-only (a shared mount).
    """
    chosen = cache_dir if cache_dir is not None else os.environ.get("UE_CACHE_DIR") or _HOME_CACHE / "cache"
    return Path(chosen).expanduser()


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    on_bad_rows: OnBadRows = "raise",
    cache_dir: str | Path | None = None,
) -> CTRData:
    """Load a dataset by built-in name (see `DATASETS`) or from a TOML file describing the user's data.

    `data_dir` locates built-in datasets only; a TOML file names its own files, relative to
    itself. The first load parses the files and writes the columnar cache; later loads of
    unchanged files map the cache and parse nothing. `on_bad_rows="raise"` stops at the first bad row
    with a `BadInputError` naming file, line and column; ``"skip"`` drops bad rows and counts
    them in `CTRData.bad_rows_skipped` (the count is part of the cache key, like the mode).
    """
    BadRowPolicy(on_bad_rows)  # reject a wrong mode before any work
    if str(name).endswith(".toml"):
        user = load_config(name)
        dataset, reader, paths = user.name, DelimitedReader(user.layout), list(user.paths)
        identity = f"{user.name}\n{user.text}"
    elif name in DATASETS:
        info = DATASETS[name]
        root = resolve_data_dir(data_dir)
        found = info.find(root)
        if found is None:
            wanted = "; ".join(" or ".join(names) for names in info.candidates)
            raise FileNotFoundError(
                f"dataset {name!r} not found: expected {wanted} in {root / info.folder} "
                "(set --data-dir / $UE_DATA_DIR, or run `ue datasets download NAME`)"
            )
        dataset, identity, reader, paths = name, name, info.reader, found
    else:
        raise ValueError(f"unknown dataset {name!r}: known are {', '.join(DATASETS)}, or a path to a .toml file")
    folder = resolve_cache_dir(cache_dir) / cache_key(dataset, identity, paths, on_bad_rows)
    data = open_cache(folder)
    if data is None:
        _parse_into(folder, dataset, reader, paths, on_bad_rows)
        data = open_cache(folder)
        assert data is not None  # just written and committed
    return data


def _parse_into(folder: Path, name: str, reader: Reader, paths: Sequence[Path], on_bad_rows: OnBadRows) -> None:
    policy = BadRowPolicy(on_bad_rows)
    with CacheWriter(folder, reader.features, reader.has_time) as writer:
        for chunk in reader.read(paths, policy):
            writer.append(chunk)
        if writer.num_rows == 0:
            raise BadInputError(paths[0], None, None, f"no valid rows: all {policy.skipped} data rows were bad")
        writer.commit(name, [str(p) for p in paths], policy.skipped)
