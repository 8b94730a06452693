"""Deterministic, vectorised 64-bit hashing.

Two stages, both pure functions of their inputs (never Python's per-process salted `hash`):

1. Raw values -> int64 value ids (`hash_bytes`): readers turn every categorical cell
   (Criteo's hex strings, zip codes, titles, bytes that are not UTF-8) into an int64 once,
   so the rest of the library only ever sees int64 ids.
2. (feature, probe, value id) -> row (`hash_to_rows`): embedding methods mix the value id
   with a salt derived from the feature's *name* and the probe number, so reordering
   features or adding new ones never moves an existing feature's rows.

The mixer is SplitMix64's finaliser (Steele, Lea & Flood 2014), a bijection on 64-bit words
with full avalanche; it runs as plain int64 tensor arithmetic (wrapping multiply, logical
shifts emulated by masking), so torch and numpy give bit-identical answers.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from unified_embedding.native import KERNELS

_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_GOLDEN = 0x9E3779B97F4A7C15


def _signed(value: int) -> int:
    """The int64 with the same 64 bits as an unsigned constant."""
    return value - (1 << 64) if value >= 1 << 63 else value


def mix64(x: Tensor) -> Tensor:
    """SplitMix64 finaliser on an int64 tensor (bits read as unsigned); `x` is left unchanged."""
    return _mix64_(x.clone())


def _mix64_(x: Tensor) -> Tensor:
    """`mix64` in place: the embedding forward hashes every lookup, and in-place ops halve its memory traffic."""
    shifted = torch.empty_like(x)
    for bits, multiplier in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(x, bits, out=shifted)
        x ^= shifted.bitwise_and_((1 << (64 - bits)) - 1)
        if multiplier is not None:
            x *= _signed(multiplier)
    return x


def splitmix64_outputs(seed: int, count: int) -> Tensor:
    """The first `count` outputs of a SplitMix64 generator seeded with `seed`, as int64.

    Output i is mix64(seed + (i + 1) * golden): a counter-based stream, so any element can
    be computed alone (the dropout mask kernel computes it in one pass, the same bits).
    """
    state = torch.arange(1, count + 1, dtype=torch.int64).mul_(_signed(_GOLDEN)).add_(seed)
    return _mix64_(state)


def mix64_numpy(x: np.ndarray) -> np.ndarray:
    """The same finaliser on a uint64 numpy array."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(_M1)
        x ^= x >> np.uint64(27)
        x *= np.uint64(_M2)
        x ^= x >> np.uint64(31)
    return x


