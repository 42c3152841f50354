"""What a workspace holds, in numbers: shared by ``robustlens info`` and the dashboard overview.

:func:`read_summary` reads without pandas (``robustlens info`` must start fast); the table summaries below
import it where they run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from robustlens.errors import WorkspaceError

if TYPE_CHECKING:  # pandas and the artifact readers are imported where used: read_summary must not need them
    import pandas as pd

    from robustlens.analysis.workspace import Workspace


def prediction_accuracy(workspace: Workspace, name: str) -> float:
    """Top-1 accuracy of prediction set ``name`` against the given labels."""
    probabilities = workspace.predictions(name)
    labels = workspace.samples["label_index"].to_numpy()
    return float((probabilities.argmax(axis=1) == labels).mean())


def class_balance(workspace: Workspace) -> pd.DataFrame:
    """Per class (workspace order): ``class``, ``count``, ``share``."""
    counts = workspace.samples["label"].value_counts()
    import pandas as pd

    frame = pd.DataFrame({"class": workspace.classes})
    frame["count"] = frame["class"].map(counts).fillna(0).astype(int)
    frame["share"] = frame["count"] / max(int(frame["count"].sum()), 1)
    return frame


def summarize(workspace: Workspace) -> dict:
    """Counts, classes, splits, prediction sets with accuracy, model, embeddings and curation state of an open
    workspace (:func:`read_summary` with the workspace's curation store)."""
    store = workspace.curation()
    try:
        counts = store.counts()
    finally:
        store.close()
    summary = read_summary(workspace.root, curation=counts)
    if summary is None:
        raise WorkspaceError(
            f"{workspace.root}: samples.parquet or workspace.json cannot be summarised; "
            "re-create the workspace with 'robustlens init --force'"
        )
    return summary


#: Workspace format versions :func:`read_summary` reads; any other goes through the engine (which upgrades it).
QUICK_FORMAT_VERSIONS = frozenset({1})
#: Curation-database schema versions whose row counts :func:`read_summary` reads directly (the tables it counts
#: have these names in each); any other goes through :class:`~robustlens.analysis.curation.CurationStore`.
QUICK_SCHEMA_VERSIONS = frozenset({1, 2})


def read_summary(root: Path, *, curation: dict[str, int] | None = None) -> dict[str, Any] | None:
    """What a workspace holds, read without pandas (``robustlens info`` starts in a fraction of a second), or
    ``None`` when this reader cannot be sure of the answer (then the caller opens the workspace through the engine,
    which names the problem or upgrades it). The one implementation behind :func:`summarize` too.

    ``curation``: the curation counts when the caller has them (an open store); otherwise they are read here.

    Reads ``workspace.json`` and ``ingest_report.json`` as JSON, the ``label``, ``label_index`` and ``split``
    columns of ``samples.parquet`` with pyarrow, the prediction sets with numpy and the curation counts from the
    curation store. Same keys, values and key order as ``summarize`` (tests compare the two).
    """
    import json

    manifest_path = Path(root) / "workspace.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format_version") not in QUICK_FORMAT_VERSIONS:
        return None

    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    root = Path(root)
    try:  # ParquetFile.read, not read_table (whose dataset layer imports pandas)
        samples = pq.ParquetFile(root / "samples.parquet").read(columns=["label", "label_index", "split"])
    except (OSError, ValueError, KeyError):  # missing or damaged (pyarrow's errors are these): the engine says so
        return None
    report_path = root / "ingest_report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else {}
    model = manifest.get("model")
    with_model = None
    if model is not None:
        config = model["config"]
        with_model = (
            f"{model.get('file') or model.get('factory')} (input {config['input_size'][0]}×"
            f"{config['input_size'][1]}×{config['channels']})"
        )
    embeddings = manifest.get("embeddings")
    labels = _integers(samples.column("label_index"))
    if labels is None:
        return None

    def accuracy(entry: dict[str, Any]) -> float:
        probabilities = np.load(root / entry["file"], allow_pickle=False)
        return float((probabilities.argmax(axis=1) == labels).mean())

    if curation is None and manifest.get("db_url"):
        from robustlens.analysis.curation import CurationStore
        from robustlens.errors import WorkspaceError

        try:
            store = CurationStore(manifest["db_url"])
        except WorkspaceError:
            return None  # the engine's path says why
        try:
            curation = store.counts()
        finally:
            store.close()
    elif curation is None:
        curation = _sqlite_counts(root / "curation.db")
        if curation is None:
            return None
    return {
        "workspace": str(root),
        "dataset_root": str(Path(manifest["dataset"]["root"])),
        "dataset_kind": manifest["dataset"]["kind"],
        "num_samples": samples.num_rows,
        "num_skipped": len(report.get("skipped", [])),
        "classes": list(manifest["classes"]),
        "class_counts": _value_counts(pc.value_counts(samples.column("label"))),
        "split_counts": dict(sorted(_value_counts(pc.value_counts(samples.column("split"))).items())),
        "metadata_columns": [c.removeprefix("meta.") for c in manifest.get("metadata_columns", [])],
        "prediction_sets": {
            name: {"accuracy": accuracy(entry), "score_kind": entry["score_kind"], "source": entry["source"]}
            for name, entry in manifest.get("prediction_sets", {}).items()
        },
        "model": with_model,
        "embeddings": f"imported, {embeddings['dim']} dimensions" if embeddings else None,
        "curation": curation,
    }


