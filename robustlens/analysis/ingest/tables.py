"""Reading the user's CSV / Parquet tables with errors that name the file."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from robustlens.errors import ValidationError

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
#: Cells pandas reads as missing by default (its ``STR_NA_VALUES``). Text columns (ids, paths, labels)
#: only treat the empty cell as missing, so a class called "NA", "None" or "null" stays a label.
DEFAULT_NA_VALUES = (
    "",
    "#N/A",
    "#N/A N/A",
    "#NA",
    "-1.#IND",
    "-1.#QNAN",
    "-NaN",
    "-nan",
    "1.#IND",
    "1.#QNAN",
    "<NA>",
    "N/A",
    "NA",
    "NULL",
    "NaN",
    "None",
    "n/a",
    "nan",
    "null",
)
#: Delimiters recognised besides the comma (semicolon: spreadsheets in comma-decimal locales).
OTHER_DELIMITERS = (";", "\t", "|")


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
            delimiter = detect_delimiter(path)
            header = pd.read_csv(path, nrows=0, sep=delimiter)
            columns = [str(c) for c in header.columns]
            dtypes = {c: "string" for c in text_columns if c in columns}
            na_values = {c: [""] if c in dtypes else list(DEFAULT_NA_VALUES) for c in columns}
            frame = pd.read_csv(path, sep=delimiter, dtype=dtypes, keep_default_na=False, na_values=na_values)
            frame.attrs["delimiter"] = delimiter
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


def detect_delimiter(path: Path, *, sample_bytes: int = 65536) -> str:
    """The CSV delimiter of ``path``: ``","`` unless the header holds no comma but a ``;``, tab or ``|``.

    Only the first lines are sniffed (:class:`csv.Sniffer`), and only when the header has no comma, so
    an ordinary CSV whose values contain semicolons is never misread.
    """
    with open(path, "rb") as handle:
        sample = handle.read(sample_bytes).decode("utf-8", errors="replace")
    lines = sample.splitlines()
    if len(sample) == sample_bytes and len(lines) > 1:
        lines = lines[:-1]  # the last line may be cut in the middle
    header = lines[0] if lines else ""
    if "," in header or not any(d in header for d in OTHER_DELIMITERS):
        return ","
    try:
        return csv.Sniffer().sniff("\n".join(lines[:50]), delimiters="".join(OTHER_DELIMITERS)).delimiter
    except csv.Error:
        # Inconsistent lines: take the most frequent candidate in the header.
        return max(OTHER_DELIMITERS, key=header.count)


def first_rows(mask: Any, limit: int = 5) -> list[int]:
    """1-based row numbers where boolean ``mask`` is true (at most ``limit``)."""
    import numpy as np

    return [int(i) + 1 for i in np.flatnonzero(np.asarray(mask))[:limit]]


def numeric_columns(table: pd.DataFrame, columns: list[str], *, file: Path, refuse: Callable[[Any], str]) -> Any:
    """``table[columns]`` as an ``(N, len(columns))`` float64 array (empty cells are NaN).

    The first cell that holds something other than a number (column by column, top down) is refused: a
    :class:`ValidationError` naming ``file``, the 1-based row and the column, whose message is ``refuse(cell)``.
    """
    import numpy as np

    for column in columns:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna() & table[column].notna()
        if bad.any():
            row = first_rows(bad)[0]
            raise ValidationError(refuse(table[column].iloc[row - 1]), file=file, row=row, column=column)
    return table[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
