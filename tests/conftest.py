"""Shared test fixtures: the real datasets, and a private cache per test session."""

import os
from pathlib import Path

import pytest

DATA_DIR = Path(os.environ.get("UE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Never write parsed columns into the user's home cache from tests."""
    previous = os.environ.get("UE_CACHE_DIR")
    os.environ["UE_CACHE_DIR"] = str(tmp_path_factory.mktemp("ue-cache"))
    os.environ.setdefault("UE_DATA_DIR", str(DATA_DIR))
    yield
    if previous is None:
        os.environ.pop("UE_CACHE_DIR", None)
    else:
        os.environ["UE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "movielens-100k" / "u.data").exists():
        pytest.fail(f"the real datasets are expected in {DATA_DIR} (set UE_DATA_DIR)")
    return DATA_DIR
