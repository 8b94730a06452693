"""Tests for unified_embedding.data.download against a local HTTP server (no internet).

Archives are built from the real files in the shared datasets folder (env UE_DATA_DIR,
default /work/shared/datasets) with the official layout (``ml-100k/u.data`` etc.).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
from conftest import DATA_DIR as DATA

from unified_embedding.data import download as dl
from unified_embedding.data.download import DOWNLOADS, MANUAL_ONLY, Download, DownloadError, download

ML100K_FILES = ["u.data", "u.user", "u.item", "u.genre", "u.occupation", "u.info", "README"]
ML1M_FILES = {
    "ratings.dat": "ratings_sample100k.dat",
    "users.dat": "users.dat",
    "movies.dat": "movies.dat",
    "README": "README",
}
DEAD_URL = "http://127.0.0.1:1/nowhere"  # port 1: connection refused at once


def _need(*paths: Path) -> None:
    for p in paths:
        if not p.is_file():
            pytest.fail(f"real data file {p} not available (set UE_DATA_DIR)")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _tree(root: Path) -> list[str]:
    """Every file and folder under root, relative, sorted (to prove nothing was left behind)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(folder served over HTTP, base URL): the folder holds ml-100k.zip and ml-1m.zip."""
    root = tmp_path_factory.mktemp("mirror")
    src100k = DATA / "movielens-100k"
    src1m = DATA / "movielens-1m"
    _need(*(src100k / f for f in ML100K_FILES), *(src1m / f for f in ML1M_FILES.values()))
    with zipfile.ZipFile(root / "ml-100k.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("ml-100k/", b"")  # directory entry, as in the official archive
        for name in ML100K_FILES:
            zf.write(src100k / name, f"ml-100k/{name}")
        zf.writestr("ml-100k/u1.base", "not needed\n")  # members the readers don't use stay out
    with zipfile.ZipFile(root / "ml-1m.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for target, source in ML1M_FILES.items():
            zf.write(src1m / source, f"ml-1m/{target}")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _serve(served, dataset: str, payload: bytes) -> tuple[str, str]:
    """Serve `payload` as `dataset`'s archive; its base URL and the checksum that accepts it."""
    root, base = served
    digest = hashlib.sha256(payload).hexdigest()
    folder = root / digest[:16]
    folder.mkdir(exist_ok=True)
    (folder / DOWNLOADS[dataset].filename).write_bytes(payload)
    return f"{base}/{digest[:16]}", f"sha256:{digest}"


# ------------------------------------------------------------------------------ registry
def test_registry_has_official_sources_and_well_formed_checksums():
    assert set(DOWNLOADS) == {"movielens-100k", "movielens-1m", "criteo"}
    assert DOWNLOADS["movielens-100k"].url == "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
    assert DOWNLOADS["movielens-1m"].url == "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
    assert DOWNLOADS["criteo"].url == (
        "https://go.criteo.net/criteo-research-kaggle-display-advertising-challenge-dataset.tar.gz"
    )
    assert list(DOWNLOADS["criteo"].archive_members.values()) == ["train.txt"]
    assert {"u.data", "u.user", "u.item"} <= set(DOWNLOADS["movielens-100k"].archive_members.values())
    assert {"ratings.dat", "users.dat", "movies.dat"} <= set(DOWNLOADS["movielens-1m"].archive_members.values())
    for key, spec in DOWNLOADS.items():
        assert isinstance(spec, Download) and spec.folder == key
        assert spec.sha256 is None or (len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0)
        assert spec.md5 is None or (len(spec.md5) == 32 and int(spec.md5, 16) >= 0)
    assert not set(MANUAL_ONLY) & set(DOWNLOADS)


def test_parse_checksum():
    assert dl.parse_checksum("SHA256:" + "A" * 64) == ("sha256", "a" * 64)
    assert dl.parse_checksum("md5:" + "0" * 32) == ("md5", "0" * 32)
    for bad in ("abc", "sha1:" + "0" * 40, "md5:" + "0" * 31, "sha256:" + "g" * 64):
        with pytest.raises(DownloadError):
            dl.parse_checksum(bad)


