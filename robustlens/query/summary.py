"""What a workspace holds, in numbers: shared by ``robustlens info`` and the dashboard overview."""

from __future__ import annotations

import numpy as np
import pandas as pd

from robustlens.analysis import artifacts
from robustlens.analysis.workspace import Workspace


def prediction_accuracy(workspace: Workspace, name: str) -> float:
    """Top-1 accuracy of prediction set ``name`` against the given labels."""
    probabilities = workspace.predictions(name)
    labels = workspace.samples["label_index"].to_numpy()
    return float((probabilities.argmax(axis=1) == labels).mean())


def class_balance(workspace: Workspace) -> pd.DataFrame:
    """Per class (workspace order): ``class``, ``count``, ``share``."""
    counts = workspace.samples["label"].value_counts()
    frame = pd.DataFrame({"class": workspace.classes})
    frame["count"] = frame["class"].map(counts).fillna(0).astype(int)
    frame["share"] = frame["count"] / max(int(frame["count"].sum()), 1)
    return frame


def summarize(workspace: Workspace) -> dict:
    """Counts, classes, splits, prediction sets with accuracy, model, embeddings and curation state."""
    samples = workspace.samples
    report = workspace.ingest_report()
    manifest = workspace.manifest
    model = manifest.get("model")
    with_model = None
    if model is not None:
        config = model["config"]
        with_model = (f"{model.get('file') or model.get('factory')} (input {config['input_size'][0]}×"
                      f"{config['input_size'][1]}×{config['channels']})")
    embeddings = manifest.get("embeddings")
    store = workspace.curation()
    try:
        curation = store.counts()
    finally:
        store.close()
    return {
        "workspace": str(workspace.root),
        "dataset_root": str(workspace.dataset_root),
        "dataset_kind": manifest["dataset"]["kind"],
        "num_samples": int(len(samples)),
        "num_skipped": len(report.get("skipped", [])),
        "classes": workspace.classes,
        "class_counts": {str(k): int(v) for k, v in samples["label"].value_counts().items()},
        "split_counts": {str(k): int(v) for k, v in samples["split"].value_counts().sort_index().items()},
        "metadata_columns": [c.removeprefix("meta.") for c in manifest.get("metadata_columns", [])],
        "prediction_sets": {
            name: {"accuracy": prediction_accuracy(workspace, name), "score_kind": entry["score_kind"],
                   "source": entry["source"]}
            for name, entry in manifest.get("prediction_sets", {}).items()},
        "model": with_model,
        "embeddings": f"imported, {embeddings['dim']} dimensions" if embeddings else None,
        "curation": curation,
    }


def analysis_overview(workspace: Workspace) -> dict:
    """What the analysis found: issue counts, accuracy per prediction set, worst slices (when present)."""
    samples = workspace.samples
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
    counts = pd.crosstab(table["label"], table[f"pred.{prediction_set}.label"], dropna=False)
    return counts.reindex(index=classes, columns=classes, fill_value=0)


def per_class_recall(counts: pd.DataFrame) -> pd.DataFrame:
    """From :func:`confusion_counts`: per class ``class``, ``support`` (samples given it) and ``recall``."""
    support = counts.sum(axis=1)
    return pd.DataFrame({"class": counts.index, "support": support.to_numpy(),
                         "recall": np.diag(counts.to_numpy()) / np.maximum(support.to_numpy(), 1)})


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
