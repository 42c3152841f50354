"""One table with everything known per sample: the rows every dashboard page, filter and export read.

:func:`load_sample_table` starts from ``samples.parquet`` (row order = the order of every workspace
array) and joins, by ``id``, every per-sample artifact that exists. Column names say where a column
came from, so a new artifact never collides with an old one:

=============================  ==========================================================================
column                         source
=============================  ==========================================================================
``id, path, label, split, …``  ``samples.parquet`` (``meta.<name>`` = user metadata)
``metric.<name>``              ``artifacts/metrics.parquet``
``issue.<type>``               ``artifacts/issue_matrix.parquet`` (severity, 0 = not flagged), plus
                               ``issue_count`` and ``max_severity``
``pred.<set>.label`` …         ``predictions/<set>.npy`` (``label``, ``confidence``, ``correct``,
                               ``margin``, ``given_prob``) and ``artifacts/eval_samples_<set>.parquet``
                               (its other columns, e.g. ``log_loss``, ``true_rank``)
``label_issue.<column>``       ``artifacts/label_issues.parquet`` (``suggested_label``,
                               ``label_quality``, ``is_label_issue``, ``rank``)
``dup.<column>``               ``artifacts/duplicates.parquet``
``outlier.<column>``           ``artifacts/outliers.parquet`` (e.g. ``outlier_score``, ``is_outlier``)
``map.x``, ``map.y``           ``artifacts/projection.parquet``
``<name>.<column>``            any ``artifacts/per_sample_<name>.parquet`` with an ``id`` column — the
                               way later stages (e.g. robustness) add per-sample columns
=============================  ==========================================================================

Samples an artifact does not cover get missing values (NaN / ``<NA>``). Nothing here imports streamlit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from robustlens.analysis.workspace import Workspace

#: Columns of ``samples.parquet`` that identify a sample rather than describe it.
IDENTITY_COLUMNS = ("id", "path", "content_hash")
#: Categorical columns the filter engine offers as value lists.
CATEGORY_COLUMNS = ("label", "split")
PER_SAMPLE_PREFIX = "per_sample_"


@dataclass(frozen=True)
class ArtifactJoin:
    """How one per-sample artifact joins the table.

    Attributes
    ----------
    artifact:
        File name under ``artifacts/`` (without ``.parquet``).
    prefix:
        Prefix of its columns in the table (``""``: joined as they are).
    drop:
        Columns not joined (duplicates of sample columns).
    """

    artifact: str
    prefix: str
    drop: tuple[str, ...] = ()


#: The known per-sample artifacts, in join order.
JOINS: tuple[ArtifactJoin, ...] = (
    ArtifactJoin("metrics", "metric."),
    ArtifactJoin("issue_matrix", "issue."),
    ArtifactJoin("label_issues", "label_issue.", drop=("given_label",)),
    ArtifactJoin("duplicates", "dup."),
    ArtifactJoin("outliers", "outlier."),
    ArtifactJoin("projection", "map."),
    # Written by `robustlens robustness`; its columns already carry the `rob_` prefix.
    ArtifactJoin("robustness_samples", ""),
)
#: Issue-matrix columns that summarise all issue types and keep their own names.
ISSUE_SUMMARY_COLUMNS = ("issue_count", "max_severity")


def load_sample_table(workspace: Workspace, *, prediction_sets: Iterable[str] | None = None) -> pd.DataFrame:
    """Join samples, metrics, issues, predictions, label issues, duplicates and projection by id.

    Parameters
    ----------
    workspace:
        The workspace to read.
    prediction_sets:
        Prediction sets to add columns for (default: all of the workspace's).

    Returns
    -------
    pandas.DataFrame
        One row per sample in ``samples.parquet`` order, a ``RangeIndex``, columns as in the module
        docstring. ``label``, ``split`` and predicted labels are categoricals (fast to filter on).
    """
    samples = workspace.samples
    table = samples.copy()
    for column in CATEGORY_COLUMNS:
        table[column] = pd.Categorical(table[column], categories=_category_order(workspace, column, table))
    parts = [table]
    ids = samples["id"]
    for join in JOINS:
        frame = _read(workspace.artifact_path(f"{join.artifact}.parquet"))
        if frame is not None:
            parts.append(_aligned(frame, ids, prefix=join.prefix, drop=join.drop, source=join.artifact))
    for name in (workspace.prediction_names if prediction_sets is None else list(prediction_sets)):
        parts.append(prediction_columns(workspace, name))
    for path in sorted(workspace.artifact_path("").glob(f"{PER_SAMPLE_PREFIX}*.parquet")):
        frame = _read(path)
        prefix = path.stem.removeprefix(PER_SAMPLE_PREFIX) + "."
        parts.append(_aligned(frame, ids, prefix=prefix, drop=(), source=path.stem))
    table = pd.concat(parts, axis=1)
    for column in ISSUE_SUMMARY_COLUMNS:
        prefixed = f"issue.{column}"
        if prefixed in table.columns:
            table = table.rename(columns={prefixed: column})
    if "label_issue.suggested_label" in table.columns:
        table["label_issue.suggested_label"] = pd.Categorical(table["label_issue.suggested_label"],
                                                              categories=workspace.classes)
    # Where the rows came from: slice filters read this workspace's slice masks (rows = samples order).
    table.attrs["robustlens.workspace"] = str(workspace.root)
    return table


def prediction_columns(workspace: Workspace, name: str) -> pd.DataFrame:
    """Per-sample columns of prediction set ``name``, prefixed ``pred.<name>.``.

    ``label`` (predicted class), ``confidence`` (top probability), ``correct`` (prediction = given label),
    ``margin`` (top minus second probability), ``given_prob`` (probability of the given label), then any
    other column of ``artifacts/eval_samples_<name>.parquet`` (e.g. ``log_loss``, ``true_rank``).
    """
    probabilities = workspace.predictions(name)
    samples = workspace.samples
    if probabilities.shape[0] != len(samples):
        raise ValueError(f"prediction set '{name}' has {probabilities.shape[0]} rows, samples.parquet has "
                         f"{len(samples)}")
    classes = workspace.classes
    predicted = probabilities.argmax(axis=1)
    rows = np.arange(len(samples))
    top = probabilities[rows, predicted]
    if probabilities.shape[1] > 1:
        second = np.partition(probabilities, -2, axis=1)[:, -2]
    else:
        second = np.zeros(len(samples), dtype=probabilities.dtype)
    given = samples["label_index"].to_numpy()
    prefix = f"pred.{name}."
    frame = pd.DataFrame({
        prefix + "label": pd.Categorical.from_codes(predicted, categories=classes),
        prefix + "confidence": top.astype(np.float32),
        prefix + "correct": predicted == given,
        prefix + "margin": (top - second).astype(np.float32),
        prefix + "given_prob": probabilities[rows, given].astype(np.float32),
    })
    extra = _read(workspace.artifact_path(f"eval_samples_{name}.parquet"))
    if extra is not None:
        known = {"label", "predicted_label", "correct", "confidence", "margin"}  # computed above (label: given)
        extra = extra[[c for c in extra.columns if c == "id" or c not in known]]
        if len(extra.columns) > 1:
            frame = pd.concat([frame, _aligned(extra, samples["id"], prefix=prefix, drop=(),
                                               source=f"eval_samples_{name}")], axis=1)
    return frame


def issue_types(table: pd.DataFrame) -> list[str]:
    """Issue types present in ``table`` (from its ``issue.<type>`` columns), sorted."""
    return sorted(c.removeprefix("issue.") for c in table.columns if c.startswith("issue."))


def prediction_sets(table: pd.DataFrame) -> list[str]:
    """Prediction sets with columns in ``table``, in column order."""
    names = [c.removeprefix("pred.").removesuffix(".label") for c in table.columns
             if c.startswith("pred.") and c.endswith(".label")]
    return list(dict.fromkeys(names))


def numeric_columns(table: pd.DataFrame) -> list[str]:
    """Columns a range filter or a sort can use: numbers and booleans, not identities."""
    skip = {"label_index", *IDENTITY_COLUMNS}
    return [c for c in table.columns if c not in skip
            and (pd.api.types.is_numeric_dtype(table[c]) or pd.api.types.is_bool_dtype(table[c]))
            and not isinstance(table[c].dtype, pd.CategoricalDtype)]


def metadata_columns(table: pd.DataFrame) -> list[str]:
    """User metadata columns (``meta.<name>``)."""
    return [c for c in table.columns if c.startswith("meta.")]


def display_name(column: str) -> str:
    """A short human label for a table column (``metric.brightness`` → ``brightness``)."""
    if column.startswith("metric."):
        return column.removeprefix("metric.").replace("_", " ")
    if column.startswith("issue."):
        return "issue: " + column.removeprefix("issue.").replace("_", " ")
    if column.startswith("pred."):
        name, _, field = column.removeprefix("pred.").rpartition(".")
        return f"{name}: {field.replace('_', ' ')}"
    if column.startswith("label_issue."):
        field = column.removeprefix("label_issue.")
        return {"rank": "label-issue rank", "is_label_issue": "is label issue"}.get(field, field.replace("_", " "))
    if column.startswith("dup."):
        return "duplicates: " + column.removeprefix("dup.").replace("_", " ")
    if column.startswith("outlier."):
        return "outliers: " + column.removeprefix("outlier.").replace("_", " ")
    if column.startswith("map."):
        return "map " + column.removeprefix("map.")
    if column.startswith("meta."):
        return column.removeprefix("meta.")
    if column.startswith("rob_"):
        return "robustness: " + column.removeprefix("rob_").replace("_", " ")
    return column.replace("_", " ")


def _category_order(workspace: Workspace, column: str, table: pd.DataFrame) -> list[str]:
    values = sorted(str(v) for v in table[column].dropna().unique())
    if column == "label":
        return list(dict.fromkeys([*workspace.classes, *values]))
    return values


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.exists() else None


def _aligned(frame: pd.DataFrame, ids: pd.Series, *, prefix: str, drop: tuple[str, ...], source: str) -> pd.DataFrame:
    """``frame``'s columns (minus ``id`` and ``drop``) in the row order of ``ids``, renamed with ``prefix``."""
    if "id" not in frame.columns:
        raise ValueError(f"artifact '{source}' has no 'id' column (columns: {list(frame.columns)})")
    if frame["id"].duplicated().any():
        repeated = frame["id"][frame["id"].duplicated()].iloc[0]
        raise ValueError(f"artifact '{source}' has repeated ids, e.g. '{repeated}'")
    values = frame.drop(columns=["id", *[c for c in drop if c in frame.columns]])
    same_order = len(frame) == len(ids) and bool((frame["id"].to_numpy() == ids.to_numpy()).all())
    if same_order:
        values = values.reset_index(drop=True)
    else:
        positions = pd.Index(frame["id"]).get_indexer(ids)
        values = values.reset_index(drop=True)
        values = values.iloc[positions] if (positions >= 0).all() else _take_with_missing(values, positions)
        values = values.reset_index(drop=True)
    values.columns = [prefix + c for c in values.columns]
    return values


def _take_with_missing(values: pd.DataFrame, positions: np.ndarray) -> pd.DataFrame:
    """Rows of ``values`` at ``positions``; ``-1`` gives a row of missing values (dtypes widened as needed)."""
    padded = values.reindex(range(len(values) + 1))
    return padded.iloc[np.where(positions >= 0, positions, len(values))]
