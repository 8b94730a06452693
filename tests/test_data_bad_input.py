"""Bad input: every malformed row is named (file, line, column) or skipped and counted, never silently lost.

Synthetic tiny files in the real formats (the built-in Criteo, Avazu, libFM and MovieLens
layouts) test the mechanics; the real files are tested in test_data_readers.py.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import DATA_DIR as DATA
from pyarrow import csv

from unified_embedding.data import BadInputError, delimited, load_dataset
from unified_embedding.data.lines import LineTracker
from unified_embedding.hashing import hash_bytes

INT64_MAX = str(2**63 - 1).encode()


def criteo_line(row: int, label: bytes = b"0", dense: dict[int, bytes] | None = None, *, cells: int = 40) -> bytes:
    """A Criteo line whose C1 names the row (b"row7"), so tests can tell which rows were kept."""
    values = [label] + [str(i).encode() for i in range(1, 14)] + [b"row%d" % row] + [b"%08x" % i for i in range(2, 27)]
    for column, value in (dense or {}).items():
        values[column] = value
    values = (values + [b"x"] * cells)[:cells]
    return b"\t".join(values)


def write(folder: Path, name: str, lines: list[bytes], end: bytes = b"\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"".join(line + end for line in lines))
    return path


def load_criteo(tmp_path: Path, lines: list[bytes], on_bad_rows: str = "raise", end: bytes = b"\n"):
    path = write(tmp_path / "data" / "criteo", "train.txt", lines, end)
    return path, load_dataset("criteo", tmp_path / "data", on_bad_rows=on_bad_rows, cache_dir=tmp_path / "cache")


def kept_rows(data) -> list[int]:
    """Which synthetic rows were kept, by their C1 value."""
    by_id = {int(v): row for row, v in enumerate(hash_bytes([b"row%d" % i for i in range(100)]))}
    return [by_id[int(v)] for v in data.categorical["C1"]]


# (bad line, column named in the error, words in the reason)
CRITEO_BAD_LINES = {
    "truncated line": (criteo_line(3, cells=39), None, "expected 40 columns, got 39"),
    "too many columns": (criteo_line(3, cells=41), None, "expected 40 columns, got 41"),
    "non-numeric dense": (criteo_line(3, dense={3: b"12a"}), "I3", "b'12a' is not a finite number"),
    "non-UTF-8 dense": (criteo_line(3, dense={5: b"\xff\xfe"}), "I5", "is not a finite number"),
    "NaN dense": (criteo_line(3, dense={1: b"nan"}), "I1", "b'nan' is not a finite number"),
    "infinite dense": (criteo_line(3, dense={13: b"-inf"}), "I13", "is not a finite number"),
    "overflowing dense": (criteo_line(3, dense={2: b"1e999"}), "I2", "is not a finite number"),
    "label 2": (criteo_line(3, label=b"2"), "label", "label b'2' is not 0 or 1"),
    "empty label": (criteo_line(3, label=b""), "label", "is not 0 or 1"),
    "blank line": (b"", "label", "label b'' is not 0 or 1"),
}


@pytest.mark.parametrize("case", list(CRITEO_BAD_LINES))
def test_bad_line_raises_naming_file_line_and_column(tmp_path, case):
    bad, column, reason = CRITEO_BAD_LINES[case]
    lines = [criteo_line(0), criteo_line(1), bad, criteo_line(4)]
    with pytest.raises(BadInputError) as caught:
        load_criteo(tmp_path, lines)
    error = caught.value
    path = tmp_path / "data" / "criteo" / "train.txt"
    assert (error.path, error.line, error.column) == (str(path), 3, column)
    assert reason in error.reason
    assert str(error).startswith(f"{path}:3: ") and reason in str(error)
    if column is not None:
        assert f"column {column}:" in str(error)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("case", list(CRITEO_BAD_LINES))
def test_bad_line_is_skipped_and_counted(tmp_path, case):
    bad, _, _ = CRITEO_BAD_LINES[case]
    lines = [criteo_line(0), bad, criteo_line(2), bad, bad, criteo_line(5), criteo_line(6), bad]
    _, data = load_criteo(tmp_path, lines, "skip")
    assert data.bad_rows_skipped == 4
    assert kept_rows(data) == [0, 2, 5, 6]
    np.testing.assert_array_equal(data.time, np.arange(4))  # row order of the kept rows


def test_odd_but_valid_cells_are_values(tmp_path):
    lines = [
        criteo_line(0),
        criteo_line(1).replace(b"00000002", b"\xff\xfe\x80latin-1 \xe9"),  # not UTF-8, in a categorical column
        criteo_line(2).replace(b"00000003", INT64_MAX),  # 2^63 - 1 is bytes like any other id
        criteo_line(3).replace(b"00000004", b"18446744073709551616"),  # 2^64: a 20-digit id
        criteo_line(4).replace(b"00000005", b'"quoted'),  # a stray quote is part of the value
        criteo_line(5, dense={4: b"", 6: b"-3", 7: b"1.5e2"}),  # missing, negative, exponent
    ]
    _, data = load_criteo(tmp_path, lines)
    assert data.num_rows == 6 and data.bad_rows_skipped == 0
    assert data.categorical["C2"][1] == hash_bytes([b"\xff\xfe\x80latin-1 \xe9"])[0]
    assert data.categorical["C3"][2] == hash_bytes([INT64_MAX])[0]
    assert data.categorical["C4"][3] == hash_bytes([b"18446744073709551616"])[0]
    assert data.categorical["C5"][4] == hash_bytes([b'"quoted'])[0]
    assert data.dense[5, 3] == 0.0 and data.dense[5, 5] == -3.0
    assert data.dense[5, 6] == pytest.approx(np.log1p(150.0))


def test_crlf_line_ends(tmp_path):
    lines = [criteo_line(0), criteo_line(1, label=b"1"), criteo_line(2, cells=12)]
    with pytest.raises(BadInputError, match=r"train.txt:3: expected 40 columns"):
        load_criteo(tmp_path, lines, end=b"\r\n")
    _, data = load_criteo(tmp_path / "skip", lines, "skip", end=b"\r\n")
    assert list(data.labels) == [0.0, 1.0]
    assert data.categorical["C26"][0] == hash_bytes([b"0000001a"])[0]  # no '\r' left in the last cell


def test_empty_file(tmp_path):
    with pytest.raises(BadInputError, match="no data rows") as caught:
        load_criteo(tmp_path, [])
    assert caught.value.path.endswith("train.txt") and caught.value.line is None


def test_all_rows_bad_in_skip_mode(tmp_path):
    with pytest.raises(BadInputError, match="all 2 data rows were bad"):
        load_criteo(tmp_path, [criteo_line(0, label=b"x"), criteo_line(1, cells=3)], "skip")


@pytest.mark.parametrize("bad_line", [2, 7, 300, 599])
def test_line_numbers_are_exact_across_blocks(tmp_path, monkeypatch, bad_line):
    """Refused lines in earlier blocks shift later rows; the error still names the physical line."""
    monkeypatch.setattr(delimited, "BLOCK_SIZE", 4 << 10)  # ~20 lines a block
    structural = {5, 6, 150, 151, 152, 420}  # lines with too few columns
    lines = []
    for number in range(1, 601):
        if number in structural:
            lines.append(criteo_line(0, cells=20))
        elif number == bad_line:
            lines.append(criteo_line(0, dense={9: b"oops"}))
        else:
            lines.append(criteo_line(0))
    path = write(tmp_path / "data" / "criteo", "train.txt", lines)
    with pytest.raises(BadInputError) as caught:
        load_dataset("criteo", tmp_path / "data", cache_dir=tmp_path / "cache")
    first = min(structural | {bad_line})
    assert caught.value.line == first
    data = load_dataset("criteo", tmp_path / "data", on_bad_rows="skip", cache_dir=tmp_path / "cache")
    assert data.bad_rows_skipped == len(structural | {bad_line})
    assert data.num_rows == 600 - data.bad_rows_skipped
    # Only the non-numeric line is left once the structural ones are fixed: it is found at its line.
    fixed = [criteo_line(0) if number in structural else line for number, line in enumerate(lines, 1)]
    path.write_bytes(b"".join(line + b"\n" for line in fixed))
    with pytest.raises(BadInputError) as caught:
        load_dataset("criteo", tmp_path / "data", cache_dir=tmp_path / "cache")
    assert (caught.value.line, caught.value.column) == (bad_line, "I9")


def test_line_tracker_numbers_every_row(tmp_path):
    """Each returned row's physical line, checked against a file whose cells hold their own line number."""
    rng = np.random.default_rng(0)
    refused = sorted(set(rng.integers(2, 5000, 400).tolist()) | {2, 3, 4999, 5000})
    text = ["n,x"] + [f"{n},a,b" if n in refused else f"{n},a" for n in range(2, 5001)]
    path = tmp_path / "lines.csv"
    path.write_text("\n".join(text) + "\n")
    tracker = LineTracker(first_line=2)
    reader = csv.open_csv(
        path,
        read_options=csv.ReadOptions(use_threads=False, block_size=1 << 10),
        parse_options=csv.ParseOptions(invalid_row_handler=tracker.on_invalid_row, ignore_empty_lines=False),
        convert_options=csv.ConvertOptions(column_types={"n": pa.int64()}),
    )
    seen, rejected = [], []
    for batch in reader:
        lines, before = tracker.next_rows(batch.num_rows)
        assert lines.tolist() == batch.column("n").to_pylist()
        assert all(r.line < lines[-1] for r in before)
        seen += lines.tolist()
        rejected += before
    rejected += tracker.rest()
    assert [r.line for r in rejected] == refused
    assert rejected[0].reason == "expected 2 columns, got 3"
    assert sorted(seen + refused) == list(range(2, 5001)) and tracker.lines_seen == 4999


