"""The built-in datasets: where their files live under the data directory and how to read them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unified_embedding.data.chunk import Reader
from unified_embedding.data.config import table_layout
from unified_embedding.data.delimited import DelimitedReader
from unified_embedding.data.movielens import MovieLens1m, MovieLens100k


@dataclass(frozen=True)
class DatasetInfo:
    """A built-in dataset.

    `candidates` lists the dataset's input files, one entry per file, each entry the names
    accepted for it in order of preference (the full original first, then the small sample
    shipped for tests). With `all_required`, every entry must be found; otherwise the files
    found are read in order and at least one is needed (Frappe's train file is often absent).
    """

    name: str
    description: str
    folder: str
    candidates: tuple[tuple[str, ...], ...]
    reader: Reader
    all_required: bool = True

    def find(self, data_dir: str | Path) -> list[Path] | None:
        """The files to read under `data_dir`/`folder`, or None if the dataset is not there."""
        folder = Path(data_dir) / self.folder
        found = []
        for names in self.candidates:
            path = next((folder / name for name in names if (folder / name).is_file()), None)
            if path is not None:
                found.append(path)
            elif self.all_required:
                return None
        return found or None


_CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
_CRITEO_CATEGORICAL = [f"C{i}" for i in range(1, 27)]
_AVAZU_CATEGORICAL = [
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category",
    "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
]  # fmt: skip
_FRAPPE_FIELDS = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]


def _criteo(name: str) -> DelimitedReader:
    return DelimitedReader(
        table_layout(
            {
                "delimiter": "\t",
                "header": False,
                "columns": ["label", *_CRITEO_DENSE, *_CRITEO_CATEGORICAL],
                "label": "label",
                "dense": _CRITEO_DENSE,
                "categorical": _CRITEO_CATEGORICAL,
                "dense_transform": "log1p",
                "row_order_time": True,  # the files are in time order but carry no timestamp
                "quoting": False,
            },
            f"built-in dataset {name!r}",
        )
    )


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "criteo",
            "Criteo Display Advertising Challenge (Kaggle): 13 dense + 26 categorical, 45.8M rows",
            "criteo",
            (("train.txt", "criteo_kaggle_sample.tsv"),),
            _criteo("criteo"),
        ),
        DatasetInfo(
            "criteo-terabyte",
            "Criteo Terabyte click logs, one day file: same layout as Kaggle Criteo",
            "criteo",
            (("day_0", "criteo_terabyte_sample.tsv"),),
            _criteo("criteo-terabyte"),
        ),
        DatasetInfo(
            "avazu",
            "Avazu mobile-ad CTR (Kaggle): 21 categorical + hour of day and weekday, 40.4M rows",
            "avazu",
            (("train.csv", "avazu_sample.csv"),),
            DelimitedReader(
                table_layout(
                    {
                        "delimiter": ",",
                        "label": "click",
                        "categorical": _AVAZU_CATEGORICAL,
                        "time": "hour",
                        "time_format": "yymmddhh",
                        "time_features": ["hour_of_day", "weekday"],
                        "quoting": False,
                    },
                    "built-in dataset 'avazu'",
                )
            ),
        ),
        DatasetInfo(
            "movielens-100k",
            "MovieLens 100K ratings (click = rating >= 4) with user and movie features",
            "movielens-100k",
            (("u.data",), ("u.user",), ("u.item",)),
            MovieLens100k(),
        ),
        DatasetInfo(
            "movielens-1m",
            "MovieLens 1M ratings (click = rating >= 4) with user and movie features",
            "movielens-1m",
            (("ratings.dat", "ratings_sample100k.dat"), ("users.dat",), ("movies.dat",)),
            MovieLens1m(),
        ),
        DatasetInfo(
            "frappe",
            "Frappe app-usage CTR (libFM, 10 categorical fields)",
            "frappe",
            (("frappe.train.libfm",), ("frappe.validation.libfm",), ("frappe.test.libfm",)),
            DelimitedReader(table_layout({"format": "libfm", "fields": _FRAPPE_FIELDS}, "built-in dataset 'frappe'")),
            all_required=False,
        ),
    )
}
