"""Dataset layouts from TOML (users' own files) or from dicts (built-ins), checked in one place.

A user's file is described by a ``[data]`` table::

    [data]
    path = "clicks.tsv"        # or a list of files, read in order; relative to this TOML's folder
    format = "csv"             # csv | libfm
    delimiter = "\\t"
    header = true              # or false with columns = [...]
    label = "click"            # 0/1
    categorical = ["user", "ad"]
    dense = ["price"]
    dense_transform = "none"   # or "log1p"
    time = "ts"                # optional integer time, for time splits
    [data.multivalent]
    tags = { separator = "|", pooling = "mean" }

Optional too: ``name`` (default: the TOML file's stem), ``time_format = "yymmddhh"`` with
``time_features = ["hour_of_day", "weekday"]`` (Avazu-style date-hours), ``row_order_time =
true`` (rows are in time order but carry no time), ``quoting = false`` (``"`` is an ordinary
character; default true). Columns not named are not read.

A libFM file is described by ``format = "libfm"`` and ``fields = [...]``, one name per
``index:value`` token (the value id is the index; labels are 1 and -1 or 0).

Every mistake is a `ConfigError` naming the TOML file and the key. A column missing from a
file's header can only be seen when the file is opened, and is reported then.
"""

from __future__ import annotations

import tomllib
from collections import Counter
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from unified_embedding.data.errors import ConfigError
from unified_embedding.data.layout import (
    LIBFM_LABEL,
    TIME_FEATURES,
    DenseTransform,
    Format,
    MultivalentColumn,
    TableLayout,
    TimeFormat,
)
from unified_embedding.features import FeatureError, Pooling

_CSV_KEYS = {
    "format", "delimiter", "header", "columns", "label", "categorical", "dense", "multivalent",
    "dense_transform", "time", "time_format", "time_features", "row_order_time", "quoting",
}  # fmt: skip
_LIBFM_KEYS = {"format", "fields"}
_FILE_KEYS = {"name", "path"}
_MULTIVALENT_KEYS = {"separator", "pooling"}
_TOML_TYPES = {str: "string", bool: "boolean", list: "list", dict: "table"}


@dataclass(frozen=True)
class UserDataset:
    """A dataset described by a TOML file: its name, files, layout, and the TOML text (the cache key)."""

    name: str
    paths: tuple[Path, ...]
    layout: TableLayout
    text: str


