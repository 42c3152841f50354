"""Workspaces for dashboard, filter and export tests: the real sample workspace plus analysis artifacts.

The analysis stages are built by other modules; the dashboard must work from their artifacts' names and
columns alone. :func:`write_analysis_artifacts` writes every artifact the dashboard reads, derived from
the real sample images and predictions (real pixel statistics, a real PCA embedding, near duplicates by
real cosine similarity, label issues from the real CNN probabilities). The issue table is produced by
the real ``issues`` stage from per-stage flag tables.

:func:`synthetic_workspace` builds a large workspace (70k … 1M rows) from arrays, for benchmarks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from robustlens.analysis import storage
from robustlens.analysis.workspace import Workspace

METRIC_NAMES = ("brightness", "contrast", "sharpness", "blur", "entropy", "colorfulness", "saturation", "mean_r",
                "mean_g", "mean_b", "dark_fraction", "bright_fraction", "noise", "width", "height", "aspect_ratio",
                "area", "file_size")
SECOND_SET = "cnn_v2"


def copy_workspace(source: Path, destination: Path) -> Path:
    """Copy a workspace directory (its curation DB included) to ``destination``."""
    shutil.copytree(source, destination)
    return destination


def write_analysis_artifacts(root: Path, *, seed: int = 0, second_prediction_set: bool = True) -> Workspace:
    """Give the sample workspace at ``root`` train/test splits, a second prediction set and every artifact.

    Returns the reopened workspace.
    """
    rng = np.random.default_rng(seed)
    workspace = Workspace(root)
    samples = workspace.samples.copy()
    samples["split"] = np.where(rng.random(len(samples)) < 0.75, "train", "test")
    storage.write_parquet(root / "samples.parquet", samples)
    manifest = dict(workspace.manifest, splits=["test", "train"])
    if second_prediction_set:
        probabilities = _second_predictions(workspace.predictions("cnn"), rng)
        storage.write_npy(root / f"predictions/{SECOND_SET}.npy", probabilities)
        manifest["prediction_sets"] = dict(manifest["prediction_sets"], **{SECOND_SET: dict(
            manifest["prediction_sets"]["cnn"], file=f"predictions/{SECOND_SET}.npy", source="synthetic")})
    workspace.write_manifest(manifest)
    workspace = Workspace(root)

    pixels = _pixels(workspace)
    metrics = _metrics(workspace.samples, pixels)
    storage.write_parquet(workspace.artifact_path("metrics.parquet"), metrics)
    embeddings, projection = _embed(pixels)
    storage.write_npy(workspace.artifact_path("embeddings.npy"), embeddings)
    storage.write_parquet(workspace.artifact_path("projection.parquet"),
                          pd.DataFrame({"id": workspace.samples["id"], "x": projection[:, 0], "y": projection[:, 1]}))
    duplicates, pairs = _duplicates(workspace.samples, embeddings)
    storage.write_parquet(workspace.artifact_path("duplicates.parquet"), duplicates)
    storage.write_parquet(workspace.artifact_path("duplicate_pairs.parquet"), pairs)
    label_issues = _label_issues(workspace)
    storage.write_parquet(workspace.artifact_path("label_issues.parquet"), label_issues)
    _write_flags(workspace, metrics, duplicates, label_issues, embeddings)
    for name in workspace.prediction_names:
        _write_evaluation(workspace, name, metrics)
    _write_slices(workspace, metrics)
    return Workspace(root)


# -- pieces -------------------------------------------------------------------------------------------
def _second_predictions(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A weaker second model: softened probabilities with 6% of rows' top classes shuffled."""
    softened = probabilities ** 0.6
    rows = rng.random(len(softened)) < 0.06
    softened[rows] = softened[rows][:, rng.permutation(softened.shape[1])]
    return (softened / softened.sum(axis=1, keepdims=True)).astype(np.float32)


def _pixels(workspace: Workspace) -> np.ndarray:
    """``(N, H*W)`` float32 grayscale pixels in [0, 1]."""
    return np.stack([np.asarray(Image.open(workspace.image_path(p)).convert("L"), dtype=np.float32).ravel() / 255.0
                     for p in workspace.samples["path"]])