AVAZU_HEADER = b"id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category," \
    b"device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21"  # fmt: skip


def avazu_line(row: int, hour: bytes = b"14102100", click: bytes = b"0") -> bytes:
    return b",".join([b"1000016934911786371%d" % row, click, hour] + [b"v%d" % row] * 21)


def load_avazu(tmp_path: Path, lines: list[bytes], on_bad_rows: str = "raise"):
    write(tmp_path / "data" / "avazu", "train.csv", lines)
    return load_dataset("avazu", tmp_path / "data", on_bad_rows=on_bad_rows, cache_dir=tmp_path / "cache")


def test_avazu_header_only(tmp_path):
    with pytest.raises(BadInputError, match=r"train\.csv: no data rows"):
        load_avazu(tmp_path, [AVAZU_HEADER])


def test_avazu_bad_hour_and_label(tmp_path):
    lines = [AVAZU_HEADER, avazu_line(0), avazu_line(1, hour=b"14103200"), avazu_line(2, click=b"yes")]
    with pytest.raises(BadInputError) as caught:
        load_avazu(tmp_path, lines)
    assert (caught.value.line, caught.value.column) == (3, "hour")
    assert "not a valid yymmddhh" in caught.value.reason
    data = load_avazu(tmp_path / "skip", [*lines, avazu_line(3, hour=b"14102923")], "skip")
    assert data.bad_rows_skipped == 2 and data.num_rows == 2
    assert data.categorical["C1"][1] == hash_bytes([b"v3"])[0]
    assert data.categorical["hour_of_day"][1] == hash_bytes([b"23"])[0]
    assert data.categorical["weekday"][1] == hash_bytes([b"2"])[0]  # 2014-10-29 was a Wednesday
    assert data.time[1] - data.time[0] == (8 * 24 + 23) * 3600