def _sqlite_counts(path: Path) -> dict[str, int] | None:
    """``CurationStore.counts()`` of the workspace's default SQLite curation database, read with the standard
    library (SQLAlchemy alone costs more CPU than the rest of ``robustlens info``), read-only: nothing is
    created or migrated. ``None`` when the file's schema is not one of :data:`QUICK_SCHEMA_VERSIONS` or it
    cannot be read (the caller then opens it through the engine, which says why)."""
    import sqlite3

    zero = {"tags": 0, "tag_assignments": 0, "collections": 0, "review_decisions": 0}
    if not path.exists():
        return zero  # the store creates an empty database on first use: nothing curated yet
    tables = {
        "tags": "tags",
        "tag_assignments": "sample_tags",
        "collections": "collections",
        "review_decisions": "review_decisions",
    }
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = connection.execute("SELECT value FROM schema_info WHERE key = 'schema_version'").fetchone()
            if row is None or not str(row[0]).isdigit() or int(row[0]) not in QUICK_SCHEMA_VERSIONS:
                return None
            return {
                key: int(connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                for key, table in tables.items()
            }
        finally:
            connection.close()
    except sqlite3.Error:
        return None


def _integers(column: Any) -> Any:
    """A pyarrow integer column without nulls as a numpy array (``None`` for any other column).

    Read from the column's data buffer: pyarrow's own ``to_numpy`` imports pandas.
    """
    import numpy as np
    import pyarrow as pa

    array = column.combine_chunks()
    if not pa.types.is_integer(array.type) or array.null_count:
        return None
    kind = "i" if pa.types.is_signed_integer(array.type) else "u"
    dtype = np.dtype(f"<{kind}{array.type.bit_width // 8}")
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _value_counts(counts: Any) -> dict[str, int]:
    """``{str(value): count}`` of a pyarrow ``value_counts`` result, most frequent first (ties: first seen) and
    without nulls — the order of pandas' ``Series.value_counts()``."""
    pairs = [
        (value, int(count))
        for value, count in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)
        if value is not None
    ]
    return {str(value): count for value, count in sorted(pairs, key=lambda pair: -pair[1])}


