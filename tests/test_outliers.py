"""Outliers stage on real Fashion-MNIST images with planted images from other distributions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from robustlens.analysis.stages import embeddings, outliers
from robustlens.analysis.stages.base import StageContext
from tests.test_duplicates import init_planted, precision_recall


@pytest.fixture(scope="module")
def outlier_run(tmp_path_factory):
    workspace, planted = init_planted(tmp_path_factory.mktemp("planted_outliers"), seed=1)
    context = StageContext(workspace=workspace, progress=False)
    embeddings.run(context, embeddings.Config())
    summary = outliers.run(context, outliers.Config())
    return workspace, planted, summary


def test_planted_outliers_precision_recall(outlier_run):
    workspace, planted, summary = outlier_run
    table = pd.read_parquet(workspace.artifact_path("outliers.parquet"))
    flagged = set(table.loc[table["is_outlier"], "id"])
    precision, recall = precision_recall(flagged, planted.outliers)
    print(
        f"outliers: precision {precision:.3f} recall {recall:.3f} ({len(planted.outliers)} planted, "
        f"{len(flagged)} flagged)"
    )
    assert precision >= 0.9 and recall >= 0.9
    assert summary["outliers"] == len(flagged)
    # the planted ones are the most atypical images, whatever the threshold
    top = set(table.nlargest(len(planted.outliers), "outlier_score")["id"])
    assert len(top & planted.outliers) >= 0.9 * len(planted.outliers)


def test_outputs_and_flags(outlier_run):
    workspace, planted, _ = outlier_run
    table = pd.read_parquet(workspace.artifact_path("outliers.parquet"))
    assert table["id"].tolist() == workspace.samples["id"].tolist()
    assert {"id", "knn_distance", "ood_score", "is_outlier"} <= set(table.columns)
    assert table["ood_score"].between(0, 1).all() and (table["knn_distance"] >= 0).all()
    flags = pd.read_parquet(workspace.artifact_path("flags_outliers.parquet"))
    assert list(flags.columns) == ["id", "issue", "severity", "explanation"]
    assert set(flags["id"]) == set(table.loc[table["is_outlier"], "id"])
    assert (flags["issue"] == "outlier").all() and flags["severity"].between(0.5, 1).all()
    assert flags["explanation"].str.contains("nearest neighbours").all()


def test_rerun_is_skipped(outlier_run):
    workspace, _, first = outlier_run
    context = StageContext(workspace=workspace, progress=False)
    again = outliers.run(context, outliers.Config())
    assert again["skipped"] is True and again["outliers"] == first["outliers"]
    assert outliers.run(context, outliers.Config(threshold=5.0))["skipped"] is False


def test_cleanlab_scores_from_shared_graph_match_cleanlab_itself():
    """Our precomputed-graph adapter gives cleanlab's own feature OOD scores (its cosine kNN, k=10)."""
    from cleanlab.outlier import OutOfDistribution

    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 16)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    indices, euclidean = embeddings.knn_search(features, 10, random_state=0)
    ours = outliers.cleanlab_ood_scores(features, indices, np.square(euclidean) / 2.0)
    reference = OutOfDistribution().fit_score(features=features, verbose=False)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_robust_threshold_and_guard():
    rng = np.random.default_rng(0)
    distances = np.exp(rng.normal(0.0, 0.1, 1000))
    distances[:3] = [5.0, 8.0, 1.9]
    z = outliers.robust_log_z(distances)
    assert z[1] > z[0] > 10 and 3.5 < z[2] < 10
    flagged = outliers.select_outliers(z, threshold=3.5, max_fraction=0.02)
    assert set(np.flatnonzero(flagged)) >= {0, 1, 2} and flagged.sum() <= 20
    guarded = outliers.select_outliers(z, threshold=3.5, max_fraction=0.002)
    assert np.flatnonzero(guarded).tolist() == [0, 1]
    # identical distances (MAD = 0) do not turn tiny deviations into outliers
    flat = outliers.robust_log_z(np.r_[np.ones(99), 1.01])
    assert flat.max() < 3.5


def test_reference_subset_distances_keep_the_outlier_on_top():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(3000, 8)).astype(np.float32)
    vectors[7] += 12.0
    full = outliers.reference_distances(vectors, 10, max_reference=5000, random_state=0)
    subset = outliers.reference_distances(vectors, 10, max_reference=500, random_state=0)
    assert full.argmax() == subset.argmax() == 7
    assert np.corrcoef(full, subset)[0, 1] > 0.8
