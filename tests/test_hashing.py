"""Hashing is deterministic forever, uniform, and its probes are independent."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from unified_embedding import hashing
from unified_embedding.hashing import hash_bytes, hash_to_rows, keys_to_rows, mix64, mix64_numpy, salt, salted_keys

PINNED_ROWS = [849, 487, 425, 353, 539]
PINNED_BYTES = [4490210150949542640, 7850561713998068440, -2152535657050944081, -8292774541577014721]
VALUES = torch.tensor([0, 1, -1, 2**63 - 1, 12345])


def test_pinned_rows_never_change():
    rows = hash_to_rows(VALUES, torch.full((5,), salt("user", 0)), 1000)
    assert rows.tolist() == PINNED_ROWS


def test_pinned_byte_hashes_never_change():
    assert hash_bytes([b"a", b"a\x00", b"", b"68fd1e64"]).tolist() == PINNED_BYTES


def test_same_answers_in_a_second_process():
    code = (
        "import torch; from unified_embedding.hashing import hash_to_rows, hash_bytes, salt;"
        "print(hash_to_rows(torch.tensor([0, 1, -1, 2**63 - 1, 12345]), torch.full((5,), salt('user', 0)), 1000).tolist());"
        "print(hash_bytes([b'a', b'a\\x00', b'', b'68fd1e64']).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == str(PINNED_ROWS)
    assert out[1] == str(PINNED_BYTES)


def test_torch_and_numpy_mixers_agree():
    x = torch.randint(-(2**63), 2**63 - 1, (10_000,))
    assert torch.equal(mix64(x), torch.from_numpy(mix64_numpy(x.numpy().view(np.uint64)).view(np.int64)))


def test_rows_are_in_range_and_uniform():
    rows = hash_to_rows(torch.arange(200_000), torch.full((200_000,), salt("f", 0)), 1000)
    assert int(rows.min()) >= 0 and int(rows.max()) < 1000
    counts = torch.bincount(rows, minlength=1000).double()
    chi2 = float(((counts - 200.0) ** 2 / 200.0).sum())
    # 999 degrees of freedom: mean 999, sd ~44.7; 1150 is beyond 3 sd.
    assert chi2 < 1150, chi2


def test_probes_are_independent():
    values = torch.arange(100_000)
    a = hash_to_rows(values, torch.full_like(values, salt("f", 0)), 1000)
    b = hash_to_rows(values, torch.full_like(values, salt("f", 1)), 1000)
    same = float((a == b).double().mean())
    assert abs(same - 1 / 1000) < 0.0005, same
    # and across features too
    c = hash_to_rows(values, torch.full_like(values, salt("g", 0)), 1000)
    assert abs(float((a == c).double().mean()) - 1 / 1000) < 0.0005


def test_sequential_ids_do_not_land_on_sequential_rows():
    rows = hash_to_rows(torch.arange(1000), torch.zeros(1000, dtype=torch.int64), 1 << 20)
    assert len(set(rows.tolist())) > 990
    assert float(torch.diff(rows).abs().double().median()) > 10_000


@pytest.mark.parametrize("cells", [[b"\xff\xfe", b"abc"], ["zip 02139", None, ""], [b"x" * 100, b"x" * 99]])
def test_byte_hashes_are_distinct_and_vectorised(cells):
    hashed = hash_bytes(pa.array(cells, type=pa.binary() if isinstance(cells[0], bytes) else pa.string()))
    assert hashed.dtype == np.int64 and len(hashed) == len(cells)
    distinct = {c or "" for c in cells}
    assert len(set(hashed.tolist())) == len(distinct)


def test_byte_hashes_match_with_and_without_dictionary_path():
    many = pa.array([b"ab", b"cd"] * 1000)
    few = pa.array([b"ab", b"cd", b"ef"])
    assert hash_bytes(many)[:2].tolist() == hash_bytes(few)[:2].tolist()


def test_salts_are_stable_and_distinct():
    assert salt("user", 0) == salt("user", 0)
    assert len({salt(f, p) for f in ("a", "b", "ab") for p in range(4)}) == 12


def test_a_cells_hash_does_not_depend_on_its_neighbours():
    alone = hash_bytes([b"68fd1e64"]).tolist() + hash_bytes([b""]).tolist()
    together = hash_bytes([b"68fd1e64", b"", b"a much longer neighbouring cell"]).tolist()[:2]
    assert alone == together


def _both_ways(monkeypatch, function, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """`function(*args)` with the C kernels and with the torch path alone."""
    fast = function(*args)
    with monkeypatch.context() as patch:
        patch.setattr(hashing, "KERNELS", None)
        return fast, function(*args)


def test_c_kernels_give_the_torch_bits(monkeypatch):
    assert hashing.KERNELS is not None, "the C kernels were not built at install (no C compiler?)"
    g = torch.Generator().manual_seed(0)
    values = torch.randint(-(2**63), 2**63 - 1, (26, 1000), generator=g)
    values[0, :4] = torch.tensor([0, -1, 2**63 - 1, -(2**63)])
    per_row = torch.randint(-(2**63), 2**63 - 1, (26, 1), generator=g)
    salt_layouts = [per_row, per_row.expand(26, 1000).contiguous(), torch.tensor(salt("user", 3)), per_row[:1]]
    for salts in salt_layouts:
        fast, reference = _both_ways(monkeypatch, salted_keys, values, salts)
        assert torch.equal(fast, reference), salts.shape
    sizes = torch.randint(1, 2**40, (26, 1), generator=g)
    sizes[:3, 0] = torch.tensor([1, 2**62, 2**63 - 1])
    keys = salted_keys(values, per_row)
    for size in [sizes, sizes.expand(26, 1000).contiguous(), 1000, 1, torch.tensor(7)]:
        fast, reference = _both_ways(monkeypatch, keys_to_rows, keys, size)
        assert torch.equal(fast, reference)
        assert int(fast.min()) >= 0
    # layouts the kernels do not take (a transposed view, a broadcast across columns) still agree
    for args in [(values.t(), per_row.t()), (values[:, :1], per_row.t())]:
        fast, reference = _both_ways(monkeypatch, salted_keys, *args)
        assert torch.equal(fast, reference)


def test_c_kernel_refuses_a_row_count_that_is_not_positive():
    with pytest.raises(ValueError, match="row counts must be positive"):
        keys_to_rows(torch.arange(10), torch.zeros(10, dtype=torch.int64))