def salt(feature: str, probe: int = 0) -> int:
    """The int64 salt of one (feature, probe): stable across processes, machines and versions."""
    digest = hashlib.blake2b(f"{feature}\x00{probe}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def salted_keys(values: Tensor, salts: Tensor) -> Tensor:
    """A per-(feature, probe) bijection of int64 value ids: distinct values never share a key."""
    plan = _kernel_plan(values, salts)
    if plan is not None:
        keys = torch.empty_like(values)
        KERNELS.salted_keys(values.numpy(), *plan, keys.numpy())
        return keys
    return _mix64_(values ^ salts)


def keys_to_rows(keys: Tensor, num_rows: int | Tensor) -> Tensor:
    """Rows in [0, num_rows) from salted keys; `num_rows` may be per element.

    A second mixing round decorrelates the row from the key's low bits (which `salted_keys`
    hands to vocabulary lookups too), and the top bit is dropped so the remainder is never
    negative.
    """
    plan = _kernel_plan(keys, num_rows)
    if plan is not None:
        rows = torch.empty_like(keys)
        KERNELS.keys_to_rows(keys.numpy(), *plan, rows.numpy())
        return rows
    rows = _mix64_(keys + _signed(_GOLDEN))
    rows >>= 1
    rows &= (1 << 63) - 1
    return rows.remainder_(num_rows)


def _kernel_plan(values: Tensor, setting: Tensor | int) -> tuple[np.ndarray, int] | None:
    """`setting` as the C kernels take it (one entry per run of `repeat` values), or None for torch.

    The kernels cover what the embedding layers do on a CPU: int64 values with one setting
    per value, per row of a [slots, batch] matrix, or one for all. Anything else (other
    broadcasts, other devices or dtypes) takes the torch path, which gives the same bits.
    """
    if KERNELS is None or values.device.type != "cpu" or values.dtype != torch.int64:
        return None
    if values.numel() == 0 or not values.is_contiguous():
        return None
    if isinstance(setting, int):
        return np.array([setting], dtype=np.int64), values.numel()
    if setting.device.type != "cpu" or setting.dtype != torch.int64:
        return None
    if setting.numel() == 1 and setting.dim() <= values.dim():
        return setting.reshape(1).numpy(), values.numel()
    if setting.shape == values.shape:
        return setting.contiguous().numpy().reshape(-1), 1
    if values.dim() == 2 and setting.shape == (values.shape[0], 1):
        return setting.contiguous().numpy().reshape(-1), values.shape[1]
    return None


def hash_to_rows(values: Tensor, salts: Tensor, num_rows: int | Tensor) -> Tensor:
    """Rows in [0, num_rows) for int64 value ids under per-element int64 salts."""
    return keys_to_rows(salted_keys(values, salts), num_rows)


def hash_bytes(array: pa.Array | pa.ChunkedArray | list) -> np.ndarray:
    """int64 value ids of binary or string cells; a null cell hashes like the empty value.

    Vectorised: cells are zero-padded into 8-byte little-endian words and folded word by
    word (a loop over the longest cell's words, never over rows; each cell folds only its
    own words); the length is mixed in first so that b"a" and b"a\\x00" differ.
    """
    if isinstance(array, list):
        array = pa.array(array, type=pa.binary())
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks else pa.array([], type=pa.binary())
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        array = array.cast(pa.large_binary() if pa.types.is_large_string(array.type) else pa.binary())
    if not (pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type)):
        raise TypeError(f"hash_bytes needs binary or string cells, got {array.type}")
    array = pc.fill_null(array, b"")
    if len(array) == 0:
        return np.zeros(0, dtype=np.int64)
    encoded = pc.dictionary_encode(array)
    if len(encoded.dictionary) < len(array) // 2:
        # Hash each distinct value once; categorical columns repeat values heavily.
        return _hash_unique(encoded.dictionary)[encoded.indices.to_numpy(zero_copy_only=False)]
    return _hash_unique(array)


def _hash_unique(array: pa.Array) -> np.ndarray:
    offset_type = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    buffers = array.buffers()
    all_offsets = np.frombuffer(buffers[1], dtype=offset_type)
    offsets = all_offsets[array.offset : array.offset + len(array) + 1].astype(np.int64)
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    first = int(offsets[0])
    data = data[first : int(offsets[-1])]
    words = int((lengths.max() + 7) // 8)
    width = 8 * words
    if lengths.min() == lengths.max() == width:
        padded = data.reshape(len(lengths), width)
    else:
        # Scatter every byte into a zero-padded [rows, width] matrix in one flat pass.
        padded = np.zeros(len(lengths) * width, dtype=np.uint8)
        shift = np.arange(len(lengths), dtype=np.int64) * width - (offsets[:-1] - first)
        padded[np.arange(data.size, dtype=np.int64) + np.repeat(shift, lengths)] = data
        padded = padded.reshape(len(lengths), width)
    as_words = np.ascontiguousarray(padded).view(np.uint64)
    state = mix64_numpy(lengths.astype(np.uint64) + np.uint64(_GOLDEN))
    own_words = (lengths + 7) // 8  # a cell's hash must not depend on its neighbours' lengths
    for w in range(words):
        state = np.where(w < own_words, mix64_numpy(state ^ as_words[:, w]), state)
    return state.view(np.int64)
