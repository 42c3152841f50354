"""Import user-supplied embeddings: ``.npy`` (N × D, manifest order) or Parquet with an ``id`` column."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from robustlens.analysis.ingest.tables import numeric_columns, read_table
from robustlens.errors import ValidationError


def load_embeddings(path: str | Path, *, sample_ids: list[str], order: list[str]) -> np.ndarray:
    """Read embeddings and align them to the workspace samples.

    Parameters
    ----------
    path:
        ``.npy`` array of shape ``(len(order), D)`` in manifest order, or a Parquet / CSV table with
        an ``id`` column and either one list-valued ``embedding`` column or D numeric columns.
    sample_ids:
        Workspace sample ids (length N), the output row order.
    order:
        Ids of every listed image in manifest order, unreadable ones included.

    Returns
    -------
    ``(N, D)`` float32 array (not yet normalised; stages normalise what they store).
    """
    path = Path(path)
    if not path.exists():
        raise ValidationError("file not found", file=path)
    if path.suffix.lower() == ".npy":
        try:
            matrix = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValidationError(f"cannot read .npy array: {exc}", file=path) from exc
        if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.number):
            raise ValidationError(
                f"expected a numeric 2-D array (N × D), got shape {matrix.shape} dtype {matrix.dtype}", file=path
            )
        if matrix.shape[0] != len(order):
            raise ValidationError(
                f"the array has {matrix.shape[0]} rows but the dataset lists {len(order)} "
                "images (rows must follow the manifest order)",
                file=path,
            )
        row_ids = list(order)
    else:
        table = read_table(path, text_columns=("id",))
        if "id" not in table.columns:
            raise ValidationError("needs an 'id' column", file=path, column="id")
        row_ids = table["id"].astype(str).tolist()
        if len(set(row_ids)) != len(row_ids):
            first = table["id"][table["id"].duplicated()].iloc[0]
            raise ValidationError(f"duplicate ids: '{first}'", file=path, column="id")
        if "embedding" in table.columns:
            try:
                matrix = np.stack([np.asarray(v, dtype=np.float64) for v in table["embedding"]])
            except (ValueError, TypeError) as exc:
                raise ValidationError(
                    f"embedding vectors differ in length or are not numeric: {exc}", file=path, column="embedding"
                ) from exc
        else:
            columns = [c for c in table.columns if c != "id"]
            if not columns:
                raise ValidationError(
                    "no embedding columns: expected one list-valued 'embedding' column or "
                    "one numeric column per dimension",
                    file=path,
                )
            matrix = numeric_columns(
                table,
                columns,
                file=path,
                refuse=lambda cell: (
                    f"non-numeric value {str(cell)[:40]!r} (embedding columns must hold numbers; only 'id' may be text)"
                ),
            )
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValidationError(
            f"embeddings must have at least one dimension, got shape {matrix.shape} (N samples × D dimensions, D ≥ 1)",
            file=path,
        )
    bad = ~np.isfinite(matrix)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValidationError(f"non-finite value for sample '{row_ids[row]}'", file=path, row=row + 1)
    position = {rid: i for i, rid in enumerate(row_ids)}
    missing = [sid for sid in sample_ids if sid not in position]
    if missing:
        raise ValidationError(f"embeddings are missing for {len(missing)} samples (first: {missing[:5]})", file=path)
    return matrix[[position[sid] for sid in sample_ids]].astype(np.float32)
