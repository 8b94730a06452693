"""The built-in readers on the real files in ../shared/datasets, and the columnar cache."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_DIR as DATA

from unified_embedding.data import DATASETS, CTRData, delimited, load_dataset, resolve_data_dir
from unified_embedding.data.delimited import DelimitedReader
from unified_embedding.data.load import resolve_cache_dir
from unified_embedding.data.movielens import MovieLens1m, MovieLens100k
from unified_embedding.features import FeatureKind, Pooling
from unified_embedding.hashing import hash_bytes

CRITEO = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
AVAZU = [
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category",
    "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21", "hour_of_day", "weekday",
]  # fmt: skip
FRAPPE = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]

# name: (rows, positive rate from the datasets README, feature names in order, has time)
EXPECTED = {
    "movielens-100k": (
        100_000,
        0.554,
        ["user", "item", "age", "gender", "occupation", "zip", "genres", "release_year"],
        True,
    ),
    "movielens-1m": (100_000, 0.575, ["user", "item", "gender", "age", "occupation", "zip", "genres", "year"], True),
    "frappe": (86_582, 0.330, FRAPPE, False),
    "criteo": (8_184, 0.217, CRITEO, True),
    "criteo-terabyte": (1_000, 0.021, CRITEO, True),
    "avazu": (8_999, 0.174, AVAZU, True),
}


def ids(*cells: bytes) -> np.ndarray:
    return hash_bytes(list(cells))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    if not DATA.is_dir():
        pytest.fail(f"real datasets not found at {DATA} (set UE_DATA_DIR)")
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def load(cache):
    def load(name: str, **kwargs) -> CTRData:
        return load_dataset(name, DATA, cache_dir=cache, **kwargs)

    return load


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_dataset_loads_with_readme_counts(load, name):
    rows, rate, features, has_time = EXPECTED[name]
    data = load(name)
    assert data.name == name
    assert data.num_rows == rows
    assert data.labels.dtype == np.float32 and set(np.unique(data.labels)) == {0.0, 1.0}
    assert data.labels.mean() == pytest.approx(rate, abs=0.0005)
    assert [f.name for f in data.features] == features
    assert all(f.cardinality is None for f in data.features)
    assert data.dense.dtype == np.float32 and data.dense.shape == (rows, len(data.features.dense))
    assert np.isfinite(data.dense).all()
    for name_, column in data.categorical.items():
        assert column.dtype == np.int64 and column.shape == (rows,), name_
    for values, offsets in data.multivalent.values():
        assert values.dtype == offsets.dtype == np.int64
        assert offsets[0] == 0 and offsets[-1] == len(values) and (np.diff(offsets) >= 0).all()
    assert (data.time is not None) == has_time
    assert data.bad_rows_skipped == 0
    assert all(Path(s).parent == DATA / DATASETS[name].folder for s in data.sources)


def test_movielens_100k_values(load):
    data = load("movielens-100k")
    # u.data line 1: "196	242	3	881250949"
    assert data.categorical["user"][0] == ids(b"196")[0]
    assert data.categorical["item"][0] == ids(b"242")[0]
    assert data.labels[0] == 0.0 and data.time[0] == 881250949
    assert data.features.get("genres").kind is FeatureKind.MULTIVALENT
    assert data.features.get("genres").pooling is Pooling.MEAN
    # Toy Story: u.item "1|Toy Story (1995)|01-Jan-1995|...|0|0|0|1|1|1|0|..." -> Animation, Children's, Comedy.
    row = np.flatnonzero(data.categorical["item"] == ids(b"1")[0])[0]
    values, offsets = data.multivalent["genres"]
    assert list(values[offsets[row] : offsets[row + 1]]) == list(ids(b"Animation", b"Children's", b"Comedy"))
    assert data.categorical["release_year"][row] == ids(b"1995")[0]
    # u.user line 196: "196|49|M|writer|55105"
    assert data.categorical["age"][0] == ids(b"49")[0] and data.categorical["zip"][0] == ids(b"55105")[0]
    assert len(np.unique(data.categorical["user"])) == 943 and len(np.unique(data.categorical["item"])) == 1682


def test_movielens_1m_values(load):
    data = load("movielens-1m")
    # ratings_sample100k.dat line 1: "5488::488::3::959821507"
    assert data.categorical["user"][0] == ids(b"5488")[0] and data.categorical["item"][0] == ids(b"488")[0]
    assert data.labels[0] == 0.0 and data.time[0] == 959821507
    # movies.dat: "1::Toy Story (1995)::Animation|Children's|Comedy"
    row = np.flatnonzero(data.categorical["item"] == ids(b"1")[0])[0]
    values, offsets = data.multivalent["genres"]
    assert list(values[offsets[row] : offsets[row + 1]]) == list(ids(b"Animation", b"Children's", b"Comedy"))
    assert data.categorical["year"][row] == ids(b"1995")[0]
    # A title with ':' in it: "260::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Fantasy|Sci-Fi"
    row = np.flatnonzero(data.categorical["item"] == ids(b"260")[0])[0]
    assert data.categorical["year"][row] == ids(b"1977")[0]
    assert offsets[row + 1] - offsets[row] == 4
    assert len(np.unique(data.categorical["user"])) == 5_958 and len(np.unique(data.categorical["item"])) == 3_312


def test_criteo_values(load):
    data = load("criteo")
    # Line 1: 0, I1..I13 = 1 1 5 0 1382 4 15 2 181 1 2 (empty) 2; C1 = 68fd1e64; C22 empty.
    expected = np.log1p([1, 1, 5, 0, 1382, 4, 15, 2, 181, 1, 2, 0, 2]).astype(np.float32)
    np.testing.assert_allclose(data.dense[0], expected, rtol=1e-6)
    assert data.categorical["C1"][0] == ids(b"68fd1e64")[0]
    assert data.categorical["C22"][0] == ids(b"")[0]  # a missing cell is its own value
    np.testing.assert_array_equal(data.time, np.arange(data.num_rows))
    assert (data.dense < 0).any()  # I2 has negative counts, kept as they are (no log)


def test_avazu_values(load):
    data = load("avazu")
    assert "id" not in data.categorical and "hour" not in data.categorical
    hour = datetime.datetime(2014, 10, 21, 0, tzinfo=datetime.UTC)  # 14102100, a Tuesday
    assert (data.time == int(hour.timestamp())).all()
    assert (data.categorical["weekday"] == ids(b"1")[0]).all()  # Monday = 0
    assert (data.categorical["hour_of_day"] == ids(b"00")[0]).all()
    assert data.categorical["site_id"][0] == ids(b"1fbe01fe")[0]
    assert data.dense.shape == (8_999, 0)


def test_frappe_reads_validation_then_test(load):
    data = load("frappe")
    assert [Path(s).name for s in data.sources] == ["frappe.validation.libfm", "frappe.test.libfm"]
    # validation line 1: "1 266:1 1244:1 ..."; test line 1: "-1 204:1 4798:1 ..." (CRLF line ends)
    assert data.labels[0] == 1.0 and data.categorical["user"][0] == ids(b"266")[0]
    assert data.labels[57_722] == 0.0 and data.categorical["user"][57_722] == ids(b"204")[0]
    assert data.categorical["city"][57_722] == ids(b"5183")[0]  # last token, no '\r' in the value
    assert data.time is None


def test_second_load_comes_from_the_cache(load, monkeypatch):
    first = {name: load(name) for name in EXPECTED}

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed although a cache exists")

    for reader in (DelimitedReader, MovieLens100k, MovieLens1m):
        monkeypatch.setattr(reader, "read", no_parsing)
    for name, data in first.items():
        again = load(name)
        assert isinstance(again.labels.base, np.memmap)  # mapped, not read
        _assert_same(again, data)


def test_changed_file_is_parsed_again(tmp_path):
    source = DATA / "criteo" / "criteo_terabyte_sample.tsv"
    (tmp_path / "criteo").mkdir()
    copy = tmp_path / "criteo" / "criteo_terabyte_sample.tsv"
    shutil.copyfile(source, copy)
    cache = tmp_path / "cache"
    assert load_dataset("criteo-terabyte", tmp_path, cache_dir=cache).num_rows == 1_000
    with copy.open("ab") as file:
        file.write(source.read_bytes().splitlines(keepends=True)[0])
    assert load_dataset("criteo-terabyte", tmp_path, cache_dir=cache).num_rows == 1_001
    assert len(list(cache.iterdir())) == 2


def test_small_blocks_give_the_same_columns(load, tmp_path, monkeypatch):
    """A file read in many blocks, each appended to the cache in turn, equals one read in a single block."""
    whole = load("criteo")
    monkeypatch.setattr(delimited, "BLOCK_SIZE", 16 << 10)
    chunked = load_dataset("criteo", DATA, cache_dir=tmp_path)
    _assert_same(chunked, whole)


def test_failed_parse_leaves_no_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    original = DelimitedReader.read

    def killed(self, paths, bad_rows):
        for i, chunk in enumerate(original(self, paths, bad_rows)):
            if i == 2:
                raise KeyboardInterrupt  # as if the process were stopped mid-parse
            yield chunk

    monkeypatch.setattr(delimited, "BLOCK_SIZE", 16 << 10)
    monkeypatch.setattr(DelimitedReader, "read", killed)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("criteo", DATA, cache_dir=cache)
    assert list(cache.iterdir()) == []  # neither a cache nor its temporary folder
    monkeypatch.setattr(DelimitedReader, "read", original)
    assert load_dataset("criteo", DATA, cache_dir=cache).num_rows == 8_184


def test_unreadable_cache_is_rebuilt(load, cache):
    labels = np.array(load("criteo-terabyte").labels)  # a copy: the mapped file is about to change
    folder = next(p for p in cache.iterdir() if p.name.startswith("criteo-terabyte-"))
    (folder / "labels.f32").unlink()
    (folder / "labels.f32").write_bytes(b"\0" * 12)  # cut short by hand
    np.testing.assert_array_equal(load("criteo-terabyte").labels, labels)


def test_dataset_info_find(tmp_path):
    assert DATASETS["criteo"].find(DATA) == [DATA / "criteo" / "criteo_kaggle_sample.tsv"]
    frappe = DATA / "frappe"
    assert DATASETS["frappe"].find(DATA) == [frappe / "frappe.validation.libfm", frappe / "frappe.test.libfm"]
    assert DATASETS["movielens-1m"].find(DATA)[0].name == "ratings_sample100k.dat"
    assert DATASETS["movielens-100k"].find(tmp_path) is None
    (tmp_path / "criteo").mkdir()
    (tmp_path / "criteo" / "train.txt").write_text("")
    (tmp_path / "criteo" / "criteo_kaggle_sample.tsv").write_text("")
    assert DATASETS["criteo"].find(tmp_path) == [tmp_path / "criteo" / "train.txt"]  # the full file wins
    for info in DATASETS.values():
        assert info.description and info.candidates


def test_missing_or_unknown_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"u\.data"):
        load_dataset("movielens-100k", tmp_path, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        load_dataset("nope", tmp_path, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="on_bad_rows"):
        load_dataset("criteo", DATA, cache_dir=tmp_path, on_bad_rows="ignore")


def test_directories_resolve_argument_then_environment_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("UE_DATA_DIR", raising=False)
    monkeypatch.delenv("UE_CACHE_DIR", raising=False)
    assert resolve_data_dir(None) == tmp_path / ".cache" / "unified_embedding"
    assert resolve_cache_dir(None) == tmp_path / ".cache" / "unified_embedding" / "cache"
    monkeypatch.setenv("UE_DATA_DIR", "/env/data")
    monkeypatch.setenv("UE_CACHE_DIR", "/env/cache")
    assert resolve_data_dir(None) == Path("/env/data") and resolve_cache_dir(None) == Path("/env/cache")
    assert resolve_data_dir("~/x") == tmp_path / "x" and resolve_cache_dir(tmp_path / "c") == tmp_path / "c"


def _assert_same(a: CTRData, b: CTRData) -> None:
    assert a.name == b.name and a.features == b.features and a.sources == b.sources
    assert a.bad_rows_skipped == b.bad_rows_skipped
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.dense, b.dense)
    assert a.categorical.keys() == b.categorical.keys()
    for name in a.categorical:
        np.testing.assert_array_equal(a.categorical[name], b.categorical[name])
    for name in a.multivalent:
        np.testing.assert_array_equal(a.multivalent[name][0], b.multivalent[name][0])
        np.testing.assert_array_equal(a.multivalent[name][1], b.multivalent[name][1])
    if a.time is None:
        assert b.time is None
    else:
        np.testing.assert_array_equal(a.time, b.time)