def test_avazu_header_without_label(tmp_path):
    header = AVAZU_HEADER.replace(b"click", b"clicked")
    with pytest.raises(BadInputError) as caught:
        load_avazu(tmp_path, [header, avazu_line(0)])
    assert (caught.value.line, caught.value.column) == (1, "click")
    assert "built-in dataset 'avazu'" in caught.value.reason and "'label'" in caught.value.reason


def test_libfm_bad_rows(tmp_path):
    folder = tmp_path / "data" / "frappe"
    good = b"1 " + b" ".join(b"%d:1" % i for i in range(10))
    lines = [good, b"0.5" + good[1:], good.replace(b"3:1", b"3"), good + b" 11:1", b"-1" + good[1:]]
    write(folder, "frappe.test.libfm", lines, b"\r\n")
    with pytest.raises(BadInputError) as caught:
        load_dataset("frappe", tmp_path / "data", cache_dir=tmp_path / "cache")
    assert (caught.value.line, caught.value.column) == (2, "label")
    assert "is not 1 or -1" in caught.value.reason
    data = load_dataset("frappe", tmp_path / "data", on_bad_rows="skip", cache_dir=tmp_path / "cache")
    assert data.bad_rows_skipped == 3 and list(data.labels) == [1.0, 0.0]
    lines[1] = good
    write(folder, "frappe.test.libfm", lines)
    with pytest.raises(BadInputError, match=r"frappe.test.libfm:3: column weekday: b'3' is not an index:value pair"):
        load_dataset("frappe", tmp_path / "data", cache_dir=tmp_path / "cache")


