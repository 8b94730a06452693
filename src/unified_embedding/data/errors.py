"""The two ways input can be wrong: a data file's content, or a description of its layout."""

from __future__ import annotations

from pathlib import Path


class BadInputError(ValueError):
    """A data file, or one row of it, that cannot be read.

    Always names the file; names the 1-based *physical* line (header and skipped lines
    counted, so an editor or ``sed -n 'Np'`` jumps straight to it) and the column where they
    are known. ``str()`` reads ``PATH:LINE: column COL: reason``.
    """

    def __init__(self, path: str | Path, line: int | None, column: str | None, reason: str) -> None:
        # The four fields are the exception's args, so it pickles (multiprocessing) unchanged.
        super().__init__(str(path), line, column, reason)
        self.path = str(path)
        self.line = line
        self.column = column
        self.reason = reason

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        column = "" if self.column is None else f" column {self.column}:"
        return f"{where}:{column} {self.reason}"


class ConfigError(ValueError):
    """A dataset layout (a user's TOML file, or a built-in one) that cannot work.

    ``source`` is the TOML file (or the built-in dataset) and ``key`` the dotted key at fault,
    e.g. ``data.categorical``, so the user knows which line of their config to change.
    """

    def __init__(self, source: str | Path, key: str, reason: str) -> None:
        super().__init__(str(source), key, reason)
        self.source = str(source)
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.reason}"
