"""Fetch the datasets that have an official public URL and lay them out for the readers.

``download("movielens-100k", data_dir)`` streams the official archive into a temporary file
inside ``data_dir/movielens-100k``, checks its checksum *before* opening it, extracts only the
files the readers need into a temporary folder next to them, and then moves each file into
place with :func:`os.replace`. Whatever fails (HTTP error, network error, checksum mismatch,
corrupt or malicious archive, Ctrl-C), no partial file is left behind and a
:class:`DownloadError` names the URL.

Only the standard library is used for the transfer and the archives (``urllib``, ``hashlib``,
``zipfile``, ``tarfile``, ``tempfile``); ``tqdm`` draws the progress bar.

Layouts produced (the ones the readers expect)::

    <data_dir>/movielens-100k/u.data, u.user, u.item, u.genre, u.occupation, u.info, README
    <data_dir>/movielens-1m/ratings.dat, users.dat, movies.dat, README
    <data_dir>/criteo/train.txt

Frappe and Avazu have no official anonymous download; :func:`download` refuses them with a
message saying where to get the files and where to put them (see :data:`MANUAL_ONLY`).

Checksums stored in :data:`DOWNLOADS` and where they come from:

* ``ml-100k.zip`` MD5 ``0e33842e24a9c977be4e0107933c0723``: the value GroupLens publishes in
  ``https://files.grouplens.org/datasets/movielens/ml-100k.zip.md5``, as quoted in public code
  (e.g. eli-osherovich/papers_with_code ``datasets/movielens/dl_config.py``). SHA-256
  ``50d2a982...3229`` and the size 4,924,029 bytes: tensorflow/datasets
  ``tensorflow_datasets/url_checksums/movielens.txt``.
* ``ml-1m.zip`` MD5 ``c4d9eecfca2ab87c1945afe126590906``: GroupLens ``ml-1m.zip.md5`` as quoted
  by the MLPerf NCF ``verify_dataset.sh`` ("From: curl -O .../ml-1m.zip.md5") and
  eli-osherovich/papers_with_code; SHA-256 ``a6898adb...4e20``: tensorflow/datasets
  ``url_checksums/movielens.txt``.
* Criteo Kaggle archive MD5 ``df9b1b3766d9ff91d5ca3eb3d23bed27``: the published MD5 of
  ``dac.tar.gz`` / ``criteo-research-kaggle-display-advertising-challenge-dataset.tar.gz``
  (Criteo's figshare record 5732310, 4,576,820,670 bytes; quoted for this exact go.criteo.net
  URL in public DLRM code and in the 2014 winners' guestwalk/kaggle-2014-criteo README).
  No SHA-256 is published, so none is stored.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

__all__ = [
    "DOWNLOADS",
    "MANUAL_ONLY",
    "Download",
    "DownloadError",
    "download",
    "is_present",
    "parse_checksum",
    "resolve_name",
]

_CHUNK = 1 << 20  # 1 MiB
_TIMEOUT_S = 60.0
_USER_AGENT = "unified-embedding-downloader/0.1 (+python-urllib)"
_TMP_PREFIX = ".ue-download-"


class DownloadError(RuntimeError):
    """A dataset could not be downloaded, verified or unpacked; nothing was left behind."""


@dataclass(frozen=True)
class Download:
    """One downloadable dataset.

    ``archive_members`` maps a member path inside the archive to the file name it gets in
    ``<data_dir>/<folder>/``. ``sha256`` / ``md5`` are the expected digests of the archive
    (hex, lower case) or None when no published value is known.
    """

    dataset: str
    url: str
    sha256: str | None
    md5: str | None
    archive_members: dict[str, str] = field(hash=False)
    folder: str

    @property
    def filename(self) -> str:
        """The archive's file name (the last component of the URL)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def targets(self, data_dir: Path | str) -> list[Path]:
        """The paths the readers will find once the dataset is installed."""
        root = Path(data_dir) / self.folder
        return [root / name for name in self.archive_members.values()]


_ML100K_FILES = ("u.data", "u.user", "u.item", "u.genre", "u.occupation", "u.info", "README")
_ML1M_FILES = ("ratings.dat", "users.dat", "movies.dat", "README")

DOWNLOADS: dict[str, Download] = {
    "movielens-100k": Download(
        dataset="MovieLens 100K",
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        md5="0e33842e24a9c977be4e0107933c0723",
        archive_members={f"ml-100k/{name}": name for name in _ML100K_FILES},
        folder="movielens-100k",
    ),
    "movielens-1m": Download(
        dataset="MovieLens 1M",
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        md5="c4d9eecfca2ab87c1945afe126590906",
        archive_members={f"ml-1m/{name}": name for name in _ML1M_FILES},
        folder="movielens-1m",
    ),
    "criteo": Download(
        dataset="Criteo Display Advertising Challenge (Kaggle)",
        url="https://go.criteo.net/criteo-research-kaggle-display-advertising-challenge-dataset.tar.gz",
        sha256=None,
        md5="df9b1b3766d9ff91d5ca3eb3d23bed27",
        archive_members={"train.txt": "train.txt"},
        folder="criteo",
    ),
}

