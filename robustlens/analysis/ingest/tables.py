"""Reading the user's CSV / Parquet tables with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from robustlens.errors import ValidationError

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


def read_table(path: str | Path, *, text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a CSV or Parquet file.

    Parameters
    ----------
    path:
        ``.csv`` or ``.parquet`` file.
    text_columns:
        Columns read as strings (CSV only), so identifiers such as ``007`` keep their leading zeros.
    """
    path = Path(path)
    if not path.exists():
        raise ValidationError("file not found", file=path)
    if not path.is_file():
        raise ValidationError("expected a file, found a directory", file=path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            header = pd.read_csv(path, nrows=0)
            dtypes = {c: "string" for c in text_columns if c in header.columns}
            frame = pd.read_csv(path, dtype=dtypes, keep_default_na=True)
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            raise ValidationError(f"unsupported table format '{suffix}'; expected one of {TABLE_SUFFIXES}", file=path)
    except ValidationError:
        raise
    except pd.errors.EmptyDataError as exc:
        raise ValidationError("the file is empty (no header row)", file=path) from exc
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise ValidationError(f"cannot parse table: {exc}", file=path) from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    duplicated = frame.columns[frame.columns.duplicated()].tolist()
    if duplicated:
        raise ValidationError(f"duplicate column names {duplicated}", file=path)
    return frame


def first_rows(mask, limit: int = 5) -> list[int]:
    """1-based row numbers where boolean ``mask`` is true (at most ``limit``)."""
    import numpy as np

    return [int(i) + 1 for i in np.flatnonzero(np.asarray(mask))[:limit]]
