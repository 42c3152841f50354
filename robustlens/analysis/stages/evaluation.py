"""Stage ``evaluation``: how well each prediction set does, where it is miscalibrated, and which image
quality metrics go with its mistakes.

Inputs: the workspace's prediction sets and labels; optionally ``artifacts/metrics.parquet`` (``id`` +
one float column per quality metric). Outputs, per prediction set ``<set>``:

* ``artifacts/evaluation/<set>.json`` — aggregates (accuracy, top-k accuracy, macro / weighted F1,
  balanced accuracy, mean log-loss, Brier score, ECE / MCE), ``confusion_matrix`` (rows = given label,
  columns = predicted, workspace class order), ``per_class`` (precision, recall, F1, support),
  ``calibration`` (15 equal-width reliability bins: lower, upper, count, accuracy, confidence),
  ``by_split`` accuracy and what metric importance found;
* ``artifacts/eval_samples_<set>.parquet`` — samples order: ``id``, ``label``, ``predicted_label``,
  ``correct``, ``confidence``, ``margin`` (top-1 minus top-2 probability), ``log_loss``,
  ``true_probability``, ``true_rank`` (1 = the given label is the top prediction);
* ``artifacts/metric_importance_<set>.parquet`` — one row per quality metric: ``metric``, ``n``,
  ``mutual_information`` (nats, with correctness), ``spearman``, ``spearman_p``, ``point_biserial``,
  ``point_biserial_p``, ``accuracy_spread`` (best minus worst decile accuracy), ``rank`` (1 = most
  informative); empty when there are no metrics;
* ``artifacts/metric_curves_<set>.parquet`` — accuracy over quantile bins of each metric: ``metric``,
  ``bin``, ``lower``, ``upper``, ``count``, ``mean_value``, ``accuracy``, ``ci_low``, ``ci_high``
  (Wilson 95 %), ``mean_confidence``; empty when there are no metrics.

Per-sample part and reduction: the per-sample outcomes (:func:`sample_outcomes`: correctness, confidence,
margin, log-loss of each row of probabilities) are a pure function of a batch of probability rows and labels;
the aggregates, calibration, metric importance and curves are whole-dataset reductions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats
from sklearn.feature_selection import mutual_info_classif
from sklearn.metrics import precision_recall_fscore_support

from robustlens.analysis import storage
from robustlens.analysis.stages.base import (
    StageContext,
    StageInputError,
    StageResult,
    StageSpec,
    artifact_entry,
    check_number,
    config_error,
    fingerprint,
    is_current,
    read_artifact,
    record_artifact,
    write_artifact,
)
from robustlens.analysis.workspace import Workspace

STAGE = "evaluation"
# A probability of exactly 0 for the given label would make its log-loss infinite.
LOG_LOSS_EPSILON = 1e-15
SAMPLE_COLUMNS = (
    "id",
    "label",
    "predicted_label",
    "correct",
    "confidence",
    "margin",
    "log_loss",
    "true_probability",
    "true_rank",
)
IMPORTANCE_COLUMNS = (
    "metric",
    "n",
    "mutual_information",
    "spearman",
    "spearman_p",
    "point_biserial",
    "point_biserial_p",
    "accuracy_spread",
    "rank",
)
CURVE_COLUMNS = (
    "metric",
    "bin",
    "lower",
    "upper",
    "count",
    "mean_value",
    "accuracy",
    "ci_low",
    "ci_high",
    "mean_confidence",
)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass
class Config:
    """Parameters of the evaluation stage.

    Attributes
    ----------
    prediction_sets:
        Names of the prediction sets to evaluate; ``None`` evaluates all of them.
    top_k:
        The ``k`` of top-k accuracy; values above the number of classes are dropped.
    calibration_bins:
        Number of equal-width confidence bins of the reliability diagram and ECE.
    curve_bins:
        Number of quantile bins of each metric's performance curve (10 = deciles).
    mi_neighbors:
        Neighbours of the k-NN mutual-information estimator.
    mi_max_samples:
        Mutual information is estimated on at most this many samples (a seeded random subset) because
        the k-NN estimator is the slowest part of the stage on large datasets.
    confidence_z:
        Normal quantile of the Wilson intervals (1.96 = 95 %).
    """

    prediction_sets: tuple[str, ...] | None = None
    top_k: tuple[int, ...] = (1, 3, 5)
    calibration_bins: int = 15
    curve_bins: int = 10
    mi_neighbors: int = 3
    mi_max_samples: int = 30_000
    confidence_z: float = 1.96

    def __post_init__(self) -> None:
        if self.prediction_sets is not None and (
            isinstance(self.prediction_sets, str) or not all(isinstance(name, str) for name in self.prediction_sets)
        ):
            raise config_error(
                STAGE, "prediction_sets", "a sequence of prediction-set names or None", self.prediction_sets
            )
        if isinstance(self.top_k, str | bytes) or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.top_k
        ):
            raise config_error(STAGE, "top_k", "a sequence of integers >= 1", self.top_k)
        for name in ("calibration_bins", "curve_bins", "mi_neighbors", "mi_max_samples"):
            check_number(STAGE, self, name, low=1, integer=True)
        check_number(STAGE, self, "confidence_z", low=0, low_open=True)


# -- statistics shared with other stages ---------------------------------------------------------------


def wilson_interval(successes: ArrayLike, totals: ArrayLike, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion, vectorised.

    Parameters
    ----------
    successes:
        Array-like of counts ``k`` (``0 <= k <= n``).
    totals:
        Array-like of trial counts ``n``, same shape; ``n = 0`` gives ``NaN`` bounds.
    z:
        Normal quantile (1.96 for 95 %).

    Returns
    -------
    (low, high):
        Float arrays of the shape of ``successes``.
    """
    k = np.asarray(successes, dtype=float)
    n = np.asarray(totals, dtype=float)
    if k.shape != n.shape:
        raise StageInputError(f"successes and totals must have the same shape, got {k.shape} and {n.shape}")
    if np.any(k < 0) or np.any(k > n):
        raise StageInputError("successes must lie in [0, totals]")
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        denominator = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denominator
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = np.where(n > 0, np.clip(centre - half, 0.0, 1.0), np.nan)
    high = np.where(n > 0, np.clip(centre + half, 0.0, 1.0), np.nan)
    return low, high