# Datasets the readers support but that cannot be fetched anonymously: where to get them and
# where to put them. ``{folder}`` is replaced by the dataset folder under the data directory.
MANUAL_ONLY: dict[str, str] = {
    "frappe": (
        "Frappe has no official anonymous download URL, so `ue datasets download` cannot fetch it.\n"
        "Get the standard libFM split (frappe.train.libfm, frappe.validation.libfm, frappe.test.libfm)\n"
        "used by NFM/AFN/FuxiCTR from https://github.com/hexiangnan/neural_factorization_machine "
        "(folder data/frappe/),\n"
        "or the raw data from the authors' page http://baltrunas.info/research-menu/frappe (research use, "
        "no redistribution),\n"
        "and put the three .libfm files in {folder}/ (or pass --data-dir pointing at a folder that "
        "contains frappe/)."
    ),
    "avazu": (
        "Avazu has no official anonymous download URL (it needs a Kaggle account that accepted the "
        "competition rules),\n"
        "so `ue datasets download` cannot fetch it. Download it from "
        "https://www.kaggle.com/c/avazu-ctr-prediction/data\n"
        "(or `kaggle competitions download -c avazu-ctr-prediction`), decompress train.gz to train.csv,\n"
        "and put train.csv in {folder}/ (or pass --data-dir pointing at a folder that contains avazu/)."
    ),
}

_ALIASES: dict[str, str] = {
    "ml-100k": "movielens-100k",
    "ml100k": "movielens-100k",
    "movielens100k": "movielens-100k",
    "ml-1m": "movielens-1m",
    "ml1m": "movielens-1m",
    "movielens1m": "movielens-1m",
    "criteo-kaggle": "criteo",
    "criteo_kaggle": "criteo",
}


def resolve_name(name: str) -> str:
    """Canonical dataset name (``ml-1m`` -> ``movielens-1m``); unknown names come back as given."""
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def is_present(name: str, data_dir: Path | str) -> bool:
    """True when every file the readers need for ``name`` already exists under ``data_dir``."""
    spec = DOWNLOADS[resolve_name(name)]
    return all(p.is_file() for p in spec.targets(data_dir))


_HEX = {"sha256": 64, "md5": 32}


def parse_checksum(checksum: str) -> tuple[str, str]:
    """Parse ``"sha256:HEX"`` or ``"md5:HEX"`` into ``(algorithm, lower-case hex)``."""
    algo, sep, digest = checksum.strip().partition(":")
    algo, digest = algo.strip().lower(), digest.strip().lower()
    if not sep or algo not in _HEX:
        raise DownloadError(f"checksum must look like 'sha256:HEX' or 'md5:HEX', got {checksum!r}")
    if not re.fullmatch(rf"[0-9a-f]{{{_HEX[algo]}}}", digest):
        raise DownloadError(f"{algo} checksum must be {_HEX[algo]} hex digits, got {digest!r}")
    return algo, digest


def _info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mirror_url(spec: Download, base_url: str | None) -> str:
    if base_url is None:
        return spec.url
    return f"{base_url.rstrip('/')}/{spec.filename}"


def _manual_hint(spec: Download, target_dir: Path) -> str:
    names = ", ".join(spec.archive_members.values())
    return (
        f"If this machine cannot reach it, download {spec.url} yourself (or from a mirror), "
        f"unpack {names} into {target_dir}, or pass --data-dir pointing at a folder that already holds "
        f"{spec.folder}/ with the manually downloaded files."
    )


# --------------------------------------------------------------------------------- transfer
def _fetch(url: str, dest: BinaryIO, folder: Path, *, progress: bool, desc: str) -> dict[str, str]:
    """Stream ``url`` into ``dest``; return the hex digests. Raises urllib/OS errors as is."""
    from tqdm.auto import tqdm

    hashers = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if total is not None:
            free = shutil.disk_usage(folder).free
            if free < total:
                raise DownloadError(
                    f"not enough disk space for {url}: {total:,} bytes needed, {free:,} free in {folder}"
                )
        received = 0
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=not progress,
            leave=False,
        ) as bar:
            while chunk := response.read(_CHUNK):
                dest.write(chunk)
                for h in hashers.values():
                    h.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise DownloadError(f"download of {url} was cut short: got {received:,} of {total:,} bytes")
    return {algo: h.hexdigest() for algo, h in hashers.items()}


