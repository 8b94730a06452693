"""The C fast path of the delimited reader gives exactly what the careful pyarrow path gives.

Every test reads the same file twice, once with the fast path and once with it switched
off, and compares every column, the skipped-row count and the error. Files are cut into
many small blocks so that clean blocks (parsed by C) and declined blocks (re-read by
pyarrow) alternate and line numbers must carry across them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_DIR
from test_data_bad_input import criteo_line

from unified_embedding.data import BadInputError, delimited, fastpath
from unified_embedding.data.badrows import BadRowPolicy
from unified_embedding.data.config import table_layout
from unified_embedding.data.delimited import DelimitedReader
from unified_embedding.data.registry import DATASETS

CRITEO = DATASETS["criteo"].reader


def read(reader: DelimitedReader, path: Path, monkeypatch, *, fast: bool, on_bad_rows: str = "raise"):
    """Every column of the file, concatenated, and the policy's skipped count; counts careful reads."""
    careful_reads = []
    original = DelimitedReader._careful_chunks

    def counted(self, *args):
        careful_reads.append(args[1])
        return (yield from original(self, *args))

    with monkeypatch.context() as patch:
        patch.setattr(DelimitedReader, "_careful_chunks", counted)
        if not fast:
            patch.setattr(fastpath, "FAST_PARSER", None)
        policy = BadRowPolicy(on_bad_rows)
        chunks = list(reader.read([path], policy))
    columns = {
        "labels": np.concatenate([c.labels for c in chunks]),
        "dense": np.concatenate([c.dense for c in chunks]),
        "time": np.concatenate([c.time for c in chunks]) if reader.has_time else None,
    }
    for name in reader.layout.categorical:
        columns[name] = np.concatenate([c.categorical[name] for c in chunks])
    return columns, policy.skipped, careful_reads


def assert_same(fast: dict, careful: dict) -> None:
    assert fast.keys() == careful.keys()
    for name, column in fast.items():
        if column is None:
            assert careful[name] is None
        else:
            assert column.dtype == careful[name].dtype, name
            np.testing.assert_array_equal(column, careful[name], err_msg=name)


def test_the_extension_is_built_and_takes_plain_layouts():
    assert fastpath.FAST_PARSER is not None, "the C parser was not built at install (no C compiler?)"
    assert fastpath.fast_path_fits(CRITEO.layout)
    assert not fastpath.fast_path_fits(DATASETS["avazu"].reader.layout)  # a yymmddhh time column
    assert not fastpath.fast_path_fits(DATASETS["frappe"].reader.layout)  # libFM tokens


@pytest.mark.parametrize("name", ["criteo_kaggle_sample.tsv", "criteo_terabyte_sample.tsv"])
def test_real_criteo_is_parsed_by_c_alone_and_identically(name, monkeypatch):
    monkeypatch.setattr(delimited, "BLOCK_SIZE", 64 << 10)  # many blocks, several threads busy
    path = DATA_DIR / "criteo" / name
    fast, _, careful_reads = read(CRITEO, path, monkeypatch, fast=True)
    careful, _, _ = read(CRITEO, path, monkeypatch, fast=False)
    assert careful_reads == []  # real Criteo is all plain: no block needed pyarrow
    assert_same(fast, careful)
    assert len(fast["labels"]) == sum(1 for _ in path.open("rb"))


def odd_but_valid_lines() -> dict[int, bytes]:
    """Lines the C parser declines but that are good rows: their blocks go to pyarrow."""
    return {
        7: criteo_line(7, dense={2: b"1.5"}),
        31: criteo_line(31, dense={4: b"+3"}),
        55: criteo_line(55, label=b"1.0"),
        80: criteo_line(80, dense={6: b"12345678901234567890"}),  # 20 digits: a float to pyarrow
        120: criteo_line(120, dense={1: b"2e3"}),
    }


def plain_lines(count: int) -> list[bytes]:
    lines = [criteo_line(i % 100) for i in range(count)]
    for i in range(0, count, 9):  # long ids (the word loop), empty cells, negatives, long numbers
        lines[i] = criteo_line(i % 100, dense={3: b"", 8: b"-7", 9: b"123456789012"}).replace(
            b"00000002", b"a-very-long-categorical-value-%d" % i
        )
    return lines