# ----------------------------------------------------------------------------- success
def test_download_movielens_100k_layout_is_byte_identical(served, tmp_path, capsys):
    root, base = served
    data_dir = tmp_path / "data"
    paths = download(
        "movielens-100k", data_dir, base_url=base, checksum="sha256:" + _sha256(root / "ml-100k.zip"), progress=True
    )
    folder = data_dir / "movielens-100k"
    assert paths == [folder / name for name in ML100K_FILES]
    for name in ML100K_FILES:
        assert (folder / name).read_bytes() == (DATA / "movielens-100k" / name).read_bytes(), name
    # only the needed members, and no temporary file or folder left behind
    assert _tree(data_dir) == sorted(["movielens-100k", *(f"movielens-100k/{n}" for n in ML100K_FILES)])
    assert "Installed" in capsys.readouterr().err


def test_download_movielens_1m_with_md5_and_alias(served, tmp_path):
    root, base = served
    paths = download("ml-1m", tmp_path, base_url=base + "/", checksum="md5:" + _md5(root / "ml-1m.zip"), progress=False)
    folder = tmp_path / "movielens-1m"
    assert sorted(p.name for p in paths) == sorted(ML1M_FILES)
    for target, source in ML1M_FILES.items():
        assert (folder / target).read_bytes() == (DATA / "movielens-1m" / source).read_bytes(), target
    assert _tree(tmp_path) == sorted(["movielens-1m", *(f"movielens-1m/{n}" for n in ML1M_FILES)])


def test_criteo_tar_gz_extracts_only_train_txt(served, tmp_path):
    sample = DATA / "criteo" / "criteo_kaggle_sample.tsv"
    _need(sample)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        tf.add(sample, arcname="train.txt")
        for name, text in (("test.txt", b"0\t1\n"), ("readme.txt", b"criteo\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tf.addfile(info, io.BytesIO(text))
    payload = buf.getvalue()
    base, checksum = _serve(served, "criteo", payload)
    paths = download("criteo", tmp_path, base_url=base, checksum=checksum, progress=False)
    assert paths == [tmp_path / "criteo" / "train.txt"]
    assert paths[0].read_bytes() == sample.read_bytes()
    assert _tree(tmp_path) == ["criteo", "criteo/train.txt"]


def test_already_present_is_a_noop(served, tmp_path, capsys):
    root, base = served
    download(
        "movielens-100k", tmp_path, base_url=base, checksum="sha256:" + _sha256(root / "ml-100k.zip"), progress=False
    )
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "movielens-100k").iterdir()}
    capsys.readouterr()
    # a dead mirror proves nothing is fetched
    paths = download("movielens-100k", tmp_path, base_url=DEAD_URL, progress=False)
    assert sorted(paths) == sorted(before)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "movielens-100k").iterdir()} == before
    assert "already present" in capsys.readouterr().err


def test_no_stored_checksum_warns_and_shows_sha256(served, tmp_path, monkeypatch, capsys):
    root, base = served
    spec = dataclasses.replace(DOWNLOADS["movielens-1m"], sha256=None, md5=None)
    monkeypatch.setitem(DOWNLOADS, "movielens-1m", spec)
    download("movielens-1m", tmp_path, base_url=base, progress=False)
    err = capsys.readouterr().err
    assert "UNVERIFIED" in err and _sha256(root / "ml-1m.zip") in err
    assert (tmp_path / "movielens-1m" / "ratings.dat").is_file()


# ----------------------------------------------------------------------------- failures
def test_wrong_checksum_raises_and_leaves_nothing(served, tmp_path):
    root, base = served
    data_dir = tmp_path / "data"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as err:
        download("movielens-100k", data_dir, base_url=base, checksum="sha256:" + wrong, progress=False)
    msg = str(err.value)
    assert f"{base}/ml-100k.zip" in msg and wrong in msg and _sha256(root / "ml-100k.zip") in msg
    assert not data_dir.exists()


def test_stored_checksum_is_checked_by_default(served, tmp_path):
    # The test archive is not the official one, so the stored official digest must reject it.
    _, base = served
    (tmp_path / "movielens-100k").mkdir()  # an existing folder stays, but stays empty
    with pytest.raises(DownloadError) as err:
        download("movielens-100k", tmp_path, base_url=base, progress=False)
    msg = str(err.value)
    assert "mismatch" in msg and DOWNLOADS["movielens-100k"].sha256 in msg
    assert _tree(tmp_path) == ["movielens-100k"]


