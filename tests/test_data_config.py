"""Users' own files described by TOML: reading them, and every config mistake named by file and key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from unified_embedding.data import BadInputError, ConfigError, delimited, load_config, load_dataset, split_indices
from unified_embedding.features import FeatureKind, Pooling
from unified_embedding.hashing import hash_bytes

CLICKS = (
    "click\tuser\tad\tprice\ttags\tts\tnote\n"
    "1\tu1\ta1\t2.5\tx|y\t100\tnot read\n"
    "0\tu2\ta1\t\t\t50\t\n"
    "1\tu3\t\t-1\ty\t75\tz\n"
)
CLICKS_TOML = """
[data]
path = "clicks.tsv"
format = "csv"
delimiter = "\\t"
header = true
label = "click"
categorical = ["user", "ad"]
dense = ["price"]
dense_transform = "log1p"
time = "ts"
[data.multivalent]
tags = { separator = "|", pooling = "mean" }
"""


def write(folder: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder / next(name for name in files if name.endswith(".toml"))


def test_toml_csv_with_header(tmp_path):
    toml = write(tmp_path, {"clicks.tsv": CLICKS, "clicks.toml": CLICKS_TOML})
    data = load_dataset(str(toml), cache_dir=tmp_path / "cache")
    assert data.name == "clicks" and data.sources == [str(tmp_path / "clicks.tsv")]
    assert [(f.name, f.kind) for f in data.features] == [
        ("price", FeatureKind.DENSE), ("user", FeatureKind.CATEGORICAL), ("ad", FeatureKind.CATEGORICAL),
        ("tags", FeatureKind.MULTIVALENT),
    ]  # fmt: skip
    assert data.features.get("tags").pooling is Pooling.MEAN
    assert list(data.labels) == [1.0, 0.0, 1.0]
    np.testing.assert_allclose(data.dense[:, 0], [np.log1p(2.5), 0.0, -1.0], rtol=1e-6)
    assert list(data.categorical["ad"]) == list(hash_bytes([b"a1", b"a1", b""]))
    values, offsets = data.multivalent["tags"]
    assert list(offsets) == [0, 2, 2, 3] and list(values) == list(hash_bytes([b"x", b"y", b"y"]))
    assert list(data.time) == [100, 50, 75]
    split = split_indices(data, method="time", fractions=(1 / 3, 1 / 3, 1 / 3))
    assert [list(part) for part in split] == [[1], [2], [0]]


def test_toml_headerless_quoted_csv_from_several_files(tmp_path):
    toml = write(
        tmp_path,
        {
            "a.csv": '0,"Smith, J",3\n1,Doe,4\n',
            "b.csv": "1,Roe,5\n",
            "people.toml": '[data]\nname = "people"\npath = ["a.csv", "b.csv"]\nheader = false\n'
            'columns = ["y", "who", "n"]\nlabel = "y"\ncategorical = ["who"]\ndense = ["n"]\n',
        },
    )
    data = load_dataset(toml, cache_dir=tmp_path / "cache")
    assert data.name == "people" and data.num_rows == 3 and data.time is None
    assert list(data.categorical["who"]) == list(hash_bytes([b"Smith, J", b"Doe", b"Roe"]))
    assert list(data.dense[:, 0]) == [3.0, 4.0, 5.0]  # dense_transform defaults to none


def test_toml_libfm(tmp_path):
    toml = write(
        tmp_path,
        {
            "t.libfm": "1 3:1 9:1\n-1 4:1 9:0.5\n",
            "t.toml": '[data]\npath = "t.libfm"\nformat = "libfm"\nfields = ["a", "b"]\n',
        },
    )
    data = load_dataset(toml, cache_dir=tmp_path / "cache")
    assert list(data.labels) == [1.0, 0.0]
    assert list(data.categorical["a"]) == list(hash_bytes([b"3", b"4"]))
    assert list(data.categorical["b"]) == list(hash_bytes([b"9", b"9"]))


def test_lists_across_many_blocks(tmp_path, monkeypatch):
    """List offsets continue correctly from one streamed chunk to the next."""
    rng = np.random.default_rng(0)
    rows = ["y\tu\ttags"] + [
        f"{i % 2}\tu{i}\t" + "|".join(f"t{t}" for t in rng.integers(0, 50, rng.integers(0, 6))) for i in range(3000)
    ]
    toml = write(
        tmp_path,
        {"l.tsv": "\n".join(rows) + "\n",
         "l.toml": '[data]\npath = "l.tsv"\ndelimiter = "\\t"\nlabel = "y"\ncategorical = ["u"]\n'
         '[data.multivalent]\ntags = { separator = "|" }\n'},
    )  # fmt: skip
    whole = load_dataset(toml, cache_dir=tmp_path / "one")
    monkeypatch.setattr(delimited, "BLOCK_SIZE", 1 << 10)
    chunked = load_dataset(toml, cache_dir=tmp_path / "many")
    for got in (whole, chunked):
        values, offsets = got.multivalent["tags"]
        for i in (0, 1, 1234, 2999):
            cell = rows[i + 1].split("\t")[2]
            expected = hash_bytes([t.encode() for t in cell.split("|")]) if cell else []
            assert list(values[offsets[i] : offsets[i + 1]]) == list(expected)
    np.testing.assert_array_equal(whole.multivalent["tags"][1], chunked.multivalent["tags"][1])
    np.testing.assert_array_equal(whole.multivalent["tags"][0], chunked.multivalent["tags"][0])


BASE = {"path": '"d.csv"', "label": '"y"', "categorical": '["a"]'}
# (keys to set (None deletes), key named in the error, words of the reason)
CONFIG_ERRORS = {
    "unknown key": ({"labels": '"y"'}, "data.labels", "unknown key"),
    "missing label": ({"label": None}, "data.label", "required key is missing"),
    "wrong type": ({"header": '"yes"'}, "data.header", "must be a boolean"),
    "bad format": ({"format": '"parquet"'}, "data.format", "must be one of csv, libfm"),
    "long delimiter": ({"delimiter": '"::"'}, "data.delimiter", "one character"),
    "unknown column": ({"header": "false", "columns": '["y", "b"]'}, "data.categorical", "unknown column 'a'"),
    "columns with header": ({"columns": '["y", "a"]'}, "data.columns", "header = true"),
    "no columns without header": ({"header": "false"}, "data.columns", "required when header = false"),
    "column in two roles": ({"dense": '["a"]'}, "data.categorical", "'a' is already used by data.dense"),
    "listed twice": ({"categorical": '["a", "a"]'}, "data.categorical", "names listed twice: a"),
    "no sparse feature": ({"categorical": None, "dense": '["a"]'}, "data.categorical", "at least one"),
    "bad transform": ({"dense_transform": '"log"'}, "data.dense_transform", "none, log1p"),
    "time features need a date": ({"time": '"t"', "time_features": '["weekday"]'}, "data.time_features", "yymmddhh"),
    "unknown time feature": ({"time": '"t"', "time_format": '"yymmddhh"', "time_features": '["minute"]'},
                             "data.time_features", "unknown 'minute'"),
    "two times": ({"time": '"t"', "row_order_time": "true"}, "data.row_order_time", "not both"),
    "missing file": ({"path": '"nope.csv"'}, "data.path", "no such file"),
    "empty path list": ({"path": "[]"}, "data.path", "must not be empty"),
    "libfm keys": ({"format": '"libfm"', "fields": '["a"]'}, "data.label", "unknown key"),
    "libfm label field": ({"format": '"libfm"', "fields": '["label"]', "label": None, "categorical": None},
                          "data.fields", "libFM label"),
    "multivalent pooling": ({"multivalent": '{ t = { separator = "|", pooling = "max" } }'},
                            "data.multivalent.t.pooling", "sum, mean"),
    "multivalent separator": ({"multivalent": '{ t = { separator = "," } }'}, "data.multivalent.t.separator", "differ"),
    "multivalent key": ({"multivalent": '{ t = { sep = "|" } }'}, "data.multivalent.t.sep", "unknown key"),
    "bad feature name": ({"categorical": '[" a"]'}, "data.categorical", "surrounding spaces"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_errors_name_file_and_key(tmp_path, case):
    changes, key, reason = CONFIG_ERRORS[case]
    items = {**BASE, **changes}
    body = "[data]\n" + "".join(f"{k} = {v}\n" for k, v in items.items() if v is not None)
    toml = write(tmp_path, {"d.csv": "y,a\n1,x\n", "d.toml": body})
    with pytest.raises(ConfigError) as caught:
        load_dataset(str(toml), cache_dir=tmp_path / "cache")
    assert (caught.value.source, caught.value.key) == (str(toml), key)
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"{toml}: {key}: ")


def test_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    bad = write(tmp_path, {"bad.toml": "[data\npath = 1"})
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_config(bad)
    assert caught.value.source == str(bad)
    no_table = write(tmp_path, {"x.toml": 'path = "d.csv"\n'})
    with pytest.raises(ConfigError, match=r"x.toml: data: required key is missing"):
        load_config(no_table)


def test_column_missing_from_header_names_the_config_key(tmp_path):
    toml = write(tmp_path, {"clicks.tsv": CLICKS.replace("\tad\t", "\tadvert\t", 1), "clicks.toml": CLICKS_TOML})
    with pytest.raises(BadInputError) as caught:
        load_dataset(str(toml), cache_dir=tmp_path / "cache")
    error = caught.value
    assert (error.path, error.line, error.column) == (str(tmp_path / "clicks.tsv"), 1, "ad")
    assert str(toml) in error.reason and "'categorical'" in error.reason and "advert" in error.reason
