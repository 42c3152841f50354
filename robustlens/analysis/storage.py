"""Atomic writes for workspace artifacts.

A reader must never see a half-written artifact, even if the writer is killed with SIGKILL: every
writer here writes a temporary file in the destination directory, flushes it to disk and renames it
over the destination (``os.replace`` is atomic on POSIX and Windows for paths on one file system).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then move ``tmp_path`` onto ``path`` atomically.

    Parameters
    ----------
    path:
        Final destination. Its parent directory is created if needed.
    write:
        Callable that writes the complete content to the temporary path it is given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every platform, where it is skipped.
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_parquet(path: str | Path, frame: pd.DataFrame, **options: Any) -> Path:
    """Write ``frame`` (index dropped) to Parquet atomically; ``options`` go to ``DataFrame.to_parquet``."""
    return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False, **options))


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` to ``.npy`` atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    return atomic_write(path, write)


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented UTF-8 JSON atomically."""
    text = json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write raw bytes atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
