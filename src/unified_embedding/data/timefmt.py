"""Time columns: their integer order key, and categorical features derived from a date-hour.

Every time becomes an int64 whose order is the data's time order (what a time split needs).
A ``yymmddhh`` cell (Avazu's ``hour``) becomes seconds since 1970-01-01 UTC and can also
give ``hour_of_day`` and ``weekday`` features, so a model sees daily and weekly cycles that
a raw hour id (unique per hour) cannot carry to a later test period.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from unified_embedding.data.cells import parse_ints
from unified_embedding.data.layout import TimeFormat
from unified_embedding.hashing import hash_bytes

_WEEKDAY_IDS = hash_bytes([str(day).encode() for day in range(7)])  # Monday = "0" ... Sunday = "6"


@dataclass(frozen=True)
class Times:
    """Parsed times: `values` int64 (0 where `invalid`) and the requested derived features' value ids."""

    values: np.ndarray
    invalid: np.ndarray
    features: dict[str, np.ndarray]


def parse_time(cells: pa.Array, time_format: TimeFormat, features: Sequence[str] = ()) -> Times:
    """Times of `cells`; an empty or malformed cell is invalid (a time split cannot place it)."""
    numbers = parse_ints(cells)
    invalid = numbers.invalid | numbers.missing
    if time_format == "integer":
        return Times(numbers.values, invalid, {})
    value = numbers.values
    year, month = 2000 + value // 1_000_000, value // 10_000 % 100
    day, hour = value // 100 % 100, value % 100
    first_of_month = ((year - 1970) * 12 + month - 1).astype("datetime64[M]")
    days_in_month = (first_of_month + 1).astype("datetime64[D]") - first_of_month.astype("datetime64[D]")
    invalid |= (
        (pc.binary_length(cells).to_numpy(zero_copy_only=False) != 8)
        | (value < 0)
        | (month < 1)
        | (month > 12)
        | (day < 1)
        | (day > days_in_month.astype(np.int64))
        | (hour > 23)
    )
    days = first_of_month.astype("datetime64[D]").astype(np.int64) + day - 1
    derived = {
        "hour_of_day": lambda: hash_bytes(pc.binary_slice(cells, 6, 8)),
        "weekday": lambda: _WEEKDAY_IDS[(days + 3) % 7],  # 1970-01-01 was a Thursday
    }
    seconds = np.where(invalid, 0, (days * 24 + hour) * 3600)
    return Times(seconds, invalid, {name: derived[name]() for name in features})