@pytest.fixture()
def movielens(tmp_path) -> Path:
    """A copy of the real MovieLens-100K tables with the first 50 ratings, to edit."""
    source = DATA / "movielens-100k"
    if not source.is_dir():
        pytest.fail(f"real datasets not found at {DATA}")
    target = tmp_path / "data" / "movielens-100k"
    target.mkdir(parents=True)
    for name in ("u.user", "u.item"):
        shutil.copyfile(source / name, target / name)
    (target / "u.data").write_bytes(b"".join((source / "u.data").read_bytes().splitlines(keepends=True)[:50]))
    return target


def test_movielens_rating_of_unknown_user_or_movie(movielens, tmp_path):
    ratings = movielens / "u.data"
    lines = ratings.read_bytes().splitlines()
    lines[9] = b"944\t242\t3\t881250949"  # there are 943 users
    lines[19] = b"196\t1683\t3\t881250949"  # and 1682 movies
    lines[29] = b"196\t242\tfive\t881250949"
    ratings.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(BadInputError) as caught:
        load_dataset("movielens-100k", tmp_path / "data", cache_dir=tmp_path / "cache")
    assert (caught.value.path, caught.value.line, caught.value.column) == (str(ratings), 10, "user")
    assert "user 944 is not in" in caught.value.reason and "u.user" in caught.value.reason
    data = load_dataset("movielens-100k", tmp_path / "data", on_bad_rows="skip", cache_dir=tmp_path / "cache")
    assert data.bad_rows_skipped == 3 and data.num_rows == 47


def test_movielens_side_table_errors(movielens, tmp_path):
    users = movielens / "u.user"
    original = users.read_bytes()
    users.write_bytes(original + b"196|30|F|other|12345\n")  # user 196 again, on line 944
    with pytest.raises(BadInputError) as caught:
        load_dataset("movielens-100k", tmp_path / "data", cache_dir=tmp_path / "cache")
    assert (caught.value.path, caught.value.line, caught.value.column) == (str(users), 944, "user id")
    assert "defined on an earlier line" in caught.value.reason
    users.write_bytes(original)
    items = movielens / "u.item"
    lines = items.read_bytes().splitlines()
    lines[4] = lines[4][:-1] + b"7"  # a genre flag that is not 0 or 1 (Western, the last)
    items.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(BadInputError, match=r"u.item:5: column Western: genre flag b'7' is not 0 or 1"):
        load_dataset("movielens-100k", tmp_path / "data", cache_dir=tmp_path / "cache")


def test_movielens_1m_layout_errors(tmp_path):
    folder = tmp_path / "data" / "movielens-1m"
    write(folder, "users.dat", [b"1::F::1::10::48067", INT64_MAX + b"::M::56::16::70072"])
    write(folder, "movies.dat", [b"1::Star Wars: Episode IV - A New Hope (1977)::Action|Sci-Fi", b"2::No Year::"])
    write(folder, "ratings.dat", [b"1::1::5::978300760", INT64_MAX + b"::2::3::978300761", b"1::2::4"])
    with pytest.raises(BadInputError, match=r"ratings.dat:3: expected 4 fields separated by '::', got 3"):
        load_dataset("movielens-1m", tmp_path / "data", cache_dir=tmp_path / "cache")
    data = load_dataset("movielens-1m", tmp_path / "data", on_bad_rows="skip", cache_dir=tmp_path / "cache")
    assert data.num_rows == 2 and data.bad_rows_skipped == 1 and list(data.labels) == [1.0, 0.0]
    assert data.categorical["user"][1] == hash_bytes([INT64_MAX])[0]  # the largest int64 id joins
    assert list(data.categorical["year"]) == list(hash_bytes([b"1977", b""]))
    values, offsets = data.multivalent["genres"]
    assert list(offsets) == [0, 2, 2] and list(values) == list(hash_bytes([b"Action", b"Sci-Fi"]))
    write(folder, "users.dat", [])
    with pytest.raises(BadInputError, match=r"users.dat: no data rows"):
        load_dataset("movielens-1m", tmp_path / "data", cache_dir=tmp_path / "cache")


def test_error_pickles_and_formats():
    error = BadInputError("/x/train.txt", 12, "I3", "b'a' is not a finite number")
    assert str(error) == "/x/train.txt:12: column I3: b'a' is not a finite number"
    again = pickle.loads(pickle.dumps(error))
    assert (again.path, again.line, again.column, again.reason) == (
        "/x/train.txt",
        12,
        "I3",
        "b'a' is not a finite number",
    )
    assert str(BadInputError("/x/a.csv", None, None, "no data rows")) == "/x/a.csv: no data rows"
    assert isinstance(error, ValueError)