def analysis_overview(workspace: Workspace) -> dict:
    """What the analysis found: issue counts, accuracy per prediction set, worst slices (when present)."""
    samples = workspace.samples
    from robustlens.analysis import artifacts

    issues = artifacts.read_issues(workspace)
    per_issue = None if issues is None else issues.groupby("issue")["id"].nunique().sort_values(ascending=False)
    issue_counts = {} if per_issue is None else {str(k): int(v) for k, v in per_issue.items()}
    worst = artifacts.read_table(workspace, "worst_slices")
    worst_slices = [] if worst is None else worst.head(10).to_dict("records")
    source = artifacts.index_entry(workspace, "label_issues").get("probability_source")
    return {
        "num_samples": int(len(samples)),
        "issue_counts": issue_counts,
        "accuracy": {name: prediction_accuracy(workspace, name) for name in workspace.prediction_names},
        "worst_slices": worst_slices,
        "label_issue_source": source,
    }


# -- summaries of the sample table (what the overview and performance pages show) -----------------------------------
def confusion_counts(table: pd.DataFrame, prediction_set: str) -> pd.DataFrame:
    """``(K, K)`` counts: rows = given label, columns = label predicted by ``prediction_set``, both in class
    order (the table's ``label`` categories); pairs that never occur are 0."""
    classes = list(table["label"].cat.categories)
    import pandas as pd

    counts = pd.crosstab(table["label"], table[f"pred.{prediction_set}.label"], dropna=False)
    return counts.reindex(index=classes, columns=classes, fill_value=0)


def per_class_recall(counts: pd.DataFrame) -> pd.DataFrame:
    """From :func:`confusion_counts`: per class ``class``, ``support`` (samples given it) and ``recall``."""
    support = counts.sum(axis=1)
    import pandas as pd

    return pd.DataFrame(
        {
            "class": counts.index,
            "support": support.to_numpy(),
            "recall": np.diag(counts.to_numpy()) / np.maximum(support.to_numpy(), 1),
        }
    )


def table_accuracy(table: pd.DataFrame, prediction_set: str) -> float:
    """Fraction of the table's rows that ``prediction_set`` classifies as their given label."""
    return float(table[f"pred.{prediction_set}.correct"].mean())


def issue_counts(table: pd.DataFrame) -> dict[str, int]:
    """Issue type → samples flagged with it (severity > 0), from the table's ``issue.<type>`` columns, most
    frequent first (ties in name order)."""
    names = sorted(c.removeprefix("issue.") for c in table.columns if c.startswith("issue."))
    counts = {name: int((table[f"issue.{name}"] > 0).sum()) for name in names}
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def flagged_samples(table: pd.DataFrame) -> int | None:
    """Samples with at least one issue (``issue_count > 0``); ``None`` before the issues stage ran."""
    return int((table["issue_count"] > 0).sum()) if "issue_count" in table.columns else None


def most_severe(table: pd.DataFrame, issue: str, k: int) -> np.ndarray:
    """Row positions of the ``k`` samples most severely flagged with ``issue``, highest first (stable on ties; a
    partial sort, fast at a million rows). Fewer when fewer are flagged."""
    severity = table[f"issue.{issue}"].to_numpy(dtype=float, na_value=0.0)
    k = min(k, int((severity > 0).sum()))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-severity, k - 1)[:k]
    return top[np.argsort(-severity[top], kind="stable")]


# -- which image metrics can say something about errors ---------------------------------------------------------------
def constant_metrics(importance: pd.DataFrame, value: str) -> list[str]:
    """Metrics of a ``metric_importance_<set>`` table whose ``value`` column is NaN: the metric is constant on
    this dataset (e.g. ``width`` when every image is 28×28), so it cannot go with errors."""
    return importance.loc[importance[value].isna(), "metric"].astype(str).tolist()


def varying_metrics(curves: pd.DataFrame, importance: pd.DataFrame | None = None) -> list[str]:
    """Metrics of a ``metric_curves_<set>`` table with more than one bin (a constant metric has one: a single
    dot), most related to errors first when the importance table (its ``rank`` column) is given, else by name."""
    bins = curves.groupby("metric")["bin"].nunique()
    varying = sorted(str(m) for m in bins[bins > 1].index)
    if importance is not None and "rank" in importance.columns:
        rank = dict(zip(importance["metric"].astype(str), importance["rank"], strict=True))
        varying.sort(key=lambda m: (rank.get(m, float("inf")), m))
    return varying