def _verify(spec: Download, url: str, digests: dict[str, str], checksum: str | None) -> None:
    if checksum is not None:
        expected = [parse_checksum(checksum)]
    else:
        expected = [(algo, value.lower()) for algo, value in (("sha256", spec.sha256), ("md5", spec.md5)) if value]
    if not expected:
        _info(
            f"WARNING: no published checksum is known for {url}; the file is UNVERIFIED. "
            f"Its sha256 is {digests['sha256']} (pass checksum='sha256:...' to pin it)."
        )
        return
    for algo, value in expected:
        if digests[algo] != value:
            raise DownloadError(
                f"checksum mismatch for {url}: expected {algo} {value}, got {algo} {digests[algo]}. "
                "The download was deleted; the file may be corrupt, or the mirror serves a different file."
            )


# ---------------------------------------------------------------------------------- archives
def _normalise(member: str) -> str:
    name = member.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _is_unsafe(member: str) -> bool:
    name = member.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return True
    return ".." in PurePosixPath(name).parts


def _check_safe(names: Iterable[str], url: str) -> None:
    for name in names:
        if _is_unsafe(name):
            raise DownloadError(
                f"refusing archive from {url}: member {name!r} has an absolute path or '..' (path traversal)"
            )


def _match_members(spec: Download, names: Iterable[str], url: str) -> dict[str, str]:
    """Map archive member names to target file names. Exact paths first (ignoring a leading
    ``./``), then a unique member with the same base name (archives repacked under another
    top folder)."""
    names = list(names)
    normalised = {_normalise(n): n for n in names}
    chosen: dict[str, str] = {}
    missing = []
    for wanted, target in spec.archive_members.items():
        key = _normalise(wanted)
        if key in normalised:
            chosen[normalised[key]] = target
            continue
        base = PurePosixPath(key).name
        candidates = [n for n in names if PurePosixPath(_normalise(n)).name == base]
        if len(candidates) == 1:
            chosen[candidates[0]] = target
        else:
            missing.append(wanted)
    if missing:
        raise DownloadError(f"archive from {url} lacks the expected member(s): {', '.join(missing)}")
    return chosen


def _copy_stream(src: BinaryIO, dest_path: Path, *, size: int | None, progress: bool, desc: str) -> None:
    from tqdm.auto import tqdm

    with (
        open(dest_path, "xb") as out,
        tqdm(
            total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress, leave=False
        ) as bar,
    ):
        while chunk := src.read(_CHUNK):
            out.write(chunk)
            bar.update(len(chunk))


def _extract_zip(archive: Path, spec: Download, url: str, out_dir: Path, progress: bool) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        _check_safe((i.filename for i in infos), url)
        by_name = {i.filename: i for i in infos if not i.is_dir()}
        for member, target in _match_members(spec, by_name, url).items():
            info = by_name[member]
            with zf.open(info) as src:  # zipfile checks the CRC when the member is read to the end
                _copy_stream(src, out_dir / target, size=info.file_size, progress=progress, desc=target)


def _extract_tar(archive: Path, spec: Download, url: str, out_dir: Path, progress: bool) -> None:
    # One streaming pass (a multi-GB .tar.gz cannot be seeked cheaply): every member is checked,
    # the needed ones are written into out_dir as they go by; nothing is moved into place
    # unless the whole archive was read without problem.
    wanted = {_normalise(m): t for m, t in spec.archive_members.items()}
    base_of = {PurePosixPath(m).name: t for m, t in wanted.items()}
    exact: set[str] = set()  # targets found at their exact path
    by_base: dict[str, int] = {}  # target -> number of same-named regular files elsewhere
    with tarfile.open(archive, mode="r|*") as tf:
        for info in tf:
            _check_safe([info.name], url)
            if info.issym() or info.islnk():
                _check_safe([info.linkname], url)
            name = _normalise(info.name)
            target = wanted.get(name)
            if target is not None:
                if not info.isfile():
                    raise DownloadError(
                        f"refusing archive from {url}: member {info.name!r} is not a regular file "
                        "(links and devices are not extracted)"
                    )
                if target in exact:
                    raise DownloadError(f"archive from {url} holds member {info.name!r} twice")
                dest = out_dir / target
            else:
                # Fallback for archives repacked under another folder: a unique regular file
                # with the same base name, kept aside until we know no exact match exists.
                target = base_of.get(PurePosixPath(name).name)
                if target is None or not info.isfile():
                    continue
                by_base[target] = by_base.get(target, 0) + 1
                if by_base[target] > 1:
                    continue
                dest = out_dir / f".alt-{target}"
            src = tf.extractfile(info)
            if src is None:  # pragma: no cover - isfile() members always have data
                raise DownloadError(f"cannot read member {info.name!r} of the archive from {url}")
            _copy_stream(src, dest, size=info.size, progress=progress, desc=target)
            if dest.name == target:
                exact.add(target)
    missing = []
    for member, target in wanted.items():
        alt = out_dir / f".alt-{target}"
        if target not in exact:
            if by_base.get(target) == 1:
                os.replace(alt, out_dir / target)
            else:
                missing.append(member)
        alt.unlink(missing_ok=True)
    if missing:
        raise DownloadError(f"archive from {url} lacks the expected member(s): {', '.join(missing)}")


