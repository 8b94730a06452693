"""MovieLens 100K and 1M: ratings joined with their user and movie tables.

A rating becomes one example: click = rating >= 4, time = its unix timestamp, features =
the user and movie ids plus the user's demographics and the movie's genres (multivalent,
mean-pooled) and year. The joins are vectorised (``np.searchsorted`` on the side table's
sorted ids). A rating whose user or movie is not in its table is a bad row, as is a side
table line that cannot be read or repeats an id.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from unified_embedding.data.badrows import BadRowPolicy, Problem
from unified_embedding.data.cells import parse_floats, parse_ints, show, split_lists
from unified_embedding.data.chunk import Chunk
from unified_embedding.data.jagged import gather_jagged
from unified_embedding.data.textfile import Fields, read_fields
from unified_embedding.features import FeatureKind, FeatureSet, FeatureSpec, Pooling
from unified_embedding.hashing import hash_bytes

# u.item's 19 genre flags, in file order (ML-100K README); the names match ML-1M's genres,
# so a genre has the same value id in both datasets.
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
_GENRE_IDS_100K = hash_bytes([name.encode() for name in GENRES_100K])
_USER_FIELDS_100K = ("age", "gender", "occupation", "zip")  # u.user, after the id
_USER_FIELDS_1M = ("gender", "age", "occupation", "zip")  # users.dat, after the id
_TITLE_YEAR = r"\((?P<year>[0-9]{4})\)\s*$"  # ML-1M titles end with the release year: "Toy Story (1995)"
_POSITIVE_RATING = 4.0


def _features(user_features: Sequence[str], year: str) -> FeatureSet:
    return FeatureSet(
        [FeatureSpec(name) for name in ("user", "item", *user_features)]
        + [FeatureSpec("genres", FeatureKind.MULTIVALENT, pooling=Pooling.MEAN), FeatureSpec(year)]
    )


@dataclass(frozen=True)
class _SideTable:
    """A user or movie table keyed by integer id; the feature arrays' rows align with `ids`."""

    path: Path
    ids: np.ndarray
    categorical: dict[str, np.ndarray]
    multivalent: dict[str, tuple[np.ndarray, np.ndarray]]  # (value ids, offsets)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row of each key, whether it was found); rows of keys not found are 0."""
        if not len(self.ids):
            return np.zeros(len(keys), dtype=np.int64), np.zeros(len(keys), dtype=bool)
        order = np.argsort(self.ids, kind="stable")
        rows = order[np.minimum(np.searchsorted(self.ids[order], keys), len(order) - 1)]
        found = self.ids[rows] == keys
        return np.where(found, rows, 0), found


class MovieLens100k:
    """``u.data`` (tab: user item rating timestamp) + ``u.user`` + ``u.item`` (``|``-separated)."""

    features = _features(_USER_FIELDS_100K, "release_year")
    has_time = True

    def read(self, paths: Sequence[Path], bad_rows: BadRowPolicy) -> Iterator[Chunk]:
        ratings, users_path, items_path = paths
        users = _users(read_fields(users_path, "|", 5), _USER_FIELDS_100K, bad_rows)
        items = _items_100k(read_fields(items_path, "|", 5 + len(GENRES_100K)), bad_rows)
        yield _join(read_fields(ratings, "\t", 4), users, items, bad_rows)


class MovieLens1m:
    """``ratings.dat`` + ``users.dat`` + ``movies.dat``, fields separated by ``::``."""

    features = _features(_USER_FIELDS_1M, "year")
    has_time = True

    def read(self, paths: Sequence[Path], bad_rows: BadRowPolicy) -> Iterator[Chunk]:
        ratings, users_path, movies_path = paths
        users = _users(read_fields(users_path, "::", 5), _USER_FIELDS_1M, bad_rows)
        items = _movies_1m(read_fields(movies_path, "::", 3), bad_rows)
        yield _join(read_fields(ratings, "::", 4), users, items, bad_rows)


def _users(fields: Fields, names: Sequence[str], bad_rows: BadRowPolicy) -> _SideTable:
    ids, keep = _keyed(fields, "user id", [], bad_rows)
    mask = pa.array(keep)
    categorical = {name: hash_bytes(fields.columns[1 + j].filter(mask)) for j, name in enumerate(names)}
    return _SideTable(fields.path, ids, categorical, {})