def load_config(path: str | Path) -> UserDataset:
    """Read and check a TOML dataset description."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        document = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(path, "-", "no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(path, "-", f"not valid TOML: {error}") from None
    table = _Table(document, path, "")
    data = table.table("data", required=True)
    name = data.get("name", str, default=path.stem)
    paths = tuple(path.parent / p for p in data.strings("path", allow_single=True, required=True))
    for file in paths:
        if not file.is_file():
            raise data.error("path", f"no such file: {file}")
    layout = table_layout(
        {k: v for k, v in data.items.items() if k not in _FILE_KEYS}, path, prefix="data", extra=_FILE_KEYS
    )
    return UserDataset(name, paths, layout, text)


def table_layout(
    config: Mapping[str, Any], origin: str | Path, *, prefix: str = "", extra: AbstractSet[str] = frozenset()
) -> TableLayout:
    """A checked `TableLayout` from its dict form (keys as in the TOML ``[data]`` table).

    `extra` are keys the caller has already handled (so they are not reported as unknown).
    """
    table = _Table(config, origin, prefix)
    file_format: Format = table.choice("format", Format, default="csv")
    table.check_keys((_CSV_KEYS if file_format == "csv" else _LIBFM_KEYS) | extra)
    layout = _libfm_layout(table) if file_format == "libfm" else _csv_layout(table)
    _check_roles(layout, table)
    try:
        layout.features()
    except FeatureError as error:
        raise table.error("categorical", str(error)) from None
    return layout


def _libfm_layout(table: _Table) -> TableLayout:
    fields = table.names("fields", required=True)
    if not fields:
        raise table.error("fields", "a libFM layout needs at least one field")
    if LIBFM_LABEL in fields:
        raise table.error("fields", f"{LIBFM_LABEL!r} is the libFM label; give the field another name")
    return TableLayout(
        origin=str(table.origin), format="libfm", delimiter=" ", header=False, columns=(LIBFM_LABEL, *fields),
        label=LIBFM_LABEL, categorical=fields, quoting=False,
    )  # fmt: skip


def _csv_layout(table: _Table) -> TableLayout:
    delimiter = table.get("delimiter", str, default=",")
    if len(delimiter) != 1 or delimiter in "\r\n":
        raise table.error("delimiter", f"must be one character other than a line break, got {delimiter!r}")
    header = table.get("header", bool, default=True)
    columns = table.names("columns") if "columns" in table.items else None
    if header and columns is not None:
        raise table.error(
            "columns", "header = true takes the column names from the file; drop columns or set header = false"
        )
    if not header and columns is None:
        raise table.error("columns", "required when header = false")
    time_format: TimeFormat = table.choice("time_format", TimeFormat, default="integer")
    time_features = table.names("time_features")
    time = table.get("time", str, default=None)
    for name in time_features:
        if name not in TIME_FEATURES:
            raise table.error("time_features", f"unknown {name!r}; known: {', '.join(TIME_FEATURES)}")
    if time_features and (time is None or time_format != "yymmddhh"):
        raise table.error("time_features", 'needs a time column with time_format = "yymmddhh"')
    row_order_time = table.get("row_order_time", bool, default=False)
    if row_order_time and time is not None:
        raise table.error("row_order_time", "a layout has either a time column or row-order time, not both")
    return TableLayout(
        origin=str(table.origin),
        format="csv",
        delimiter=delimiter,
        header=header,
        columns=columns,
        label=table.get("label", str, required=True),
        categorical=table.names("categorical"),
        dense=table.names("dense"),
        multivalent=_multivalent(table, delimiter),
        dense_transform=table.choice("dense_transform", DenseTransform, default="none"),
        time=time,
        time_format=time_format,
        time_features=time_features,
        row_order_time=row_order_time,
        quoting=table.get("quoting", bool, default=True),
    )


def _multivalent(table: _Table, delimiter: str) -> tuple[MultivalentColumn, ...]:
    if "multivalent" not in table.items:
        return ()
    columns = []
    group = table.table("multivalent")
    for name in group.items:
        entry = group.table(name)
        entry.check_keys(_MULTIVALENT_KEYS)
        separator = entry.get("separator", str, required=True)
        if not separator or separator == delimiter or separator in "\r\n":
            raise entry.error("separator", f"must be non-empty and differ from the delimiter, got {separator!r}")
        columns.append(MultivalentColumn(name, separator, Pooling(entry.choice("pooling", Pooling, default="sum"))))
    return tuple(columns)


def _check_roles(layout: TableLayout, table: _Table) -> None:
    """Each column has one role; every column named exists (when names are known up front)."""
    seen: dict[str, str] = {}
    named = [
        (layout.label, "label"),
        *((n, "dense") for n in layout.dense),
        *((n, "categorical") for n in layout.categorical),
    ]
    named += [(c.name, "multivalent") for c in layout.multivalent]
    named += [(layout.time, "time")] if layout.time is not None else []
    named += [(n, "time_features") for n in layout.time_features]
    for name, key in named:
        if name in seen:
            raise table.error(key, f"{name!r} is already used by {_key(table, seen[name])}")
        seen[name] = key
        if key != "time_features" and layout.columns is not None and name not in layout.columns:
            raise table.error(key, f"unknown column {name!r}; columns are {', '.join(layout.columns)}")
    if not (layout.categorical or layout.multivalent or layout.time_features):
        raise table.error("categorical", "at least one categorical or multivalent column is needed")


def _key(table: _Table, key: str) -> str:
    return f"{table.prefix}.{key}" if table.prefix else key


class _Table:
    """Typed access to one TOML table, every failure a ConfigError naming origin and dotted key."""

    def __init__(self, items: Mapping[str, Any], origin: str | Path, prefix: str) -> None:
        self.items, self.origin, self.prefix = items, origin, prefix

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.origin, _key(self, key), reason)

    def check_keys(self, allowed: set[str]) -> None:
        for key in self.items:
            if key not in allowed:
                raise self.error(key, f"unknown key; known keys: {', '.join(sorted(allowed))}")

    def get(self, key: str, kind: type | tuple[type, ...], *, default: Any = None, required: bool = False) -> Any:
        if key not in self.items:
            if required:
                raise self.error(key, "required key is missing")
            return default
        value = self.items[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            expected = " or ".join(_TOML_TYPES[k] for k in kinds)
            raise self.error(key, f"must be a {expected}, got {value!r}")
        return value

    def choice(self, key: str, allowed: Any, *, default: str) -> Any:
        values = [member.value for member in allowed] if isinstance(allowed, type) else list(get_args(allowed))
        value = self.get(key, str, default=default)
        if value not in values:
            raise self.error(key, f"must be one of {', '.join(values)}, got {value!r}")
        return value

    def strings(self, key: str, *, allow_single: bool = False, required: bool = False) -> tuple[str, ...]:
        value = self.get(key, (list, str) if allow_single else list, default=[], required=required)
        values = [value] if isinstance(value, str) else value
        if not all(isinstance(v, str) and v for v in values):
            raise self.error(key, f"must be a list of non-empty strings, got {value!r}")
        if required and not values:
            raise self.error(key, "must not be empty")
        return tuple(values)

    def names(self, key: str, *, required: bool = False) -> tuple[str, ...]:
        names = self.strings(key, required=required)
        duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
        if duplicates:
            raise self.error(key, f"names listed twice: {', '.join(duplicates)}")
        return names

    def table(self, key: str, *, required: bool = False) -> _Table:
        value = self.get(key, dict, default={}, required=required)
        return _Table(value, self.origin, _key(self, key))