def _extract(archive: Path, spec: Download, url: str, out_dir: Path, progress: bool) -> None:
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, spec, url, out_dir, progress)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, spec, url, out_dir, progress)
        else:
            raise DownloadError(f"corrupt archive from {url}: neither a zip nor a tar file")
    except DownloadError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        tarfile.TarError,
        gzip.BadGzipFile,
        EOFError,
        zlib.error,
        ValueError,
    ) as exc:
        raise DownloadError(f"corrupt archive from {url}: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        # disk full, permissions, ...
        raise DownloadError(f"could not unpack the archive from {url}: {type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------------------------ public
def download(
    name: str,
    data_dir: Path,
    *,
    base_url: str | None = None,
    checksum: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Download ``name`` into ``data_dir/<folder>/`` and return the installed file paths.

    ``base_url`` replaces the directory of the official URL (a mirror; the file name stays).
    ``checksum`` (``"sha256:HEX"`` or ``"md5:HEX"``) replaces the stored digests. When the
    files are all present already, nothing is downloaded. Raises :class:`DownloadError`
    (naming the URL) on any failure, after removing every temporary file.
    """
    key = resolve_name(name)
    data_dir = Path(data_dir).expanduser()
    if key in MANUAL_ONLY:
        raise DownloadError(MANUAL_ONLY[key].format(folder=data_dir / key))
    if key not in DOWNLOADS:
        known = ", ".join(sorted(DOWNLOADS))
        manual = ", ".join(sorted(MANUAL_ONLY))
        raise DownloadError(f"unknown dataset {name!r}: downloadable ones are {known}; {manual} need a manual download")
    if checksum is not None:
        parse_checksum(checksum)  # fail on a malformed value before touching the network

    spec = DOWNLOADS[key]
    for target in spec.archive_members.values():
        if not target or "/" in target or "\\" in target or target in (".", ".."):
            raise DownloadError(f"bad target file name {target!r} in the {key} download spec")
    target_dir = data_dir / spec.folder
    targets = spec.targets(data_dir)
    if all(p.is_file() for p in targets):
        _info(f"{spec.dataset} is already present in {target_dir}; nothing to do.")
        return targets

    url = _mirror_url(spec, base_url)
    created: list[Path] = []  # folders this call made, removed again on failure if left empty
    for parent in reversed([target_dir, *target_dir.parents]):
        if not parent.exists():
            created.append(parent)
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create {target_dir} for {url}: {exc}") from exc

    tmp_archive: Path | None = None
    tmp_dir: Path | None = None
    ok = False
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=f"-{spec.filename}.part", dir=target_dir)
        tmp_archive = Path(tmp_name)
        _info(f"Downloading {spec.dataset} from {url}")
        try:
            with os.fdopen(fd, "wb") as fh:
                digests = _fetch(url, fh, target_dir, progress=progress, desc=spec.filename)
        except urllib.error.HTTPError as exc:
            raise DownloadError(
                f"HTTP error {exc.code} ({exc.reason}) downloading {url}. {_manual_hint(spec, target_dir)}"
            ) from exc
        except urllib.error.URLError as exc:
            raise DownloadError(
                f"network error downloading {url}: {exc.reason}. {_manual_hint(spec, target_dir)}"
            ) from exc
        except OSError as exc:  # timeouts, resets, and local write errors
            raise DownloadError(
                f"error downloading {url}: {type(exc).__name__}: {exc}. {_manual_hint(spec, target_dir)}"
            ) from exc

        _verify(spec, url, digests, checksum)

        tmp_dir = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, suffix=".extract", dir=target_dir))
        _extract(tmp_archive, spec, url, tmp_dir, progress)
        for target in targets:
            if not (tmp_dir / target.name).is_file():  # pragma: no cover - guarded by _extract
                raise DownloadError(f"archive from {url} did not yield {target.name}")
        for target in targets:
            os.replace(tmp_dir / target.name, target)
        ok = True
    finally:
        if tmp_archive is not None:
            tmp_archive.unlink(missing_ok=True)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if not ok:
            for folder in reversed(created):
                try:
                    folder.rmdir()  # only succeeds when empty
                except OSError:
                    pass
    _info(f"Installed {spec.dataset} in {target_dir}: {', '.join(p.name for p in targets)}")
    return targets