def test_declined_blocks_are_read_carefully_and_the_rest_by_c(tmp_path, monkeypatch):
    lines = plain_lines(160)
    for number, line in odd_but_valid_lines().items():
        lines[number] = line
    path = tmp_path / "day.tsv"
    path.write_bytes(b"\n".join(lines))  # and no newline after the last line
    monkeypatch.setattr(delimited, "BLOCK_SIZE", 2 << 10)  # about 9 lines a block
    fast, _, careful_reads = read(CRITEO, path, monkeypatch, fast=True)
    careful, _, _ = read(CRITEO, path, monkeypatch, fast=False)
    assert_same(fast, careful)
    assert len(fast["labels"]) == 160
    assert 0 < len(careful_reads) <= len(odd_but_valid_lines())  # only the odd lines' blocks


@pytest.mark.parametrize("on_bad_rows", ["raise", "skip"])
def test_bad_rows_are_named_and_counted_the_same_across_blocks(tmp_path, monkeypatch, on_bad_rows):
    lines = plain_lines(200)
    bad = {64: criteo_line(64, cells=39), 130: criteo_line(130, dense={5: b"nan"}), 131: b"", 190: b"1\tx"}
    for number, line in bad.items():
        lines[number] = line
    path = tmp_path / "day.tsv"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    monkeypatch.setattr(delimited, "BLOCK_SIZE", 3 << 10)
    if on_bad_rows == "raise":
        errors = []
        for fast in (True, False):
            with pytest.raises(BadInputError) as caught:
                read(CRITEO, path, monkeypatch, fast=fast)
            errors.append(str(caught.value))
        assert errors[0] == errors[1]
        assert f"{path}:65: " in errors[0]  # line 65 is row 64
        return
    fast, fast_skipped, _ = read(CRITEO, path, monkeypatch, fast=True, on_bad_rows="skip")
    careful, careful_skipped, _ = read(CRITEO, path, monkeypatch, fast=False, on_bad_rows="skip")
    assert fast_skipped == careful_skipped == len(bad)
    assert_same(fast, careful)
    assert len(fast["labels"]) == 200 - len(bad)


def test_a_users_csv_with_a_header_and_quoting(tmp_path, monkeypatch):
    layout = table_layout(
        {
            "delimiter": ",",
            "header": True,
            "label": "clicked",
            "dense": ["price"],
            "categorical": ["user", "zip"],
        },
        "test layout",
    )
    reader = DelimitedReader(layout)
    rows = [b"%d,%d,u%d,unused,%05d" % (i % 2, i * 3, i % 17, 10_000 + i % 23) for i in range(300)]
    rows[150] = b'1,4,"u,quoted",unused,02139'  # a quote: its block goes to pyarrow
    path = tmp_path / "clicks.csv"
    path.write_bytes(b"clicked,price,user,note,zip\n" + b"".join(row + b"\n" for row in rows))
    monkeypatch.setattr(delimited, "BLOCK_SIZE", 1 << 10)
    fast, _, careful_reads = read(reader, path, monkeypatch, fast=True)
    careful, _, _ = read(reader, path, monkeypatch, fast=False)
    assert_same(fast, careful)
    assert len(careful_reads) == 1
    assert len(fast["labels"]) == 300


@pytest.mark.parametrize(
    "content, words",
    [(b"", "the file is empty"), (b"clicked,price,user,note,zip\n", "no data rows")],
)
def test_empty_files_say_so_on_both_paths(tmp_path, monkeypatch, content, words):
    layout = table_layout(
        {"delimiter": ",", "header": True, "label": "clicked", "dense": ["price"], "categorical": ["user"]}, "test"
    )
    path = tmp_path / "clicks.csv"
    path.write_bytes(content)
    for fast in (True, False):
        with pytest.raises(BadInputError, match=words):
            read(DelimitedReader(layout), path, monkeypatch, fast=fast)
