"""What a workspace holds, in numbers: shared by ``robustlens info`` and the dashboard overview."""

from __future__ import annotations

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
