"""Evaluation stage: aggregates against scikit-learn, ECE against an independent reference, metric importance."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from robustlens.analysis import storage
from robustlens.analysis.stages import evaluation
from robustlens.analysis.stages.base import StageContext
from robustlens.analysis.workspace import Workspace
from robustlens.query.summary import prediction_accuracy


def _synthetic(n: int = 3000, k: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(n, k)`` probabilities that are informative but imperfect, and ``(n,)`` labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) * 1.5
    logits[np.arange(n), labels] += rng.normal(1.5, 1.0, n)
    probabilities = np.exp(logits)
    return probabilities / probabilities.sum(axis=1, keepdims=True), labels


def reference_ece(probabilities: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    """Expected calibration error written out bin by bin (Guo et al., 2017), independent of the stage."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    ece = 0.0
    for lower, upper in zip(np.linspace(0, 1, num_bins + 1)[:-1], np.linspace(0, 1, num_bins + 1)[1:], strict=True):
        members = (confidence > lower) & (confidence <= upper)
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return ece


def test_aggregates_match_scikit_learn():
    probabilities, labels = _synthetic()
    k = probabilities.shape[1]
    classes = [f"c{i}" for i in range(k)]
    report, outcomes = evaluation.evaluate(probabilities, labels, classes, top_k=(1, 3, 5, 9))
    predicted = probabilities.argmax(axis=1)
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert set(report["top_k_accuracy"]) == {"1", "3", "5"}  # 9 > K is dropped
    for key, value in report["top_k_accuracy"].items():
        assert value == pytest.approx(skm.top_k_accuracy_score(labels, probabilities, k=int(key), labels=range(k)))
    assert report["macro_f1"] == pytest.approx(skm.f1_score(labels, predicted, average="macro"))
    assert report["weighted_f1"] == pytest.approx(skm.f1_score(labels, predicted, average="weighted"))
    assert report["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, predicted))
    assert report["mean_log_loss"] == pytest.approx(skm.log_loss(labels, probabilities, labels=range(k)), rel=1e-6)
    per_class = pd.DataFrame(report["per_class"])
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, predicted, labels=range(k))
    assert np.allclose(per_class["precision"], precision) and np.allclose(per_class["recall"], recall)
    assert np.allclose(per_class["f1"], f1) and per_class["support"].tolist() == support.tolist()

    matrix = np.array(report["confusion_matrix"])
    assert np.array_equal(matrix, skm.confusion_matrix(labels, predicted, labels=range(k)))
    assert matrix.sum() == len(labels) and np.array_equal(matrix.sum(axis=1), support)
    assert np.trace(matrix) == outcomes["correct"].sum()

    top_two = np.sort(probabilities, axis=1)[:, -2:]
    assert np.allclose(outcomes["margin"], top_two[:, 1] - top_two[:, 0])
    assert np.allclose(outcomes["log_loss"], -np.log(probabilities[np.arange(len(labels)), labels]))
    assert (outcomes["true_rank"] == 1).to_numpy().tolist() == outcomes["correct"].tolist()


def test_ece_matches_an_independent_reference_and_known_cases():
    probabilities, labels = _synthetic(seed=4)
    report, _ = evaluation.evaluate(probabilities, labels, [f"c{i}" for i in range(7)])
    assert report["ece"] == pytest.approx(reference_ece(probabilities, labels), abs=1e-12)
    bins = pd.DataFrame(report["calibration"]["bins"])
    assert len(bins) == 15 and bins["count"].sum() == len(labels)

    # Confidence 0.9 everywhere and 90 % right: perfectly calibrated. Confidence 1.0 and half right: ECE 0.5.
    confidence = np.full(1000, 0.9)
    correct = np.arange(1000) % 10 != 0
    assert evaluation.calibration_errors(evaluation.calibration_table(confidence, correct))[0] == pytest.approx(0)
    ece, mce = evaluation.calibration_errors(evaluation.calibration_table(np.ones(10), np.arange(10) % 2 == 0))
    assert ece == pytest.approx(0.5) and mce == pytest.approx(0.5)


def test_wilson_interval_known_values_and_coverage():
    low, high = evaluation.wilson_interval(np.array([5, 0, 10]), np.array([10, 10, 10]))
    assert np.allclose(low, [0.2366, 0.0, 0.7225], atol=1e-4)
    assert np.allclose(high, [0.7634, 0.2775, 1.0], atol=1e-4)
    rng = np.random.default_rng(0)
    for n, p in ((50, 0.6), (200, 0.08)):
        hits = rng.binomial(n, p, size=4000)
        low, high = evaluation.wilson_interval(hits, np.full(4000, n))
        assert 0.92 <= ((low <= p) & (p <= high)).mean() <= 0.98
    low, _ = evaluation.wilson_interval(np.array([0]), np.array([0]))
    assert np.isnan(low[0])