def _metrics(samples: pd.DataFrame, pixels: np.ndarray) -> pd.DataFrame:
    side = int(np.sqrt(pixels.shape[1]))
    images = pixels.reshape(-1, side, side)
    laplacian = (images[:, 1:-1, 2:] + images[:, 1:-1, :-2] + images[:, 2:, 1:-1] + images[:, :-2, 1:-1]
                 - 4 * images[:, 1:-1, 1:-1])
    histogram = np.stack([np.histogram(row, bins=32, range=(0, 1))[0] for row in pixels]) / pixels.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(histogram > 0, histogram * np.log2(histogram), 0.0), axis=1)
    sharpness = laplacian.var(axis=(1, 2))
    brightness = pixels.mean(axis=1)
    return pd.DataFrame({
        "id": samples["id"], "brightness": brightness, "contrast": pixels.std(axis=1), "sharpness": sharpness,
        "blur": 1.0 / (1.0 + 100 * sharpness), "entropy": entropy, "colorfulness": 0.0, "saturation": 0.0,
        "mean_r": brightness, "mean_g": brightness, "mean_b": brightness,
        "dark_fraction": (pixels < 0.1).mean(axis=1), "bright_fraction": (pixels > 0.9).mean(axis=1),
        "noise": np.abs(laplacian).mean(axis=(1, 2)),
        "width": samples["width"].astype(float), "height": samples["height"].astype(float),
        "aspect_ratio": samples["width"] / samples["height"],
        "area": (samples["width"] * samples["height"]).astype(float),
        "file_size": samples["file_size"].astype(float),
    })