def test_http_404_names_the_url(served, tmp_path):
    _, base = served
    with pytest.raises(DownloadError) as err:
        download("movielens-1m", tmp_path / "d", base_url=base + "/missing", progress=False)
    msg = str(err.value)
    assert f"{base}/missing/ml-1m.zip" in msg and "404" in msg and "--data-dir" in msg
    assert not (tmp_path / "d").exists()


def test_network_error_names_url_and_suggests_data_dir(tmp_path):
    with pytest.raises(DownloadError) as err:
        download("movielens-100k", tmp_path / "d", base_url=DEAD_URL, progress=False)
    msg = str(err.value)
    assert f"{DEAD_URL}/ml-100k.zip" in msg and "--data-dir" in msg
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("evil", ["ml-100k/../../evil.txt", "/tmp/evil.txt", "../u.data"])
def test_zip_path_traversal_is_refused(served, tmp_path, evil):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in ML100K_FILES:
            zf.writestr(f"ml-100k/{name}", f"{name}\n")
        zf.writestr(zipfile.ZipInfo(evil), b"owned\n")
    payload = buf.getvalue()
    base, checksum = _serve(served, "movielens-100k", payload)
    data_dir = tmp_path / "deep" / "data"
    with pytest.raises(DownloadError, match="path traversal"):
        download("movielens-100k", data_dir, base_url=base, checksum=checksum, progress=False)
    assert _tree(tmp_path) == []


@pytest.mark.parametrize("kind", ["dotdot", "symlink"])
def test_tar_traversal_and_links_are_refused(served, tmp_path, kind):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        if kind == "dotdot":
            info = tarfile.TarInfo("../train.txt")
            info.size = 3
            tf.addfile(info, io.BytesIO(b"1\t\n"))
        else:
            info = tarfile.TarInfo("train.txt")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tf.addfile(info)
    payload = buf.getvalue()
    base, checksum = _serve(served, "criteo", payload)
    with pytest.raises(DownloadError, match="refusing archive"):
        download("criteo", tmp_path, base_url=base, checksum=checksum, progress=False)
    assert _tree(tmp_path) == []


def test_corrupt_archive_raises_and_leaves_nothing(served, tmp_path):
    root, _ = served
    good = (root / "ml-100k.zip").read_bytes()
    payload = good[: len(good) // 2] + bytes(64) + good[len(good) // 2 + 64 :]  # damaged data, intact directory
    base, checksum = _serve(served, "movielens-100k", payload)
    with pytest.raises(DownloadError) as err:
        download("movielens-100k", tmp_path, base_url=base, checksum=checksum, progress=False)
    assert f"{base}/ml-100k.zip" in str(err.value) and "corrupt archive" in str(err.value)
    assert _tree(tmp_path) == []


def test_garbage_file_is_not_an_archive(served, tmp_path):
    payload = b"<html>not a zip</html>\n" * 10
    base, checksum = _serve(served, "movielens-1m", payload)
    with pytest.raises(DownloadError, match="corrupt archive"):
        download("movielens-1m", tmp_path, base_url=base, checksum=checksum, progress=False)
    assert _tree(tmp_path) == []


def test_missing_member_is_an_error(served, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", "1::1::5::0\n")
    payload = buf.getvalue()
    base, checksum = _serve(served, "movielens-1m", payload)
    with pytest.raises(DownloadError, match="users.dat"):
        download("movielens-1m", tmp_path, base_url=base, checksum=checksum, progress=False)
    assert _tree(tmp_path) == []


@pytest.mark.parametrize(
    "name, hint, files",
    [
        ("frappe", "hexiangnan/neural_factorization_machine", "frappe.train.libfm"),
        ("avazu", "kaggle.com/c/avazu-ctr-prediction", "train.csv"),
    ],
)
def test_manual_only_datasets_are_refused_with_instructions(tmp_path, name, hint, files):
    with pytest.raises(DownloadError) as err:
        download(name, tmp_path, progress=False)
    msg = str(err.value)
    assert "no official anonymous download" in msg
    assert hint in msg and files in msg and str(tmp_path / name) in msg and "--data-dir" in msg
    assert _tree(tmp_path) == []


def test_unknown_dataset_and_bad_checksum_fail_before_network(tmp_path):
    with pytest.raises(DownloadError, match="movielens-100k"):
        download("imagenet", tmp_path, progress=False)
    with pytest.raises(DownloadError, match="sha256:HEX"):
        download("movielens-100k", tmp_path, base_url=DEAD_URL, checksum="crc32:1234", progress=False)
    assert _tree(tmp_path) == []