def _planted_metrics(correct: np.ndarray, seed: int) -> pd.DataFrame:
    """Quality metrics of which only ``blur_level`` goes with the model's mistakes."""
    rng = np.random.default_rng(seed)
    n = len(correct)
    return pd.DataFrame(
        {
            "noise_a": rng.normal(size=n),
            "blur_level": np.where(correct, 0.0, 1.5) + rng.normal(size=n),
            "noise_b": rng.uniform(size=n),
            "constant": np.full(n, 3.0),
        }
    )


def test_metric_importance_ranks_the_planted_metric_first():
    probabilities, labels = _synthetic(seed=2)
    correct = probabilities.argmax(axis=1) == labels
    metrics = _planted_metrics(correct, seed=5)
    metrics.loc[:9, "noise_a"] = np.nan
    table = evaluation.metric_importance(metrics, correct, random_state=0)
    assert table["metric"].iloc[0] == "blur_level" and table["rank"].iloc[0] == 1
    blur = table.set_index("metric").loc["blur_level"]
    assert blur["spearman"] < -0.3 and blur["point_biserial"] < -0.3 and blur["spearman_p"] < 1e-6
    assert table.set_index("metric").loc["noise_a", "n"] == len(correct) - 10
    assert np.isnan(table.set_index("metric").loc["constant", "mutual_information"])
    assert table["metric"].iloc[-1] == "constant"

    curves = evaluation.metric_curves(metrics, correct, probabilities.max(axis=1))
    blur_curve = curves[curves["metric"] == "blur_level"]
    assert len(blur_curve) == 10 and blur_curve["count"].sum() == len(correct)
    assert blur_curve["accuracy"].iloc[0] > blur_curve["accuracy"].iloc[-1] + 0.3
    assert ((blur_curve["ci_low"] <= blur_curve["accuracy"]) & (blur_curve["accuracy"] <= blur_curve["ci_high"])).all()
    assert len(curves[curves["metric"] == "constant"]) == 1


@pytest.fixture
def evaluated_workspace(sample_workspace, tmp_path) -> Workspace:
    root = tmp_path / "ws"
    shutil.copytree(sample_workspace, root)
    return Workspace(root)


def test_stage_writes_every_artifact_and_skips_when_current(evaluated_workspace):
    workspace = evaluated_workspace
    context = StageContext(workspace=workspace, progress=False)
    summary = evaluation.run(context, evaluation.Config())
    assert summary["prediction_sets"]["cnn"]["metric_importance"]["available"] is False
    assert len(pd.read_parquet(workspace.artifact_path("metric_importance_cnn.parquet"))) == 0

    correct = workspace.predictions("cnn").argmax(axis=1) == workspace.samples["label_index"].to_numpy()
    metrics = _planted_metrics(correct, seed=1)
    metrics.insert(0, "id", workspace.samples["id"].to_numpy())
    storage.write_parquet(workspace.artifact_path("metrics.parquet"), metrics.iloc[::-1])  # order must not matter
    summary = evaluation.run(context, evaluation.Config())["prediction_sets"]["cnn"]
    assert summary["skipped"] is False and summary["metric_importance"]["top_metrics"][0] == "blur_level"

    report = json.loads(workspace.artifact_path("evaluation/cnn.json").read_text())
    assert report["accuracy"] == pytest.approx(prediction_accuracy(workspace, "cnn"))
    assert report["accuracy"] == pytest.approx(0.9175)
    assert np.array(report["confusion_matrix"]).sum() == len(workspace.samples)
    assert [row["class"] for row in report["per_class"]] == workspace.classes
    assert report["by_split"]["test"]["num_samples"] == len(workspace.samples)

    samples = pd.read_parquet(workspace.artifact_path("eval_samples_cnn.parquet"))
    assert list(samples.columns) == list(evaluation.SAMPLE_COLUMNS)
    assert samples["id"].tolist() == workspace.samples["id"].tolist()
    assert samples["correct"].tolist() == correct.tolist()
    assert (samples["predicted_label"] == samples["label"]).tolist() == correct.tolist()
    importance = pd.read_parquet(workspace.artifact_path("metric_importance_cnn.parquet"))
    assert importance["metric"].iloc[0] == "blur_level"
    curves = pd.read_parquet(workspace.artifact_path("metric_curves_cnn.parquet"))
    assert set(curves["metric"]) == {"noise_a", "blur_level", "noise_b", "constant"}

    again = evaluation.run(context, evaluation.Config())["prediction_sets"]["cnn"]
    assert again["skipped"] is True and again["accuracy"] == summary["accuracy"]


def test_unknown_prediction_set_is_a_clear_error(evaluated_workspace):
    context = StageContext(workspace=evaluated_workspace, progress=False)
    with pytest.raises(ValueError, match="unknown prediction set"):
        evaluation.run(context, evaluation.Config(prediction_sets=("resnet",)))
    with pytest.raises(ValueError, match="labels must lie in"):
        evaluation.sample_outcomes(np.full((2, 3), 1 / 3), np.array([0, 3]))
