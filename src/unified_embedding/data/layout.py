"""`TableLayout`: what each column of a delimited file (CSV, TSV, libFM) is.

Built-in datasets and users' TOML files describe their files with the same layout, built
and checked only by `unified_embedding.data.config`, so a layout that reaches a reader is
already known to be consistent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from unified_embedding.features import FeatureKind, FeatureSet, FeatureSpec, Pooling

Format = Literal["csv", "libfm"]
DenseTransform = Literal["none", "log1p"]
TimeFormat = Literal["integer", "yymmddhh"]

TIME_FEATURES = ("hour_of_day", "weekday")  # categorical features derivable from a yymmddhh time
LIBFM_LABEL = "label"  # the name a libFM file's first token goes by


@dataclass(frozen=True)
class MultivalentColumn:
    """A column whose cells are lists joined by `separator` (``Action|Comedy``), pooled by `pooling`."""

    name: str
    separator: str
    pooling: Pooling = Pooling.SUM


@dataclass(frozen=True)
class TableLayout:
    """The columns of one delimited format and what becomes of each.

    `columns` names the columns of a file without a header (for libFM: the label, then the
    fields). `time` is a column holding an integer or ``yymmddhh`` time; `row_order_time`
    uses the row's position instead (Criteo's files are in time order but carry no time).
    `time_features` are categorical features derived from a ``yymmddhh`` time. `quoting`
    lets ``"a,b"`` be one cell; built-in formats turn it off so that a stray quote is a value.
    `origin` (a TOML path, or ``built-in dataset 'avazu'``) is quoted in errors.
    """

    origin: str
    format: Format
    delimiter: str
    header: bool
    columns: tuple[str, ...] | None
    label: str
    categorical: tuple[str, ...] = ()
    dense: tuple[str, ...] = ()
    multivalent: tuple[MultivalentColumn, ...] = ()
    dense_transform: DenseTransform = "none"
    time: str | None = None
    time_format: TimeFormat = "integer"
    time_features: tuple[str, ...] = ()
    row_order_time: bool = False
    quoting: bool = True

    @property
    def has_time(self) -> bool:
        return self.time is not None or self.row_order_time

    def roles(self) -> dict[str, str]:
        """Every column the layout reads -> the config key that names it."""
        roles = {self.label: "label"}
        roles.update({name: "dense" for name in self.dense})
        roles.update({name: "categorical" for name in self.categorical})
        roles.update({column.name: "multivalent" for column in self.multivalent})
        if self.time is not None:
            roles[self.time] = "time"
        return roles

    def features(self) -> FeatureSet:
        """The features this layout yields: dense, categorical, time-derived, multivalent, in that order."""
        return FeatureSet(
            [FeatureSpec(name, FeatureKind.DENSE) for name in self.dense]
            + [FeatureSpec(name) for name in self.categorical + self.time_features]
            + [FeatureSpec(c.name, FeatureKind.MULTIVALENT, pooling=c.pooling) for c in self.multivalent]
        )