def _items_100k(fields: Fields, bad_rows: BadRowPolicy) -> _SideTable:
    flag_cells = fields.columns[5:]
    flags = np.stack([pc.equal(cells, b"1").to_numpy(zero_copy_only=False) for cells in flag_cells], axis=1)
    problems = [
        Problem(
            ~(flags[:, j] | pc.equal(cells, b"0").to_numpy(zero_copy_only=False)),
            genre,
            lambda i, cells=cells: f"genre flag {show(cells[i].as_py())} is not 0 or 1",
        )
        for j, (genre, cells) in enumerate(zip(GENRES_100K, flag_cells, strict=True))
    ]
    ids, keep = _keyed(fields, "movie id", problems, bad_rows)
    flags = flags[keep]
    offsets = np.concatenate([[0], np.cumsum(flags.sum(axis=1))]).astype(np.int64)
    genres = _GENRE_IDS_100K[np.nonzero(flags)[1]]  # row-major: each movie's genres in flag order
    release = fields.columns[2].filter(pa.array(keep))  # "01-Jan-1995", or empty when unknown
    year = hash_bytes(pc.binary_slice(release, -4))
    return _SideTable(fields.path, ids, {"release_year": year}, {"genres": (genres, offsets)})


def _movies_1m(fields: Fields, bad_rows: BadRowPolicy) -> _SideTable:
    ids, keep = _keyed(fields, "movie id", [], bad_rows)
    mask = pa.array(keep)
    genres, lengths = split_lists(fields.columns[2].filter(mask), "|")
    year = pc.struct_field(pc.extract_regex(fields.columns[1].filter(mask), _TITLE_YEAR), "year")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return _SideTable(fields.path, ids, {"year": hash_bytes(year)}, {"genres": (genres, offsets)})


def _keyed(
    fields: Fields, id_column: str, problems: list[Problem], bad_rows: BadRowPolicy
) -> tuple[np.ndarray, np.ndarray]:
    """(ids of the kept lines, keep mask): lines must have the right fields, an integer id, no repeated id."""
    ids = parse_ints(fields.columns[0])
    bad_id = ids.invalid | ids.missing
    cells = fields.columns[0]
    checks = [
        fields.wrong_count,
        Problem(bad_id, id_column, lambda i: f"id {show(cells[i].as_py())} is not an integer"),
        *problems,
    ]
    usable = ~np.logical_or.reduce([check.rows for check in checks])
    repeated = _repeats(ids.values, usable)
    checks.append(Problem(repeated, id_column, lambda i: f"id {ids.values[i]} is defined on an earlier line too"))
    keep = bad_rows.screen(fields.path, fields.lines, checks)
    return ids.values[keep], keep


def _repeats(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """True at each masked position whose value already occurs at an earlier masked position."""
    positions = np.flatnonzero(mask)
    order = np.argsort(values[positions], kind="stable")  # stable: the first occurrence sorts first
    ordered = values[positions][order]
    repeated = np.zeros(len(values), dtype=bool)
    repeated[positions[order[1:]]] = ordered[1:] == ordered[:-1]
    return repeated


def _join(fields: Fields, users: _SideTable, items: _SideTable, bad_rows: BadRowPolicy) -> Chunk:
    """Ratings (user, item, rating, timestamp) joined with the user and movie tables."""
    user_cells, item_cells, rating_cells, time_cells = fields.columns
    user, item = parse_ints(user_cells), parse_ints(item_cells)
    rating, time = parse_floats(rating_cells), parse_ints(time_cells)
    user_rows, user_found = users.find(user.values)
    item_rows, item_found = items.find(item.values)
    keep = bad_rows.screen(
        fields.path,
        fields.lines,
        [
            fields.wrong_count,
            Problem(user.invalid | user.missing, "user", lambda i: f"{show(user_cells[i].as_py())} is not an integer"),
            Problem(item.invalid | item.missing, "item", lambda i: f"{show(item_cells[i].as_py())} is not an integer"),
            Problem(
                rating.invalid | rating.missing | ~np.isfinite(rating.values),
                "rating",
                lambda i: f"{show(rating_cells[i].as_py())} is not a finite number",
            ),
            Problem(
                time.invalid | time.missing, "timestamp", lambda i: f"{show(time_cells[i].as_py())} is not an integer"
            ),
            Problem(~user_found, "user", lambda i: f"user {user.values[i]} is not in {users.path}"),
            Problem(~item_found, "item", lambda i: f"movie {item.values[i]} is not in {items.path}"),
        ],
    )
    user_rows, item_rows = user_rows[keep], item_rows[keep]
    mask = pa.array(keep)
    categorical = {"user": hash_bytes(user_cells.filter(mask)), "item": hash_bytes(item_cells.filter(mask))}
    categorical.update({name: ids[user_rows] for name, ids in users.categorical.items()})
    categorical.update({name: ids[item_rows] for name, ids in items.categorical.items()})
    return Chunk(
        labels=(rating.values[keep] >= _POSITIVE_RATING).astype(np.float32),
        dense=np.zeros((int(keep.sum()), 0), dtype=np.float32),
        categorical=categorical,
        multivalent={
            name: gather_jagged(values, offsets, item_rows) for name, (values, offsets) in items.multivalent.items()
        },
        time=time.values[keep],
    )
