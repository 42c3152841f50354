"""Label-issue stage: planted label flips on the real Fashion-MNIST sample, both probability sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustlens.analysis import storage
from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace
from robustlens.analysis.stages import label_issues
from robustlens.analysis.stages.base import StageContext
from robustlens.analysis.workspace import Workspace
from tests.conftest import SAMPLE_DATA

FLIP_FRACTION = 0.05


def flip_labels(labels: pd.Series, fraction: float, seed: int) -> tuple[pd.Series, np.ndarray]:
    """Move ``fraction`` of ``labels`` (seeded) to a different, random class; returns them and the flipped rows."""
    rng = np.random.default_rng(seed)
    classes = np.array(sorted(labels.unique()))
    flipped = rng.choice(len(labels), size=int(round(fraction * len(labels))), replace=False)
    index = pd.Series(np.arange(len(classes)), index=classes)[labels].to_numpy()
    shift = rng.integers(1, len(classes), size=len(flipped))
    new = labels.to_numpy().copy()
    new[flipped] = classes[(index[flipped] + shift) % len(classes)]
    return pd.Series(new, index=labels.index), flipped


@pytest.fixture(scope="module")
def flipped(tmp_path_factory) -> dict:
    """Sample workspace whose manifest has 5 % of its labels flipped, with the shipped predictions."""
    tmp = tmp_path_factory.mktemp("label_flips")
    manifest = pd.read_csv(SAMPLE_DATA / "labels.csv")
    original = manifest["label"].copy()
    manifest["label"], rows = flip_labels(manifest["label"], FLIP_FRACTION, seed=7)
    manifest.to_csv(tmp / "labels.csv", index=False)
    workspace, _ = init_workspace(
        tmp / "ws",
        InitOptions(
            data=SAMPLE_DATA,
            labels=tmp / "labels.csv",
            predictions=[("cnn", SAMPLE_DATA / "predictions.csv")],
            progress=False,
        ),
    )
    planted = set(manifest["path"].iloc[rows])
    original_by_id = dict(zip(manifest["path"], original, strict=True))
    return {"root": workspace.root, "planted": planted, "original": original_by_id}


def _rates(flagged: set[str], planted: set[str]) -> tuple[float, float]:
    hits = len(flagged & planted)
    return hits / max(len(flagged), 1), hits / len(planted)


@pytest.mark.parametrize("filter_by", ["low_self_confidence", "prune_by_noise_rate"])
def test_planted_flips_are_found_with_given_probabilities(flipped, filter_by):
    workspace = Workspace(flipped["root"])
    summary = label_issues.run(
        StageContext(workspace=workspace, progress=False), label_issues.Config(filter_by=filter_by)
    )
    assert summary["probability_source"] == "given" and summary["prediction_set"] == "cnn"

    table = pd.read_parquet(workspace.artifact_path("label_issues.parquet"))
    assert table["id"].tolist() == workspace.samples["id"].tolist()
    flagged = set(table.loc[table["is_label_issue"], "id"])
    precision, recall = _rates(flagged, flipped["planted"])

    # The model's own mistakes (8 %) are real disagreements (some are genuine Fashion-MNIST label errors),
    # so precision is also measured on the samples the model got right before the flip.
    probabilities = workspace.predictions("cnn")
    predicted = np.asarray(workspace.classes)[probabilities.argmax(axis=1)]
    originally_right = {
        i for i, p in zip(workspace.samples["id"], predicted, strict=True) if flipped["original"][i] == p
    }
    clean_precision, clean_recall = _rates(flagged & originally_right, flipped["planted"] & originally_right)
    print(
        f"\nlabel issues (given probabilities, {filter_by}): {len(flagged)} flagged, recall {recall:.3f}, precision "
        f"{precision:.3f}; on originally-correct samples precision {clean_precision:.3f}, recall {clean_recall:.3f}"
    )
    assert recall >= 0.9
    assert clean_precision >= 0.9
    assert precision >= 0.4
    assert summary["num_label_issues"] == len(flagged)

    # Rank 1 is the lowest label quality; suggested labels fix most planted flips the model got right.
    assert table.sort_values("rank")["label_quality"].is_monotonic_increasing
    fixed = table[table["id"].isin(flipped["planted"] & originally_right)]
    restored = (fixed["suggested_label"] == fixed["id"].map(flipped["original"])).mean()
    assert restored >= 0.95


def test_label_issue_artifacts_follow_the_contracts(flipped):
    workspace = Workspace(flipped["root"])
    context = StageContext(workspace=workspace, progress=False)
    label_issues.run(context, label_issues.Config())
    table = pd.read_parquet(workspace.artifact_path("label_issues.parquet"))
    flags = pd.read_parquet(workspace.artifact_path("flags_label_issues.parquet"))
    assert list(flags.columns) == ["id", "issue", "severity", "explanation"]
    assert set(flags["id"]) == set(table.loc[table["is_label_issue"], "id"])
    assert (flags["issue"] == "label_issue").all()
    assert flags["severity"].between(0, 1).all()
    merged = flags.merge(table, on="id")
    assert np.allclose(merged["severity"], 1 - merged["label_quality"])
    row = merged.iloc[0]
    assert row["explanation"].startswith(
        f"labelled '{row['given_label']}' but the model gives "
        f"'{row['suggested_label']}' {row['suggested_label_probability']:.2f}"
    )

    per_class = pd.read_parquet(workspace.artifact_path("label_class_summary.parquet"))
    assert per_class["class"].tolist() == workspace.classes
    assert per_class["num_samples"].sum() == len(workspace.samples)
    assert per_class["num_flagged"].sum() == table["is_label_issue"].sum()
    overlap = pd.read_parquet(workspace.artifact_path("overlapping_classes.parquet"))
    assert {"class_a", "class_b", "num_overlapping", "joint_probability"} <= set(overlap.columns)
    assert (overlap["class_a"] != overlap["class_b"]).all()
    assert overlap["joint_probability"].is_monotonic_decreasing

    again = label_issues.run(context, label_issues.Config())
    assert again["skipped"] is True and again["num_label_issues"] == len(flags)


def _separable_embeddings(original_labels: list[str], seed: int) -> np.ndarray:
    """``(N, 32)`` L2-normalised embeddings clustered by the *original* (unflipped) class."""
    rng = np.random.default_rng(seed)
    classes, index = np.unique(original_labels, return_inverse=True)
    centres = rng.normal(size=(len(classes), 32)) * 3
    embeddings = centres[index] + rng.normal(size=(len(index), 32))
    return (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float32)


def test_cross_validated_probabilities_find_planted_flips(flipped):
    workspace = Workspace(flipped["root"])
    original = [flipped["original"][i] for i in workspace.samples["id"]]
    storage.write_npy(workspace.artifact_path("embeddings.npy"), _separable_embeddings(original, seed=3))
    context = StageContext(workspace=workspace, progress=False, random_state=1)
    # The predictions are declared in-sample, so "auto" must fall back to cross-validation on embeddings.
    summary = label_issues.run(context, label_issues.Config(predictions_in_sample=True))
    assert summary["probability_source"] == "cross_validated"
    assert summary["embeddings"] == "artifacts/embeddings.npy"
    table = pd.read_parquet(workspace.artifact_path("label_issues.parquet"))
    precision, recall = _rates(set(table.loc[table["is_label_issue"], "id"]), flipped["planted"])
    print(f"\nlabel issues (cross-validated on embeddings): precision {precision:.3f}, recall {recall:.3f}")
    assert precision >= 0.9 and recall >= 0.9
    flags = pd.read_parquet(workspace.artifact_path("flags_label_issues.parquet"))
    assert flags["explanation"].str.contains("cross-validated on embeddings").all()


def test_cross_validated_probabilities_are_out_of_fold():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    # Pure noise features: a classifier that saw a sample's label in training would be confident on it;
    # out-of-fold probabilities stay near chance.
    probabilities = label_issues.cross_validated_probabilities(
        rng.normal(size=(60, 50)), labels, 4, folds=5, random_state=0, c=100.0
    )
    assert probabilities.shape == (60, 4)
    assert np.allclose(probabilities[:, 3], 0) and np.allclose(probabilities.sum(axis=1), 1)
    assert probabilities[np.arange(60), labels].mean() < 0.5
    with pytest.raises(ValueError, match="at least 2 samples per class"):
        label_issues.cross_validated_probabilities(np.zeros((5, 2)), np.array([0, 0, 1, 1, 2]), 3)


@pytest.fixture(scope="module")
def bare_workspace(tmp_path_factory) -> Path:
    """40 sample images, no predictions and no embeddings."""
    tmp = tmp_path_factory.mktemp("bare")
    pd.read_csv(SAMPLE_DATA / "labels.csv").head(40).to_csv(tmp / "labels.csv", index=False)
    workspace, _ = init_workspace(tmp / "ws", InitOptions(data=SAMPLE_DATA, labels=tmp / "labels.csv", progress=False))
    return workspace.root


def test_without_predictions_or_embeddings_the_error_says_what_is_missing(bare_workspace):
    context = StageContext(workspace=Workspace(bare_workspace), progress=False)
    with pytest.raises(ValueError, match="neither"):
        label_issues.run(context, label_issues.Config())
    with pytest.raises(ValueError, match="no prediction sets"):
        label_issues.run(context, label_issues.Config(probabilities="given"))
    with pytest.raises(ValueError, match="needs embeddings"):
        label_issues.run(context, label_issues.Config(probabilities="cross_validated"))
    with pytest.raises(ValueError, match="probabilities must be one of"):
        label_issues.run(context, label_issues.Config(probabilities="magic"))
