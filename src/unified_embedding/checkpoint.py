"""Files that are never half written: write a temporary file, flush it to disk, rename.

A run killed at any instant leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def _replace_atomic(path: str | Path, write: Callable[[IO], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, mode) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    _replace_atomic(path, lambda file: torch.save(state, file), "wb")


def write_text_atomic(text: str, path: str | Path) -> None:
    _replace_atomic(path, lambda file: file.write(text), "w")


def load(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def load_to_resume(path: str | Path, fingerprint: str) -> dict[str, Any]:
    """A checkpoint to resume, refused when another configuration wrote it: resuming would train a hybrid."""
    saved = load(path)
    if saved["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} belongs to a different configuration; "
            "use the same flags to resume, or another --output to start afresh"
        )
    return saved
