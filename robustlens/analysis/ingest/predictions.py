"""Load a prediction set (one model's class scores for every sample) and align it to the samples.

Accepted inputs
---------------
* A CSV / Parquet table with an ``id`` or ``path`` column and one numeric column per class name.
* A ``.npy`` array of shape ``(N, K)`` in manifest order, with the class order given separately.

Scores are probabilities or logits. ``scores="auto"`` decides per file: all values in ``[0, 1]`` ⇒
probabilities; otherwise, if most rows still sum to 1 the file is a probability table with bad values
(rejected, naming the row), else logits (softmaxed). Rows of probabilities whose sum is off by more
than ``1e-3`` but at most ``sum_tolerance`` are renormalised with a warning; beyond that they are
rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from robustlens.analysis.ingest.tables import first_rows, numeric_columns, read_table
from robustlens.errors import ValidationError

SCORE_KINDS = ("auto", "probabilities", "logits")
EXACT_SUM_TOLERANCE = 1e-3
DEFAULT_SUM_TOLERANCE = 0.05


@dataclass
class PredictionSet:
    """One model's predictions aligned to the workspace.

    Attributes
    ----------
    name:
        Name of the prediction set (the model it came from).
    probabilities:
        ``(N, K)`` float32, rows sum to 1, row ``i`` = sample ``i`` of ``samples.parquet``, column ``k``
        = class ``k`` of the workspace class order.
    source:
        Path of the file it was read from.
    score_kind:
        ``"probabilities"`` or ``"logits"`` (what the file held).
    """

    name: str
    probabilities: np.ndarray
    source: str
    score_kind: str
    renormalized_rows: int = 0
    dropped_rows: int = 0
    warnings: list[str] = field(default_factory=list)


def load_predictions(
    path: str | Path,
    *,
    name: str,
    sample_ids: list[str],
    sample_paths: list[str],
    classes: list[str],
    order: list[str] | None = None,
    npy_classes: list[str] | None = None,
    skipped_ids: set[str] | None = None,
    scores: str = "auto",
    sum_tolerance: float = DEFAULT_SUM_TOLERANCE,
) -> PredictionSet:
    """Read, validate and align one prediction file.

    Parameters
    ----------
    path:
        ``.csv`` / ``.parquet`` table or ``.npy`` array.
    name:
        Name for this prediction set.
    sample_ids, sample_paths:
        Ids and relative paths of the workspace samples, length N, in workspace order.
    classes:
        Workspace class names, length K; the output columns follow this order.
    order:
        Ids of every listed image in manifest order (unreadable ones included); required for ``.npy``.
    npy_classes:
        Class name of each ``.npy`` column; required for ``.npy``.
    skipped_ids:
        Ids of images skipped at ingest; table rows for them are dropped, not rejected.
    scores:
        ``"auto"``, ``"probabilities"`` or ``"logits"``.
    sum_tolerance:
        Largest ``|row sum - 1|`` renormalised with a warning; larger deviations are rejected.
    """
    path = Path(path)
    if scores not in SCORE_KINDS:
        raise ValidationError(f"scores must be one of {SCORE_KINDS}, got '{scores}'")
    if path.suffix.lower() == ".npy":
        matrix, row_ids, file_columns, key_column = _read_npy(
            path, order=order, npy_classes=npy_classes, classes=classes
        )
    else:
        matrix, row_ids, file_columns, key_column = _read_table(
            path, classes=classes, sample_ids=sample_ids, sample_paths=sample_paths
        )
    _check_classes(path, file_columns, classes)
    _check_finite(path, matrix, file_columns, row_ids, key_column)
    kind = _detect_kind(path, matrix, file_columns, scores)
    warnings: list[str] = []
    renormalized = 0
    if kind == "logits":
        shifted = matrix - matrix.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        probs = exp / exp.sum(axis=1, keepdims=True)
    else:
        probs, renormalized = _check_sums(path, matrix, sum_tolerance)
        if renormalized:
            warnings.append(f"{path}: {renormalized} row(s) did not sum to 1 (off by ≤ {sum_tolerance}); renormalised")
    column_of = {c: i for i, c in enumerate(file_columns)}
    probs = probs[:, [column_of[c] for c in classes]]

    skipped_ids = skipped_ids or set()
    position = {sample_id: i for i, sample_id in enumerate(sample_ids)}
    keep = np.array([rid in position for rid in row_ids], dtype=bool)
    dropped = int((~keep).sum())
    if dropped:
        unknown = [rid for rid, k in zip(row_ids, keep, strict=True) if not k and rid not in skipped_ids]
        if unknown:
            bad_rows = [i + 1 for i, rid in enumerate(row_ids) if rid in set(unknown[:5])]
            raise ValidationError(
                f"{len(unknown)} row(s) name samples that are not in the dataset "
                f"(first: '{unknown[0]}', rows {bad_rows[:5]})",
                file=path,
                row=bad_rows[0],
                column=key_column,
            )
        warnings.append(f"{path}: {dropped} row(s) belong to images skipped at ingest and were dropped")
    aligned = np.full((len(sample_ids), len(classes)), np.nan, dtype=np.float32)
    target = np.array([position[rid] for rid, k in zip(row_ids, keep, strict=True) if k], dtype=np.int64)
    aligned[target] = probs[keep]
    covered = np.zeros(len(sample_ids), dtype=bool)
    covered[target] = True
    if not covered.all():
        missing = [sample_ids[i] for i in np.flatnonzero(~covered)[:5]]
        raise ValidationError(
            f"predictions are missing for {int((~covered).sum())} of {len(sample_ids)} samples (first: {missing})",
            file=path,
        )
    return PredictionSet(
        name=name,
        probabilities=aligned,
        source=str(path),
        score_kind=kind,
        renormalized_rows=renormalized,
        dropped_rows=dropped,
        warnings=warnings,
    )


def _read_npy(
    path: Path, *, order: list[str] | None, npy_classes: list[str] | None, classes: list[str]
) -> tuple[np.ndarray, list[str], list[str], str | None]:
    if npy_classes is None:
        raise ValidationError("a .npy prediction file needs the class order of its columns (--classes)", file=path)
    if order is None:
        raise ValidationError("a .npy prediction file needs the manifest order of the samples", file=path)
    if not path.exists():
        raise ValidationError("file not found", file=path)
    try:
        matrix = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValidationError(f"cannot read .npy array: {exc}", file=path) from exc
    if matrix.ndim != 2:
        raise ValidationError(f"expected a 2-D array (N samples × K classes), got shape {matrix.shape}", file=path)
    if not np.issubdtype(matrix.dtype, np.number):
        raise ValidationError(f"expected a numeric array, got dtype {matrix.dtype}", file=path)
    if matrix.shape[1] != len(npy_classes):
        raise ValidationError(
            f"class-count mismatch: the array has {matrix.shape[1]} columns but "
            f"{len(npy_classes)} class names were given",
            file=path,
        )
    if matrix.shape[0] != len(order):
        raise ValidationError(
            f"the array has {matrix.shape[0]} rows but the dataset lists {len(order)} "
            "images (rows must follow the manifest order)",
            file=path,
        )
    return matrix.astype(np.float64), list(order), list(npy_classes), None


def _read_table(
    path: Path, *, classes: list[str], sample_ids: list[str], sample_paths: list[str]
) -> tuple[np.ndarray, list[str], list[str], str | None]:
    table = read_table(path, text_columns=("id", "path"))
    if "id" in table.columns:
        key_column = "id"
        keys = table["id"]
    elif "path" in table.columns:
        key_column = "path"
        keys = table["path"]
    else:
        raise ValidationError(
            f"needs an 'id' or 'path' column to match rows to samples (columns present: {list(table.columns)})",
            file=path,
        )
    if table.empty:
        raise ValidationError("the file has a header but no rows", file=path)
    blank = keys.isna()
    if blank.any():
        raise ValidationError("empty key", file=path, row=first_rows(blank)[0], column=key_column)
    keys = keys.astype(str).str.strip()
    duplicated = keys.duplicated(keep=False)
    if duplicated.any():
        rows = first_rows(duplicated)
        raise ValidationError(
            f"duplicate ids: '{keys.iloc[rows[0] - 1]}' appears in rows {rows}",
            file=path,
            row=rows[0],
            column=key_column,
        )
    score_columns = [c for c in table.columns if c not in ("id", "path")]
    if not score_columns:
        raise ValidationError("no class columns: expected one column per class name", file=path)
    matrix = numeric_columns(
        table,
        score_columns,
        file=path,
        refuse=lambda cell: f"non-numeric value '{cell}' (class columns must hold probabilities or logits)",
    )
    if key_column == "path":
        by_path = dict(zip(sample_paths, sample_ids, strict=True))
        row_ids = [by_path.get(k, k) for k in keys]
    else:
        row_ids = keys.tolist()
    return matrix, row_ids, score_columns, key_column


def _check_classes(path: Path, file_columns: list[str], classes: list[str]) -> None:
    unknown = [c for c in file_columns if c not in set(classes)]
    if unknown:
        raise ValidationError(
            f"labels {unknown} are not classes of the dataset (dataset classes: {classes})",
            file=path,
            column=unknown[0],
        )
    missing = [c for c in classes if c not in set(file_columns)]
    if missing:
        raise ValidationError(
            f"class-count mismatch: {len(file_columns)} class columns for {len(classes)} "
            f"dataset classes; missing {missing}",
            file=path,
        )


def _check_finite(
    path: Path, matrix: np.ndarray, file_columns: list[str], row_ids: list[str], key_column: str | None
) -> None:
    bad = ~np.isfinite(matrix)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        value = matrix[row, col]
        what = "NaN (empty or not a number)" if np.isnan(value) else f"{value} (infinite)"
        raise ValidationError(
            f"value is {what} for sample '{row_ids[row]}'; {int(bad.any(axis=1).sum())} row(s) affected",
            file=path,
            row=int(row) + 1,
            column=file_columns[col],
        )


def _detect_kind(path: Path, matrix: np.ndarray, file_columns: list[str], scores: str) -> str:
    in_unit = (matrix >= 0.0) & (matrix <= 1.0)
    if scores == "logits":
        return "logits"
    if in_unit.all():
        return "probabilities"
    sums_to_one = np.abs(matrix.sum(axis=1) - 1.0) <= EXACT_SUM_TOLERANCE
    if scores == "probabilities" or sums_to_one.mean() >= 0.9:
        negative = matrix < 0.0
        row, col = np.argwhere(negative if negative.any() else ~in_unit)[0]
        value = matrix[row, col]
        problem = "negative probability" if value < 0 else "probability above 1"
        raise ValidationError(
            f"{problem} {value:g} ({int((~in_unit).any(axis=1).sum())} row(s) affected); "
            "pass --scores logits if the file holds logits",
            file=path,
            row=int(row) + 1,
            column=file_columns[col],
        )
    return "logits"


def _count_renormalized(matrix: np.ndarray, sum_tolerance: float) -> int:
    deviation = np.abs(matrix.sum(axis=1) - 1.0)
    return int(((deviation > EXACT_SUM_TOLERANCE) & (deviation <= sum_tolerance)).sum())


def _check_sums(path: Path, matrix: np.ndarray, sum_tolerance: float) -> tuple[np.ndarray, int]:
    sums = matrix.sum(axis=1)
    deviation = np.abs(sums - 1.0)
    rejected = deviation > sum_tolerance
    if rejected.any():
        row = int(np.flatnonzero(rejected)[0])
        raise ValidationError(
            f"probabilities sum to {sums[row]:.4f}, not 1 ({int(rejected.sum())} row(s) off by "
            f"more than the tolerance {sum_tolerance}; raise --sum-tolerance to renormalise "
            "them, or pass --scores logits if they are logits)",
            file=path,
            row=row + 1,
        )
    return matrix / sums[:, None], _count_renormalized(matrix, sum_tolerance)
