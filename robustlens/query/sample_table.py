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
``rob.<field>``                ``artifacts/robustness_samples.parquet`` (stored as ``rob_<field>``)
``<name>.<column>``            any ``artifacts/per_sample_<name>.parquet`` with an ``id`` column — the
                               way later stages add per-sample columns
=============================  ==========================================================================

One convention for every joined stage column: ``<prefix>.<column>``. Artifacts keep their own column names
(``robustness_samples.parquet`` still stores ``rob_clean_correct``); only the table renames. Saved filters
and links written before the rename (``rob_clean_correct``) still load: :data:`COLUMN_ALIASES` maps old
names to new ones (applied by :meth:`robustlens.query.filters.FilterSpec.from_dict`).

Samples an artifact does not cover get missing values (NaN / ``<NA>``). Artifacts are read only through
:mod:`robustlens.analysis.artifacts`. Nothing here imports streamlit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from robustlens.analysis import artifacts
from robustlens.analysis.workspace import Workspace
from robustlens.errors import WorkspaceError

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
        Prefix of its columns in the table (``<source>.``).
    drop:
        Columns not joined (duplicates of sample columns).
    strip:
        A prefix the artifact's own column names carry, removed before ``prefix`` is added.
    """

    artifact: str
    prefix: str
    drop: tuple[str, ...] = ()
    strip: str = ""


#: The known per-sample artifacts, in join order.
JOINS: tuple[ArtifactJoin, ...] = (
    ArtifactJoin("metrics", "metric."),
    ArtifactJoin("issue_matrix", "issue."),
    ArtifactJoin("label_issues", "label_issue.", drop=("given_label",)),
    ArtifactJoin("duplicates", "dup."),
    ArtifactJoin("outliers", "outlier."),
    ArtifactJoin("projection", "map."),
    # Written by the robustness stage; its file's columns are `rob_<field>`, the table's `rob.<field>`.
    ArtifactJoin("robustness_samples", "rob.", strip="rob_"),
)
#: Old sample-table column name prefix → the current one, for saved filters and links written before the
#: table named every joined column ``<source>.<column>`` (``rob_clean_correct`` → ``rob.clean_correct``).
COLUMN_ALIASES: dict[str, str] = {"rob_": "rob."}


def current_column_name(column: str) -> str:
    """``column`` under its current sample-table name (see :data:`COLUMN_ALIASES`); other names unchanged."""
    for old, new in COLUMN_ALIASES.items():
        if column.startswith(old):
            return new + column.removeprefix(old)
    return column


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
        frame = artifacts.read_per_sample(workspace, join.artifact)
        if frame is not None:
            parts.append(_aligned(frame, ids, prefix=join.prefix, drop=join.drop, strip=join.strip))
    for name in workspace.prediction_names if prediction_sets is None else list(prediction_sets):
        parts.append(prediction_columns(workspace, name))
    for name in artifacts.per_sample_names(workspace):
        frame = artifacts.read_per_sample(workspace, name)
        prefix = name.removeprefix(PER_SAMPLE_PREFIX) + "."
        parts.append(_aligned(frame, ids, prefix=prefix, drop=()))
    table = pd.concat(parts, axis=1)
    for column in ISSUE_SUMMARY_COLUMNS:
        prefixed = f"issue.{column}"
        if prefixed in table.columns:
            table = table.rename(columns={prefixed: column})
    if "label_issue.suggested_label" in table.columns:
        table["label_issue.suggested_label"] = pd.Categorical(
            table["label_issue.suggested_label"], categories=workspace.classes
        )
    return table


def prediction_columns(workspace: Workspace, name: str) -> pd.DataFrame:
    """Per-sample columns of prediction set ``name``, prefixed ``pred.<name>.``.

    ``label`` (predicted class), ``confidence`` (top probability), ``correct`` (prediction = given label),
    ``margin`` (top minus second probability), ``given_prob`` (probability of the given label), then any
    other column of ``artifacts/eval_samples_<name>.parquet`` (e.g. ``log_loss``, ``true_rank``).
    """
    probabilities = workspace.predictions(name)
    samples = workspace.samples
    if probabilities.ndim != 2 or probabilities.shape[0] != len(samples):
        raise WorkspaceError(
            f"prediction set '{name}' has shape {probabilities.shape}, samples.parquet has "
            f"{len(samples)} rows; re-run 'robustlens init --force'"
        )
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
    frame = pd.DataFrame(
        {
            prefix + "label": pd.Categorical.from_codes(predicted, categories=classes),
            prefix + "confidence": top.astype(np.float32),
            prefix + "correct": predicted == given,
            prefix + "margin": (top - second).astype(np.float32),
            prefix + "given_prob": probabilities[rows, given].astype(np.float32),
        }
    )
    extra = artifacts.read_per_sample(workspace, f"eval_samples_{name}")
    if extra is not None:
        known = {"label", "predicted_label", "correct", "confidence", "margin"}  # computed above (label: given)
        extra = extra[[c for c in extra.columns if c == "id" or c not in known]]
        if len(extra.columns) > 1:
            frame = pd.concat([frame, _aligned(extra, samples["id"], prefix=prefix, drop=())], axis=1)
    return frame


def issue_types(table: pd.DataFrame) -> list[str]:
    """Issue types present in ``table`` (from its ``issue.<type>`` columns), sorted."""
    return sorted(c.removeprefix("issue.") for c in table.columns if c.startswith("issue."))


def prediction_sets(table: pd.DataFrame) -> list[str]:
    """Prediction sets with columns in ``table``, in column order."""
    names = [
        c.removeprefix("pred.").removesuffix(".label")
        for c in table.columns
        if c.startswith("pred.") and c.endswith(".label")
    ]
    return list(dict.fromkeys(names))


def numeric_columns(table: pd.DataFrame) -> list[str]:
    """Columns a range filter or a sort can use: numbers and booleans, not identities."""
    skip = {"label_index", *IDENTITY_COLUMNS}
    return [
        c
        for c in table.columns
        if c not in skip
        and (pd.api.types.is_numeric_dtype(table[c]) or pd.api.types.is_bool_dtype(table[c]))
        and not isinstance(table[c].dtype, pd.CategoricalDtype)
    ]


def column_bounds(table: pd.DataFrame) -> dict[str, tuple[float, float, bool]]:
    """Numeric, non-boolean, non-constant columns (:func:`numeric_columns`) → ``(min, max, is_integer)``:
    what a range filter can act on. Columns with only missing values are left out."""
    bounds = {}
    for column in numeric_columns(table):
        if pd.api.types.is_bool_dtype(table[column]):
            continue
        values = table[column].to_numpy(dtype=float, na_value=np.nan)
        if np.isnan(values).all():
            continue
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        if high > low:
            bounds[column] = (low, high, pd.api.types.is_integer_dtype(table[column]))
    return bounds


def category_values(table: pd.DataFrame, *, max_values: int = 200) -> dict[str, list[str]]:
    """``split`` and metadata columns with 1 to ``max_values`` distinct values → those values as sorted text."""
    categories = {}
    for column in ("split", *metadata_columns(table)):
        unique = table[column].dropna().unique()
        if 0 < len(unique) <= max_values:
            categories[column] = sorted(str(v) for v in unique)
    return categories


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
    if column.startswith("rob."):
        return "robustness: " + column.removeprefix("rob.").replace("_", " ")
    return column.replace("_", " ")


def _category_order(workspace: Workspace, column: str, table: pd.DataFrame) -> list[str]:
    values = sorted(str(v) for v in table[column].dropna().unique())
    if column == "label":
        return list(dict.fromkeys([*workspace.classes, *values]))
    return values


def _aligned(
    frame: pd.DataFrame, ids: pd.Series, *, prefix: str, drop: tuple[str, ...], strip: str = ""
) -> pd.DataFrame:
    """``frame``'s columns (minus ``id`` and ``drop``) in the row order of ``ids``, renamed ``prefix + name``
    (``name`` without ``strip``)."""
    values = artifacts.aligned(frame.drop(columns=[c for c in drop if c in frame.columns]), ids)
    values.columns = [prefix + c.removeprefix(strip) for c in values.columns]
    return values