def _embed(pixels: np.ndarray, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised PCA embedding ``(N, dim)`` and a 2-D projection."""
    side = int(np.sqrt(pixels.shape[1]))
    # 2×2 average pooling first: a small covariance matrix keeps the eigendecomposition instant.
    pooled = pixels.reshape(-1, side // 2, 2, side // 2, 2).mean(axis=(2, 4)).reshape(len(pixels), -1)
    centred = pooled - pooled.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    reduced = centred @ vectors[:, ::-1][:, :dim]
    embeddings = reduced / np.linalg.norm(reduced, axis=1, keepdims=True)
    return embeddings.astype(np.float32), reduced[:, :2].astype(np.float32)


def _duplicates(samples: pd.DataFrame, embeddings: np.ndarray,
                pairs_wanted: int = 40) -> tuple[pd.DataFrame, pd.DataFrame]:
    n = len(samples)
    similarity = embeddings @ embeddings.T
    upper = np.triu_indices(n, k=1)
    values = similarity[upper]
    best = np.argsort(values)[::-1][:pairs_wanted]
    a, b = upper[0][best], upper[1][best]
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(a, b, strict=True):
        parent[find(int(i))] = find(int(j))
    roots = np.array([find(i) for i in range(n)])
    in_pair = np.zeros(n, dtype=bool)
    in_pair[a] = in_pair[b] = True
    group_of_root = {root: g for g, root in enumerate(sorted(set(roots[in_pair].tolist())))}
    near = np.array([group_of_root.get(r, -1) if in_pair[i] else -1 for i, r in enumerate(roots)])
    exact = samples.groupby("content_hash").ngroup().to_numpy()
    exact_counts = pd.Series(exact).map(pd.Series(exact).value_counts()).to_numpy()
    exact = np.where(exact_counts > 1, exact, -1)
    group = pd.Series(np.where(near >= 0, near, -1))
    size = np.where(near >= 0, group.map(group[group >= 0].value_counts()).fillna(1).to_numpy(), 1).astype(int)
    splits = samples["split"].to_numpy()
    cross = np.zeros(n, dtype=bool)
    representative = np.ones(n, dtype=bool)
    for g in np.unique(near[near >= 0]):
        members = np.flatnonzero(near == g)
        cross[members] = len(set(splits[members])) > 1
        representative[members] = False
        representative[members[0]] = True
    duplicates = pd.DataFrame({"id": samples["id"], "exact_group": exact, "near_group": near, "group_size": size,
                               "is_representative": representative, "cross_split": cross})
    ids = samples["id"].to_numpy()
    pairs = pd.DataFrame({"id_a": ids[a], "id_b": ids[b], "kind": "near", "cosine": values[best].astype(float),
                          "phash_distance": np.round((1 - values[best]) * 200).astype(int)})
    return duplicates, pairs


def _label_issues(workspace: Workspace) -> pd.DataFrame:
    probabilities = workspace.predictions("cnn")
    samples = workspace.samples
    given = samples["label_index"].to_numpy()
    quality = probabilities[np.arange(len(samples)), given]
    suggested = probabilities.argmax(axis=1)
    flagged = (suggested != given) & (quality < 0.2)
    order = np.argsort(quality, kind="stable")
    rank = np.empty(len(samples), dtype=int)
    rank[order] = np.arange(1, len(samples) + 1)
    classes = np.array(workspace.classes)
    return pd.DataFrame({"id": samples["id"], "given_label": samples["label"], "suggested_label": classes[suggested],
                         "given_label_probability": quality.astype(float),
                         "suggested_label_probability": probabilities.max(axis=1).astype(float),
                         "label_quality": quality.astype(float), "is_label_issue": flagged, "rank": rank})


def _flag(ids, severity, issue: str, explanation: str) -> pd.DataFrame:
    return pd.DataFrame({"id": list(ids), "issue": issue, "severity": np.clip(np.asarray(severity, float), 0.01, 1.0),
                         "explanation": explanation})


def _tail(values: pd.Series, share: float, *, low: bool) -> np.ndarray:
    cut = values.quantile(share if low else 1 - share)
    return (values <= cut).to_numpy() if low else (values >= cut).to_numpy()


def _write_flags(workspace: Workspace, metrics: pd.DataFrame, duplicates: pd.DataFrame, label_issues: pd.DataFrame,
                 embeddings: np.ndarray) -> None:
    from robustlens.analysis.stages import issues
    from robustlens.analysis.stages.base import StageContext

    ids = metrics["id"]
    quality = []
    for issue, column, low, share in (("dark", "brightness", True, 0.03), ("light", "brightness", False, 0.03),
                                      ("blurry", "sharpness", True, 0.03), ("low_information", "entropy", True, 0.02)):
        flagged = _tail(metrics[column], share, low=low)
        rank = metrics[column].rank(pct=True).to_numpy()
        severity = (1 - rank if low else rank)[flagged]
        quality.append(_flag(ids[flagged], severity, issue, f"{column} in the {'lowest' if low else 'highest'} "
                                                             f"{share:.0%}"))
    storage.write_parquet(workspace.artifact_path("flags_quality.parquet"), pd.concat(quality, ignore_index=True))
    near = duplicates["near_group"] >= 0
    duplicate_flags = [_flag(ids[near], 0.8, "near_duplicate", "near-duplicate of another sample"),
                       _flag(ids[duplicates["cross_split"]], 1.0, "leakage", "duplicate in another split")]
    exact = duplicates["exact_group"] >= 0
    if exact.any():
        duplicate_flags.append(_flag(ids[exact], 1.0, "exact_duplicate", "byte-identical to another sample"))
    storage.write_parquet(workspace.artifact_path("flags_duplicates.parquet"),
                          pd.concat(duplicate_flags, ignore_index=True))
    centroid = embeddings.mean(axis=0)
    distance = pd.Series(1 - embeddings @ (centroid / np.linalg.norm(centroid)))
    outlier = _tail(distance, 0.02, low=False)
    storage.write_parquet(workspace.artifact_path("flags_outliers.parquet"),
                          _flag(ids[outlier], distance.rank(pct=True)[outlier], "outlier",
                                "far from the data's centre"))
    flagged = label_issues["is_label_issue"].to_numpy()
    storage.write_parquet(workspace.artifact_path("flags_label_issues.parquet"),
                          _flag(ids[flagged], 1 - label_issues["label_quality"][flagged], "label_issue",
                                "the model is confident the label is wrong"))
    issues.run(StageContext(workspace=workspace, progress=False), issues.Config())


def _write_evaluation(workspace: Workspace, name: str, metrics: pd.DataFrame) -> None:
    probabilities = workspace.predictions(name).astype(float)
    samples = workspace.samples
    given = samples["label_index"].to_numpy()
    classes = workspace.classes
    predicted = probabilities.argmax(axis=1)
    rows = np.arange(len(samples))
    ordered = np.sort(probabilities, axis=1)
    correct = predicted == given
    true_rank = (probabilities > probabilities[rows, given][:, None]).sum(axis=1) + 1
    storage.write_parquet(workspace.artifact_path(f"eval_samples_{name}.parquet"), pd.DataFrame({
        "id": samples["id"], "label": samples["label"], "predicted_label": np.array(classes)[predicted],
        "correct": correct, "confidence": ordered[:, -1], "margin": ordered[:, -1] - ordered[:, -2],
        "log_loss": -np.log(np.clip(probabilities[rows, given], 1e-12, 1)),
        "true_probability": probabilities[rows, given], "true_rank": true_rank}))
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(confusion, (given, predicted), 1)
    per_class = []
    for k, cls in enumerate(classes):
        support = int(confusion[k].sum())
        precision = confusion[k, k] / max(int(confusion[:, k].sum()), 1)
        recall = confusion[k, k] / max(support, 1)
        per_class.append({"class": cls, "precision": float(precision), "recall": float(recall),
                          "f1": float(2 * precision * recall / max(precision + recall, 1e-12)), "support": support})
    edges = np.linspace(0, 1, 11)
    confidence = ordered[:, -1]
    bins = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        filled = bool(inside.any())
        bins.append({"lower": float(low), "upper": float(high), "count": int(inside.sum()),
                     "accuracy": float(correct[inside].mean()) if filled else None,
                     "confidence": float(confidence[inside].mean()) if filled else None})
    ece = sum(b["count"] * abs(b["confidence"] - b["accuracy"]) for b in bins if b["count"]) / len(samples)
    report = {"prediction_set": name, "num_samples": int(len(samples)), "accuracy": float(correct.mean()),
              "top_k_accuracy": {str(k): float((true_rank <= k).mean()) for k in (1, 3, 5)}, "classes": classes,
              "per_class": per_class, "confusion_matrix": confusion.tolist(),
              "calibration": {"num_bins": len(bins), "bins": bins}, "ece": float(ece)}
    storage.write_json(workspace.artifact_path(f"evaluation/{name}.json"), report)
    importance, curves = [], []
    for metric in ("brightness", "contrast", "sharpness", "entropy", "dark_fraction", "noise"):
        values = metrics[metric].to_numpy()
        correlation = float(np.corrcoef(values, correct)[0, 1]) if values.std() > 0 else 0.0
        quantiles = np.quantile(values, np.linspace(0, 1, 9))
        which = np.clip(np.searchsorted(quantiles, values, side="right") - 1, 0, 7)
        accuracies = []
        for b in range(8):
            inside = which == b
            accuracy = float(correct[inside].mean()) if inside.any() else np.nan
            accuracies.append(accuracy)
            half = 1.96 * np.sqrt(max(accuracy * (1 - accuracy), 1e-9) / max(int(inside.sum()), 1))
            curves.append({"metric": metric, "bin": b, "lower": float(quantiles[b]),
                           "upper": float(quantiles[b + 1]), "count": int(inside.sum()),
                           "mean_value": float(values[inside].mean()) if inside.any() else np.nan,
                           "accuracy": accuracy, "ci_low": max(0.0, accuracy - half),
                           "ci_high": min(1.0, accuracy + half),
                           "mean_confidence": float(confidence[inside].mean()) if inside.any() else np.nan})
        importance.append({"metric": metric, "n": len(values), "mutual_information": correlation ** 2 / 2,
                           "spearman": correlation, "spearman_p": 0.01, "point_biserial": correlation,
                           "point_biserial_p": 0.01,
                           "accuracy_spread": float(np.nanmax(accuracies) - np.nanmin(accuracies))})
    importance_frame = pd.DataFrame(importance).sort_values("mutual_information", ascending=False)
    importance_frame["rank"] = np.arange(1, len(importance_frame) + 1)
    storage.write_parquet(workspace.artifact_path(f"metric_importance_{name}.parquet"), importance_frame)
    storage.write_parquet(workspace.artifact_path(f"metric_curves_{name}.parquet"), pd.DataFrame(curves))


def _write_slices(workspace: Workspace, metrics: pd.DataFrame) -> None:
    samples = workspace.samples
    correct = workspace.predictions("cnn").argmax(axis=1) == samples["label_index"].to_numpy()
    overall = correct.mean()
    rows = []
    conditions = [(f"label = {c}", samples["label"].to_numpy() == c) for c in workspace.classes]
    conditions += [(f"split = {s}", samples["split"].to_numpy() == s) for s in ("train", "test")]
    dark = metrics["brightness"] <= metrics["brightness"].quantile(0.25)
    conditions.append(("brightness ≤ q25", dark.to_numpy()))
    for c in ("shirt", "pullover"):
        conditions.append((f"label = {c} and brightness ≤ q25", dark.to_numpy() & (samples["label"].to_numpy() == c)))
    for number, (description, inside) in enumerate(conditions):
        size = int(inside.sum())
        accuracy = float(correct[inside].mean())
        error = 1 - accuracy
        half = 1.96 * np.sqrt(max(error * (1 - error), 1e-9) / size)
        rows.append({"slice_id": number, "description": description.replace(" and ", " AND "),
                     "kind": "discovered" if " and " in description else "class",
                     "n_conditions": description.count(" and ") + 1, "size": size, "support": size / len(samples),
                     "errors": int(size - correct[inside].sum()), "accuracy": accuracy, "error_rate": error,
                     "gap": float(overall - accuracy), "ci_low": max(0.0, error - half),
                     "ci_high": min(1.0, error + half),
                     "score": float((overall - accuracy) * np.sqrt(size)), "searched": True})
    slices = pd.DataFrame(rows).sort_values("score", ascending=False).reset_index(drop=True)
    storage.write_parquet(workspace.artifact_path("slices.parquet"), slices)
    worst = slices.head(5).assign(rank=np.arange(1, 6))
    storage.write_parquet(workspace.artifact_path("worst_slices.parquet"), worst)


# -- large synthetic workspaces (benchmarks) ----------------------------------------------------------
def synthetic_workspace(root: Path, num_samples: int, *, image_source: Path, seed: int = 0,
                        num_classes: int = 10, images: int = 64) -> Workspace:
    """A workspace of ``num_samples`` rows built from arrays (no decoding), with every dashboard artifact.

    Rows cycle over ``images`` real image files copied from ``image_source`` (a folder of images).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    data = root.parent / f"{root.name}-data"
    data.mkdir(parents=True, exist_ok=True)
    files = sorted(Path(image_source).glob("*.png"))[:images]
    for file in files:
        shutil.copyfile(file, data / file.name)
    classes = [f"class_{k}" for k in range(num_classes)]
    label_index = rng.integers(0, num_classes, num_samples).astype(np.int32)
    which = np.arange(num_samples) % len(files)
    names = np.array([f.name for f in files])
    ids = np.char.add("s", np.arange(num_samples).astype(str)).astype(object)
    samples = pd.DataFrame({
        "id": ids, "path": names[which], "label": np.array(classes)[label_index], "label_index": label_index,
        "split": np.where(rng.random(num_samples) < 0.8, "train", "test"), "width": 28, "height": 28, "mode": "L",
        "channels": 1, "bit_depth": 8, "file_size": rng.integers(300, 700, num_samples),
        "content_hash": np.char.add("h", which.astype(str)).astype(object),
        "meta.camera": np.array(["a", "b", "c"])[rng.integers(0, 3, num_samples)]})
    root.mkdir(parents=True, exist_ok=True)
    storage.write_parquet(root / "samples.parquet", samples)
    logits = rng.normal(size=(num_samples, num_classes)).astype(np.float32)
    logits[np.arange(num_samples), label_index] += 3.0
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    storage.write_npy(root / "predictions/model.npy", probabilities.astype(np.float32))
    manifest = {"format_version": 1, "created_with": "benchmark", "created_at": "2026-01-01T00:00:00+00:00",
                "dataset": {"root": str(data.resolve()), "kind": "manifest", "manifest": None}, "classes": classes,
                "splits": ["test", "train"], "metadata_columns": ["meta.camera"], "num_samples": num_samples,
                "prediction_sets": {"model": {"file": "predictions/model.npy", "source": "synthetic",
                                              "score_kind": "probabilities", "renormalized_rows": 0,
                                              "dropped_rows": 0}},
                "embeddings": None, "model": None, "db_url": None}
    storage.write_json(root / "workspace.json", manifest)
    storage.write_json(root / "ingest_report.json", {"skipped": [], "warnings": []})
    workspace = Workspace(root)
    metric_values = {name: rng.random(num_samples).astype(np.float32) for name in METRIC_NAMES}
    storage.write_parquet(workspace.artifact_path("metrics.parquet"), pd.DataFrame({"id": ids, **metric_values}))
    issue_names = ("dark", "light", "blurry", "near_duplicate", "outlier", "label_issue")
    matrix = pd.DataFrame({"id": ids})
    for name in issue_names:
        matrix[name] = np.where(rng.random(num_samples) < 0.03, rng.random(num_samples), 0.0)
    matrix["issue_count"] = (matrix[list(issue_names)] > 0).sum(axis=1)
    matrix["max_severity"] = matrix[list(issue_names)].max(axis=1)
    storage.write_parquet(workspace.artifact_path("issue_matrix.parquet"), matrix)
    flagged = matrix.melt(id_vars="id", value_vars=list(issue_names), var_name="issue", value_name="severity")
    flagged = flagged[flagged["severity"] > 0].assign(explanation="synthetic", stage="synthetic")
    storage.write_parquet(workspace.artifact_path("issues.parquet"), flagged)
    storage.write_parquet(workspace.artifact_path("projection.parquet"), pd.DataFrame(
        {"id": ids, "x": rng.normal(size=num_samples) + label_index, "y": rng.normal(size=num_samples)}))
    quality = probabilities[np.arange(num_samples), label_index]
    suggested = probabilities.argmax(axis=1)
    rank = np.empty(num_samples, dtype=int)
    rank[np.argsort(quality)] = np.arange(1, num_samples + 1)
    storage.write_parquet(workspace.artifact_path("label_issues.parquet"), pd.DataFrame({
        "id": ids, "given_label": samples["label"], "suggested_label": np.array(classes)[suggested],
        "label_quality": quality, "is_label_issue": (suggested != label_index) & (quality < 0.1), "rank": rank}))
    near = np.full(num_samples, -1)
    paired = rng.choice(num_samples, size=(num_samples // 100) * 2, replace=False)
    near[paired] = np.arange(len(paired)) // 2  # 1% of the samples in near-duplicate pairs
    first = np.zeros(num_samples, dtype=bool)
    first[paired[::2]] = True
    splits = samples["split"].to_numpy()
    cross = np.zeros(num_samples, dtype=bool)
    cross[paired] = np.repeat(splits[paired[::2]] != splits[paired[1::2]], 2)
    storage.write_parquet(workspace.artifact_path("duplicates.parquet"), pd.DataFrame({
        "id": ids, "exact_group": -1, "near_group": near, "group_size": np.where(near >= 0, 2, 1),
        "is_representative": (near < 0) | first, "cross_split": cross}))
    embeddings = rng.normal(size=(num_samples, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    storage.write_npy(workspace.artifact_path("embeddings.npy"), embeddings)
    workspace.curation().close()
    return workspace


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# -- pytest fixtures (import them into a test module to use them) -------------------------------------------
@pytest.fixture(scope="session")
def analysed_template(sample_workspace, tmp_path_factory) -> Path:
    """The sample workspace with every analysis artifact (session-wide; copy it before writing)."""
    root = copy_workspace(sample_workspace, tmp_path_factory.mktemp("analysed") / "ws")
    write_analysis_artifacts(root)
    return root


@pytest.fixture
def analysed_workspace(analysed_template, tmp_path) -> Path:
    """A private copy of :func:`analysed_template` (own curation database) for a test that writes."""
    return copy_workspace(analysed_template, tmp_path / "ws")