def stored_summary(context: StageContext, name: str) -> dict | None:
    """The ``summary`` recorded with artifact ``name`` in ``artifacts/index.json`` (``None`` if absent)."""
    return artifact_entry(context.workspace, name).get("summary")


def aligned_metrics(workspace: Workspace) -> pd.DataFrame | None:
    """``artifacts/metrics.parquet`` reindexed to ``workspace.samples`` order (float columns only).

    Returns ``None`` when the metrics stage has not run. Samples missing from the table get ``NaN``.
    """
    metrics = read_artifact(workspace, "metrics")
    if metrics is None:
        return None
    if "id" not in metrics.columns:
        raise StageInputError(f"{workspace.artifact_path('metrics.parquet')} has no 'id' column")
    numeric = [
        c
        for c in metrics.columns
        if c != "id" and pd.api.types.is_numeric_dtype(metrics[c]) and not pd.api.types.is_bool_dtype(metrics[c])
    ]
    table = metrics.drop_duplicates("id").set_index("id")[numeric].astype(float)
    return table.reindex(workspace.samples["id"]).reset_index(drop=True)


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars turned into Python ones and NaN / inf into ``None`` (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


# -- per-sample outcomes ---------------------------------------------------------------------------------


def check_probabilities(probabilities: np.ndarray, labels: np.ndarray) -> None:
    """Validate an ``(N, K)`` probability matrix against ``(N,)`` integer labels in ``[0, K)``."""
    if probabilities.ndim != 2:
        raise StageInputError(f"probabilities must be 2-D (N, K), got shape {probabilities.shape}")
    if labels.shape != (probabilities.shape[0],):
        raise StageInputError(f"labels must have shape ({probabilities.shape[0]},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probabilities.shape[1]):
        raise StageInputError(f"labels must lie in [0, {probabilities.shape[1]}), got [{labels.min()}, {labels.max()}]")
    if not np.all(np.isfinite(probabilities)):
        raise StageInputError("probabilities contain NaN or infinite values")


def sample_outcomes(probabilities: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Per-sample correctness and confidence.

    Parameters
    ----------
    probabilities:
        ``(N, K)`` class probabilities.
    labels:
        ``(N,)`` given class indices.

    Returns
    -------
    DataFrame of N rows: ``predicted`` (class index), ``correct``, ``confidence`` (top probability),
    ``margin`` (top-1 minus top-2 probability), ``log_loss`` (−log p of the given label),
    ``true_probability`` and ``true_rank`` (1 + number of classes scored strictly higher than the label).
    """
    check_probabilities(probabilities, labels)
    probabilities = probabilities.astype(np.float64, copy=False)
    rows = np.arange(len(labels))
    predicted = probabilities.argmax(axis=1)
    top_two = (
        -np.partition(-probabilities, 1, axis=1)[:, :2]
        if probabilities.shape[1] > 1
        else np.column_stack([probabilities[:, 0], np.zeros(len(labels))])
    )
    true_probability = probabilities[rows, labels]
    return pd.DataFrame(
        {
            "predicted": predicted,
            "correct": predicted == labels,
            "confidence": top_two[:, 0],
            "margin": top_two[:, 0] - top_two[:, 1],
            "log_loss": -np.log(np.clip(true_probability, LOG_LOSS_EPSILON, 1.0)),
            "true_probability": true_probability,
            "true_rank": (probabilities > true_probability[:, None]).sum(axis=1) + 1,
        }
    )


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` counts; row = given label, column = predicted class."""
    flat = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_table(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Per class (workspace order): ``class``, ``precision``, ``recall``, ``f1``, ``support``."""
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=np.arange(len(classes)), zero_division=0
    )
    return pd.DataFrame(
        {"class": classes, "precision": precision, "recall": recall, "f1": f1, "support": support.astype(int)}
    )


def calibration_table(confidence: np.ndarray, correct: np.ndarray, num_bins: int = 15) -> pd.DataFrame:
    """Reliability diagram over ``num_bins`` equal-width confidence bins.

    Bin ``b`` holds confidences in ``(b/B, (b+1)/B]`` (the first bin also holds 0).

    Returns
    -------
    DataFrame of ``num_bins`` rows: ``lower``, ``upper``, ``count``, ``accuracy``, ``confidence`` (mean
    confidence; ``NaN`` for empty bins).
    """
    if num_bins < 1:
        raise StageInputError(f"num_bins must be >= 1, got {num_bins}")
    index = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
    count = np.bincount(index, minlength=num_bins)
    hits = np.bincount(index, weights=correct.astype(float), minlength=num_bins)
    total_confidence = np.bincount(index, weights=confidence, minlength=num_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = np.where(count > 0, hits / count, np.nan)
        mean_confidence = np.where(count > 0, total_confidence / count, np.nan)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    return pd.DataFrame(
        {"lower": edges[:-1], "upper": edges[1:], "count": count, "accuracy": accuracy, "confidence": mean_confidence}
    )


def calibration_errors(table: pd.DataFrame) -> tuple[float, float]:
    """(ECE, MCE) of a :func:`calibration_table`: count-weighted mean and max of |accuracy − confidence|."""
    filled = table[table["count"] > 0]
    if filled.empty:
        return float("nan"), float("nan")
    gaps = (filled["accuracy"] - filled["confidence"]).abs()
    return float((gaps * filled["count"]).sum() / filled["count"].sum()), float(gaps.max())


# -- metric importance -------------------------------------------------------------------------------


def quantile_bins(values: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Assign finite ``values`` to up to ``num_bins`` quantile bins.

    Returns
    -------
    (bins, edges):
        ``bins`` — ``(N,)`` int, bin of each value (``-1`` for NaN); ``edges`` — increasing bin edges
        (fewer than ``num_bins + 1`` when ties collapse quantiles). Bin ``b`` is ``(edges[b], edges[b+1]]``,
        the first bin closed on the left.
    """
    finite = np.isfinite(values)
    bins = np.full(len(values), -1, dtype=np.int64)
    if not finite.any():
        return bins, np.array([], dtype=float)
    edges = np.unique(np.quantile(values[finite], np.linspace(0.0, 1.0, num_bins + 1)))
    if len(edges) == 1:  # a constant metric is one bin
        edges = np.array([edges[0], edges[0]])
    bins[finite] = np.searchsorted(edges[1:-1], values[finite], side="left")
    return bins, edges


def metric_importance(
    metrics: pd.DataFrame,
    correct: np.ndarray,
    *,
    random_state: int,
    n_neighbors: int = 3,
    max_samples: int = 30_000,
    curve_bins: int = 10,
) -> pd.DataFrame:
    """How much each quality metric tells about whether the model is right.

    Parameters
    ----------
    metrics:
        N rows (samples order), one float column per metric; NaN where a metric is unknown.
    correct:
        ``(N,)`` bool, whether the prediction matches the given label.
    random_state:
        Seed of the mutual-information estimator and of its subsample.
    max_samples:
        Subsample size for the k-NN mutual-information estimate.

    Returns
    -------
    DataFrame with :data:`IMPORTANCE_COLUMNS`, sorted by ``rank`` (mutual information, descending).
    """
    rng = np.random.default_rng(random_state)
    rows = []
    for name in metrics.columns:
        values = metrics[name].to_numpy(dtype=float)
        finite = np.isfinite(values)
        x, y = values[finite], correct[finite]
        row = {
            "metric": name,
            "n": int(finite.sum()),
            "mutual_information": np.nan,
            "spearman": np.nan,
            "spearman_p": np.nan,
            "point_biserial": np.nan,
            "point_biserial_p": np.nan,
            "accuracy_spread": np.nan,
        }
        # Correlations and MI are undefined for a constant metric or constant correctness.
        if len(x) >= max(n_neighbors + 2, 3) and np.ptp(x) > 0 and 0 < y.sum() < len(y):
            row["mutual_information"] = _mutual_information(x, y, rng, n_neighbors, max_samples)
            rho, rho_p = stats.spearmanr(x, y)
            r, r_p = stats.pointbiserialr(y, x)
            row.update(
                spearman=float(rho), spearman_p=float(rho_p), point_biserial=float(r), point_biserial_p=float(r_p)
            )
            bins, _ = quantile_bins(x, curve_bins)
            accuracy = pd.Series(y).groupby(bins).mean()
            row["accuracy_spread"] = float(accuracy.max() - accuracy.min())
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(IMPORTANCE_COLUMNS[:-1]))
    table = table.sort_values("mutual_information", ascending=False, na_position="last", kind="stable")
    table["rank"] = np.arange(1, len(table) + 1)
    return table.reset_index(drop=True)


def _mutual_information(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, n_neighbors: int, max_samples: int
) -> float:
    if len(x) > max_samples:
        keep = rng.choice(len(x), size=max_samples, replace=False)
        x, y = x[keep], y[keep]
    seed = int(rng.integers(0, 2**31 - 1))
    return float(
        mutual_info_classif(x[:, None], y, discrete_features=False, n_neighbors=n_neighbors, random_state=seed)[0]
    )


def metric_curves(
    metrics: pd.DataFrame, correct: np.ndarray, confidence: np.ndarray, *, num_bins: int = 10, z: float = 1.96
) -> pd.DataFrame:
    """Accuracy over quantile bins of every metric (see the module docstring for the columns)."""
    frames = []
    for name in metrics.columns:
        values = metrics[name].to_numpy(dtype=float)
        bins, edges = quantile_bins(values, num_bins)
        inside = bins >= 0
        if not inside.any():
            continue
        b = bins[inside]
        count = np.bincount(b, minlength=len(edges) - 1)
        hits = np.bincount(b, weights=correct[inside].astype(float), minlength=len(edges) - 1)
        value_sum = np.bincount(b, weights=values[inside], minlength=len(edges) - 1)
        confidence_sum = np.bincount(b, weights=confidence[inside], minlength=len(edges) - 1)
        low, high = wilson_interval(hits, count, z)
        with np.errstate(divide="ignore", invalid="ignore"):
            frames.append(
                pd.DataFrame(
                    {
                        "metric": name,
                        "bin": np.arange(len(count)),
                        "lower": edges[:-1],
                        "upper": edges[1:],
                        "count": count,
                        "mean_value": value_sum / count,
                        "accuracy": hits / count,
                        "ci_low": low,
                        "ci_high": high,
                        "mean_confidence": confidence_sum / count,
                    }
                )
            )
    if not frames:
        return _empty(CURVE_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def _empty(columns: Iterable[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=str if c == "metric" else float) for c in columns})


# -- one prediction set -----------------------------------------------------------------------------------


def evaluate(
    probabilities: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    *,
    top_k: Iterable[int] = (1, 3, 5),
    calibration_bins: int = 15,
) -> tuple[dict, pd.DataFrame]:
    """Aggregate evaluation of one prediction set.

    Parameters
    ----------
    probabilities:
        ``(N, K)`` class probabilities, K = ``len(classes)``.
    labels:
        ``(N,)`` given class indices.

    Returns
    -------
    (report, outcomes):
        ``report`` — JSON-serialisable dict (see the module docstring); ``outcomes`` — :func:`sample_outcomes`.
    """
    if probabilities.shape[1:] != (len(classes),):
        raise StageInputError(f"probabilities have {probabilities.shape[1:]} columns, expected {len(classes)} classes")
    if len(labels) == 0:
        raise StageInputError("cannot evaluate an empty prediction set")
    outcomes = sample_outcomes(probabilities, labels)
    predicted = outcomes["predicted"].to_numpy()
    correct = outcomes["correct"].to_numpy()
    per_class = per_class_table(labels, predicted, classes)
    calibration = calibration_table(outcomes["confidence"].to_numpy(), correct, calibration_bins)
    ece, mce = calibration_errors(calibration)
    support = per_class["support"].to_numpy()
    one_hot = np.eye(len(classes))[labels]
    ks = sorted({int(k) for k in top_k if 1 <= int(k) <= len(classes)})
    report = {
        "num_samples": int(len(labels)),
        "accuracy": float(correct.mean()),
        "error_rate": float(1 - correct.mean()),
        "top_k_accuracy": {str(k): float((outcomes["true_rank"] <= k).mean()) for k in ks},
        "macro_f1": float(per_class["f1"].mean()),
        "weighted_f1": float((per_class["f1"] * support).sum() / support.sum()),
        "balanced_accuracy": float(per_class.loc[support > 0, "recall"].mean()),
        "mean_log_loss": float(outcomes["log_loss"].mean()),
        "brier_score": float(((probabilities - one_hot) ** 2).sum(axis=1).mean()),
        "mean_confidence": float(outcomes["confidence"].mean()),
        "ece": ece,
        "mce": mce,
        "calibration": {"num_bins": calibration_bins, "bins": calibration.to_dict(orient="records")},
        "confusion_matrix": confusion_matrix(labels, predicted, len(classes)).tolist(),
        "per_class": per_class.to_dict(orient="records"),
    }
    return report, outcomes


def _evaluate_set(context: StageContext, config: Config, name: str, metrics: pd.DataFrame | None) -> dict:
    workspace = context.workspace
    samples = workspace.samples
    labels = samples["label_index"].to_numpy(dtype=np.int64)
    probabilities = workspace.predictions(name)
    names = (f"evaluation/{name}", f"eval_samples_{name}", f"metric_importance_{name}", f"metric_curves_{name}")
    inputs = fingerprint(samples["id"], labels, probabilities, "no metrics" if metrics is None else metrics)
    if all(is_current(context, n, config=config, inputs=inputs) for n in names):
        return {**(stored_summary(context, names[0]) or {}), "skipped": True}

    classes = workspace.classes
    report, outcomes = evaluate(
        probabilities, labels, classes, top_k=config.top_k, calibration_bins=config.calibration_bins
    )
    correct = outcomes["correct"].to_numpy()
    report["prediction_set"] = name
    report["classes"] = classes
    report["by_split"] = {
        str(split): {"num_samples": int(len(group)), "accuracy": float(group.mean())}
        for split, group in pd.Series(correct).groupby(samples["split"].to_numpy())
    }

    if metrics is None or metrics.shape[1] == 0:
        importance, curves = _empty(IMPORTANCE_COLUMNS), _empty(CURVE_COLUMNS)
        report["metric_importance"] = {"available": False, "reason": "no quality metrics (run the metrics stage first)"}
    else:
        importance = metric_importance(
            metrics,
            correct,
            random_state=context.random_state,
            n_neighbors=config.mi_neighbors,
            max_samples=config.mi_max_samples,
            curve_bins=config.curve_bins,
        )
        curves = metric_curves(
            metrics, correct, outcomes["confidence"].to_numpy(), num_bins=config.curve_bins, z=config.confidence_z
        )
        ranked = importance.dropna(subset=["mutual_information"])
        report["metric_importance"] = {
            "available": True,
            "num_metrics": int(len(importance)),
            "top_metrics": ranked["metric"].head(3).tolist(),
        }

    class_names = np.asarray(classes, dtype=object)
    sample_table = pd.DataFrame(
        {
            "id": samples["id"].to_numpy(),
            "label": samples["label"].to_numpy(),
            "predicted_label": class_names[outcomes["predicted"].to_numpy()],
            **{c: outcomes[c].to_numpy() for c in SAMPLE_COLUMNS[3:]},
        }
    )
    summary = {
        "accuracy": report["accuracy"],
        "top_k_accuracy": report["top_k_accuracy"],
        "macro_f1": report["macro_f1"],
        "ece": report["ece"],
        "metric_importance": report["metric_importance"],
    }
    summary = json_safe(summary)
    write_artifact(context, names[1], sample_table, stage=STAGE, config=config, inputs=inputs)
    write_artifact(context, names[2], importance, stage=STAGE, config=config, inputs=inputs)
    write_artifact(context, names[3], curves, stage=STAGE, config=config, inputs=inputs)
    # Written last: its index entry carries the summary that a skipped re-run reports.
    storage.write_json(workspace.artifact_path(f"{names[0]}.json"), json_safe(report))
    record_artifact(context, names[0], stage=STAGE, config=config, inputs=inputs, extra={"summary": summary})
    return {**summary, "skipped": False}


def run(context: StageContext, config: Config) -> StageResult:
    """Evaluate every selected prediction set; see the module docstring for the artifacts.

    Summary: ``prediction_sets`` (set → its summary, with ``skipped``) and ``metrics_available``; or
    ``skipped``, ``reason`` and an empty ``prediction_sets`` when the workspace has none.
    """
    summary = _run(context, config)
    sets = summary.get("prediction_sets") or {}
    written = [
        name
        for set_name, entry in sets.items()
        if entry.get("skipped") is not True
        for name in (
            f"evaluation/{set_name}",
            f"eval_samples_{set_name}",
            f"metric_importance_{set_name}",
            f"metric_curves_{set_name}",
        )
    ]
    return SPEC.result(summary, current=all(entry.get("skipped") is True for entry in sets.values()), artifacts=written)


def _run(context: StageContext, config: Config) -> dict:
    available = context.workspace.prediction_names
    selected = available if config.prediction_sets is None else list(config.prediction_sets)
    unknown = [name for name in selected if name not in available]
    if unknown:
        raise StageInputError(f"unknown prediction set(s) {unknown}; the workspace has {available}")
    bad = [name for name in selected if not _SAFE_NAME.match(name)]
    if bad:
        raise StageInputError(
            f"prediction-set names {bad} cannot be used in artifact file names (letters, digits, '_', '-', '.' only)"
        )
    if not selected:
        return {"skipped": True, "reason": "the workspace has no prediction sets", "prediction_sets": {}}
    metrics = aligned_metrics(context.workspace)
    return {
        "prediction_sets": {name: _evaluate_set(context, config, name, metrics) for name in selected},
        "metrics_available": metrics is not None,
    }


SPEC = StageSpec(
    name=STAGE,
    config=Config,
    run=run,
    reads=("samples",),
    uses=("predictions", "metrics"),
    may_write=("evaluation/*", "eval_samples_*", "metric_importance_*", "metric_curves_*"),
    description="accuracy, calibration and metric importance of each prediction set",
)
