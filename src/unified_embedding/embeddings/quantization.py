"""Quantised row storage for table methods: int8 or int4 codes with one float32 scale per row.

A deployment stores row r as integer codes c_r in [-q, q] (q = 127 for int8, 7 for int4)
and a scale s_r = max|w_r| / q, and reads it back as c_r * s_r: symmetric, per-row
("channel-wise") quantisation, so a row of large values never costs a row of small ones
its precision. Training keeps float32 master rows and quantises them in the forward pass
(fake quantisation) with the straight-through estimator (Bengio et al., 2013): the
forward sees exactly the rows a deployment would read, the backward treats rounding as
the identity, so the master rows keep learning below one quantisation step.

A budget of B parameters is read as 4*B bytes (B float32 values); `fit_bytes` sizes any
table method to that byte budget, in one place for every method (see table.py).
"""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Callable
from typing import Literal, Protocol, TypeVar, get_args

import torch
from torch import Tensor

from unified_embedding.embeddings.base import BudgetError

Storage = Literal["fp32", "int8", "int4"]
STORAGES: tuple[str, ...] = get_args(Storage)

#: bits per stored value of each quantised storage
BITS = {"int8": 8, "int4": 4}
#: bytes of a row's scale (float32)
SCALE_BYTES = 4


def check_storage(storage: str) -> Storage:
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    return storage  # type: ignore[return-value]


def largest_code(storage: Storage) -> int:
    """q: codes are the integers in [-q, q] (symmetric, so zero is exact)."""
    return 2 ** (BITS[storage] - 1) - 1


def quantize_rows(rows: Tensor, storage: Storage, groups: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Integer codes [n, d] (int8, one code per value even for int4) and float32 scales [n].

    `groups` (optional, [n]) says which stored row each of the n rows is a piece of: pieces
    of one row (the chunks of a wide feature row) share that row's scale. An all-zero row
    gets scale 0 and codes 0: it reads back as exactly zero.
    """
    q = largest_code(storage)
    largest = rows.detach().abs().amax(dim=1)
    if groups is not None:
        largest = torch.zeros_like(largest).scatter_reduce_(0, groups, largest, "amax")[groups]
    scales = largest / q
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(rows.detach() / safe[:, None]).clamp_(-q, q)
    return codes.to(torch.int8), scales.float()


def dequantize_rows(codes: Tensor, scales: Tensor) -> Tensor:
    return codes.float() * scales[:, None]


def fake_quantize_rows(rows: Tensor, storage: Storage, groups: Tensor | None = None) -> Tensor:
    """The rows as a deployment reads them (forward); gradient straight through (backward)."""
    if storage == "fp32":
        return rows
    stored = dequantize_rows(*quantize_rows(rows, storage, groups)).to(rows.dtype)
    return rows + (stored - rows).detach()


def table_bytes(values: int, rows: int, storage: Storage) -> int:
    """Bytes of a table of `values` numbers in `rows` rows: float32, or packed codes plus a float32 scale per row.

    int4 codes are packed two to a byte across the whole table: ceil(values / 2).
    """
    if storage == "fp32":
        return 4 * values
    return math.ceil(values * BITS[storage] / 8) + SCALE_BYTES * rows


class _Sized(Protocol):
    def num_parameters(self) -> int: ...
    def num_bytes(self) -> int: ...


M = TypeVar("M", bound=_Sized)

#: builds fit_bytes may try before it settles for the best so far
MAX_BUILDS = 24
#: set while a byte budget is being fitted, so a from_budget that calls another one converts once
_FITTING = contextvars.ContextVar("fitting_bytes", default=False)


def fit_bytes(build: Callable[[int], M], budget: int, storage: Storage) -> M:
    """The largest `build(n)` whose bytes fit 4*budget, n being a parameter budget.

    `build(n)` is a method's own from_budget at n parameters (its largest instance within n
    stored values), so bytes grow with n but not linearly (per-row scales, float32 extras,
    widths that change with n). Start at n = budget, then take secant steps on
    (parameters, bytes) towards the byte limit, the first at the cheapest possible slope
    (bits/8 bytes per value); when a step overshoots, bisect between the largest fitting and
    the smallest failing n. Stops when the secant points at an n already tried (usually
    after three or four builds), or after `MAX_BUILDS`.
    """
    limit, cheapest = 4 * budget, BITS[storage] / 8
    best: M | None = None
    fitted, failed = 0, None  # largest fitting and smallest failing parameter budgets so far
    history: list[tuple[int, int]] = []  # (parameters, bytes) of every build
    guess, tried = budget, set()
    for _ in range(MAX_BUILDS):
        tried.add(guess)
        method = build(guess)
        size, used = method.num_parameters(), method.num_bytes()
        if used <= limit:
            best, fitted = method, guess
        else:
            failed = guess if failed is None else min(failed, guess)
        other = next((point for point in reversed(history) if point[0] != size), None)
        history.append((size, used))
        slope = cheapest if other is None else max((used - other[1]) / (size - other[0]), cheapest)
        guess = size + math.floor((limit - used) / slope)
        if failed is not None and (guess >= failed or (best is None and guess in tried)):
            guess = (fitted + failed) // 2
        if guess <= fitted or guess in tried:
            break
    if best is None:
        raise BudgetError(f"no instance fits in {limit:,} bytes (4 per parameter of the budget {budget:,})")
    return best


def sized_in_bytes(from_budget: Callable) -> Callable:
    """Wrap a table method's from_budget: with quantised `storage`, `budget` means 4*budget bytes."""

    @functools.wraps(from_budget)
    def wrapper(cls, features, budget: int, *, storage: Storage = "fp32", **options):
        def build(elements: int):
            return from_budget(cls, features, elements, storage=storage, **options)

        if check_storage(storage) == "fp32" or _FITTING.get():
            return build(budget)
        token = _FITTING.set(True)
        try:
            return fit_bytes(build, budget, storage)
        finally:
            _FITTING.reset(token)

    return wrapper
