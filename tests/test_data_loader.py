"""Splits, vocabularies and the batch loader, on real data and on a hand-built CTRData."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DATA_DIR as DATA

from unified_embedding.batch import Batch
from unified_embedding.data import BatchLoader, CTRData, load_dataset, split_indices, vocabularies
from unified_embedding.features import FeatureKind, FeatureSet, FeatureSpec


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    if not DATA.is_dir():
        pytest.fail(f"real datasets not found at {DATA} (set UE_DATA_DIR)")
    cache = tmp_path_factory.mktemp("cache")
    return lambda name: load_dataset(name, DATA, cache_dir=cache)


def synthetic(n: int = 23) -> CTRData:
    """Row r has categorical id r, dense value r, and a list [1000 r, 1000 r + 1, ...] of r % 4 ids."""
    features = FeatureSet(
        [FeatureSpec("x", FeatureKind.DENSE), FeatureSpec("row"), FeatureSpec("list", FeatureKind.MULTIVALENT)]
    )
    lengths = np.arange(n) % 4
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate([1000 * r + np.arange(k) for r, k in enumerate(lengths)]).astype(np.int64)
    return CTRData(
        name="synthetic",
        features=features,
        labels=(np.arange(n) % 2).astype(np.float32),
        dense=np.arange(n, dtype=np.float32)[:, None],
        categorical={"row": np.arange(n, dtype=np.int64)},
        multivalent={"list": (values, offsets)},
        time=np.arange(n, dtype=np.int64)[::-1].copy(),
        bad_rows_skipped=0,
        sources=[],
    )


def test_random_split(load):
    data = load("movielens-100k")
    split = split_indices(data, seed=3)
    assert [len(part) for part in split] == [80_000, 10_000, 10_000]
    joined = np.concatenate(split)
    assert joined.dtype == np.int64 and np.array_equal(np.sort(joined), np.arange(data.num_rows))
    again = split_indices(data, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(split, again, strict=True))
    other = split_indices(data, seed=4)
    assert not np.array_equal(split.test, other.test)
    assert split.valid.mean() == pytest.approx(data.num_rows / 2, rel=0.05)  # spread over the file, not a block


def test_time_split(load):
    data = load("movielens-1m")
    split = split_indices(data, method="time", fractions=(0.7, 0.2, 0.1))
    assert [len(part) for part in split] == [70_000, 20_000, 10_000]
    assert np.array_equal(np.sort(np.concatenate(split)), np.arange(data.num_rows))
    times = [data.time[part] for part in split]
    assert times[0].max() <= times[1].min() and times[1].max() <= times[2].min()
    assert all((np.diff(t) >= 0).all() for t in times)
    with pytest.raises(ValueError, match="no time"):
        split_indices(load("frappe"), method="time")


def test_time_split_is_stable_on_ties():
    data = synthetic(10)
    data.time = np.zeros(10, dtype=np.int64)
    assert [list(p) for p in split_indices(data, method="time")] == [list(range(8)), [8], [9]]


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.1, 0.2), (1.1, -0.1, 0.0)])
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        split_indices(synthetic(), fractions=fractions)


def test_vocabularies(load):
    data = load("movielens-100k")
    rows = split_indices(data).train
    vocab = vocabularies(data, rows)
    assert list(vocab) == list(data.features.sparse_names)
    for ids in vocab.values():
        assert ids.dtype == np.int64 and (np.diff(ids) > 0).all()
    np.testing.assert_array_equal(vocab["user"], np.unique(data.categorical["user"][rows]))
    values, offsets = data.multivalent["genres"]
    naive = {int(v) for r in rows[:5000] for v in values[offsets[r] : offsets[r + 1]]}
    assert set(vocabularies(data, rows[:5000])["genres"]) == naive
    assert len(vocab["gender"]) == 2 and len(vocab["genres"]) == 19


def test_batches_cover_rows_once_per_epoch():
    data = synthetic(23)
    rows = np.array([3, 5, 7, 11, 13, 17, 19, 20, 21, 22], dtype=np.int64)
    loader = BatchLoader(data, rows, 4)
    assert len(loader) == 3
    batches = list(loader.batches())
    assert [b.batch_size for b in batches] == [4, 4, 2]  # the last, partial batch is kept
    assert np.array_equal(np.concatenate([b.ids("row").numpy() for b in batches]), rows)  # in order
    shuffled = BatchLoader(data, rows, 4, shuffle=True, seed=1)
    for epoch in range(3):
        seen = np.concatenate([b.ids("row").numpy() for b in shuffled.batches(epoch)])
        assert sorted(seen) == list(rows)
        assert np.array_equal(seen, np.random.default_rng([1, epoch]).permutation(rows))


def test_shuffle_depends_on_seed_and_epoch():
    data = synthetic(200)
    rows = np.arange(200)

    def order(seed: int, epoch: int) -> list[int]:
        return [
            int(i) for b in BatchLoader(data, rows, 64, shuffle=True, seed=seed).batches(epoch) for i in b.ids("row")
        ]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(5, 2)) == list(range(200))


def test_start_skips_batches():
    data = synthetic(50)
    loader = BatchLoader(data, np.arange(50), 8, shuffle=True, seed=7)
    full = [b.ids("row").tolist() for b in loader.batches(epoch=2)]
    assert [b.ids("row").tolist() for b in loader.batches(epoch=2, start=3)] == full[3:]
    assert list(loader.batches(epoch=2, start=len(loader))) == []
    with pytest.raises(ValueError, match="start"):
        next(loader.batches(start=-1))


def test_batch_layout_and_jagged_gather():
    data = synthetic(23)
    rows = np.array([5, 0, 3, 4, 7, 1])
    batch = next(BatchLoader(data, rows, 6).batches())
    assert isinstance(batch, Batch) and batch.keys == ("row", "list")
    assert batch.lengths.tolist() == [1] * 6 + [1, 0, 3, 0, 3, 1]  # key-major, list lengths = row % 4
    assert batch.ids("row").tolist() == rows.tolist()
    assert batch.ids("list").tolist() == [5000, 3000, 3001, 3002, 7000, 7001, 7002, 1000]
    assert batch.dense.dtype == torch.float32 and batch.dense[:, 0].tolist() == rows.tolist()
    assert batch.labels.tolist() == (rows % 2).tolist()


def test_batches_from_real_data(load):
    data = load("movielens-100k")
    rows = split_indices(data, seed=0).valid
    loader = BatchLoader(data, rows, 1000)
    batch = next(loader.batches(start=2))
    expected_rows = rows[2000:3000]
    assert batch.keys == data.features.sparse_names and batch.dense.shape == (1000, 0)
    offsets = batch.feature_offsets()
    values, list_offsets = data.multivalent["genres"]
    g = batch.keys.index("genres")
    for i in (0, 1, 500, 999):  # the vectorised gather against a naive slice per row
        r = expected_rows[i]
        got = batch.values[offsets[g, i] : offsets[g, i + 1]].tolist()
        assert got == values[list_offsets[r] : list_offsets[r + 1]].tolist()
    assert batch.ids("user").tolist() == data.categorical["user"][expected_rows].tolist()
    assert torch.equal(batch.labels, torch.from_numpy(data.labels[expected_rows]))
    criteo = load("criteo")
    batch = next(BatchLoader(criteo, np.arange(10, 20), 10).batches())
    assert batch.dense.shape == (10, 13) and np.array_equal(batch.dense.numpy(), criteo.dense[10:20])
    assert batch.lengths.tolist() == [1] * (26 * 10)


@pytest.mark.parametrize(
    "rows, batch_size, message",
    [(np.array([0, 23]), 4, "must lie in"), (np.array([0.5]), 4, "integer"), (np.arange(3), 0, "batch_size")],
)
def test_loader_rejects_bad_arguments(rows, batch_size, message):
    with pytest.raises(ValueError, match=message):
        BatchLoader(synthetic(23), rows, batch_size)


def test_ctrdata_checks_shapes():
    data = synthetic(5)
    with pytest.raises(ValueError, match="dense has shape"):
        CTRData(**{**data.__dict__, "dense": np.zeros((5, 2), np.float32)})
    with pytest.raises(ValueError, match="categorical columns"):
        CTRData(**{**data.__dict__, "categorical": {}})
    with pytest.raises(ValueError, match="offsets"):
        CTRData(**{**data.__dict__, "multivalent": {"list": (np.zeros(3, np.int64), np.zeros(6, np.int64))}})


def test_prefetching_gives_the_same_batches_in_the_same_order():
    data = load_dataset("movielens-100k", DATA)
    loader = BatchLoader(data, np.arange(5000), 512, shuffle=True, seed=3)
    plain = list(loader.batches(epoch=2, start=1))
    ahead = list(loader.batches(epoch=2, start=1, prefetch=3))
    assert len(plain) == len(ahead) == 9
    for a, b in zip(plain, ahead, strict=True):
        assert torch.equal(a.values, b.values) and torch.equal(a.labels, b.labels)


def test_a_prefetching_consumer_may_stop_early_and_errors_reach_it():
    data = load_dataset("movielens-100k", DATA)
    loader = BatchLoader(data, np.arange(5000), 100)
    for i, _ in enumerate(loader.batches(prefetch=2)):
        if i == 3:
            break  # the producer thread is stopped, not left blocked

    def broken(rows):
        raise RuntimeError("disk gone")

    loader.batch_of = broken
    with pytest.raises(RuntimeError, match="disk gone"):
        list(loader.batches(prefetch=2))
    with pytest.raises(ValueError, match="prefetch"):
        loader.batches(prefetch=-1)


def test_ids_by_frequency_ranks_each_features_training_ids():
    from unified_embedding.data import ids_by_frequency

    data = load_dataset("movielens-100k", DATA)
    rows = np.arange(20_000)
    ranked = ids_by_frequency(data, rows)
    items = data.categorical["item"][rows]
    counts = {int(i): int(c) for i, c in zip(*np.unique(items, return_counts=True), strict=True)}
    order = [counts[int(i)] for i in ranked["item"]]
    assert sorted(ranked["item"].tolist()) == sorted(counts) and order == sorted(order, reverse=True)
    assert len(ranked["genres"]) <= 19  # multivalent: every list item counts
