"""Stage ``outliers``: images unlike the rest of the dataset.

Two views of "unlike", each scored by the mean distance to a sample's ``k`` nearest neighbours:

* **semantic** — ``knn_distance``: mean cosine distance in the embedding space (shared neighbour graph
  of the embeddings stage), and ``ood_score``: cleanlab's ``OutOfDistribution`` score on the same
  features and neighbours, reported as ``1 - score`` so that, like every other column here, higher
  means more atypical;
* **visual** — ``visual_distance``: mean euclidean distance in the built-in pixel-descriptor space
  (``visual_features.npy``), to neighbours among at most ``Config.max_reference`` samples. It is needed
  because a classifier's features are not built to notice inputs from another distribution: measured on the
  Fashion-MNIST sample, the model's embedding places random noise, checkerboards and inverted images among
  ordinary garments (robust z below 3), while the pixel descriptor puts them far from everything (robust z
  above 4).

Each distance is turned into a robust z-score on a log scale — ``(log d - median) / (1.4826 MAD)`` — so
the threshold means the same thing whatever the embedding's scale; ``outlier_score`` is the larger of the
two. A sample is an outlier when ``outlier_score >= Config.threshold``, and at most
``Config.max_fraction`` of the dataset is flagged (the highest scores), a guard against degenerate
distance distributions (e.g. a dataset made mostly of copies, where the MAD collapses).

Outputs: ``artifacts/outliers.parquet`` — ``id``, ``knn_distance``, ``visual_distance``, ``ood_score``,
``outlier_score``, ``is_outlier``; ``artifacts/flags_outliers.parquet`` — issue ``outlier``.

Per-sample part and reduction: the per-sample inputs (embedding, pixel descriptor) come from the embeddings
stage, batch by batch; this stage is a whole-dataset reduction (neighbour distances, robust z-scores over the
whole dataset, the ``max_fraction`` cap).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from robustlens.analysis.stages.base import (
    FLAG_COLUMNS,
    StageContext,
    StageInputError,
    StageResult,
    StageSpec,
    check_number,
    excluded_rows,
    fingerprint,
    is_current,
    load_sample_array,
    read_artifact,
    write_artifact,
)
from robustlens.analysis.stages.embeddings import kept_graph, knn_search, load_embeddings, neighbor_graph

STAGE = "outliers"
#: Lower bound of the robust scale (log units), so near-constant distances do not make every
#: small deviation an outlier.
MIN_LOG_SCALE = 0.05


@dataclass
class Config:
    """Parameters of the outliers stage.

    Attributes
    ----------
    n_neighbors:
        ``k``: neighbours averaged per sample.
    threshold:
        Smallest robust z-score (log-distance MAD units) flagged.
    max_fraction:
        Largest fraction of samples flagged.
    max_reference:
        In the visual space, neighbours are searched among at most this many samples (a seeded random
        subset; all samples when there are fewer), which bounds the search at N × max_reference.
    """

    n_neighbors: int = 10
    threshold: float = 3.5
    max_fraction: float = 0.02
    max_reference: int = 10_000

    def __post_init__(self) -> None:
        check_number(STAGE, self, "n_neighbors", low=1, integer=True)
        check_number(STAGE, self, "threshold", low=0, low_open=True)
        check_number(STAGE, self, "max_fraction", low=0, high=1)
        check_number(STAGE, self, "max_reference", low=1, integer=True)


def run(context: StageContext, config: Config) -> StageResult:
    """Score every sample; write ``outliers.parquet`` and ``flags_outliers.parquet``.

    Summary: ``skipped`` and the outlier counts.
    """
    return SPEC.result(_run(context, config))


def _run(context: StageContext, config: Config) -> dict:
    workspace = context.workspace
    samples = workspace.samples
    embeddings, embeddings_fp = load_embeddings(context)
    visual = load_sample_array(context, "visual_features", ndim=2, producer="embeddings")
    kept = ~excluded_rows(workspace)
    inputs = fingerprint(
        samples["id"],
        embeddings_fp,
        fingerprint(visual),
        context.random_state,
        *([np.flatnonzero(~kept)] if not kept.all() else []),
    )
    if is_current(context, "outliers", config=config, inputs=inputs) and is_current(
        context, "flags_outliers", config=config, inputs=inputs
    ):
        table = read_artifact(workspace, "outliers")
        if table is not None:
            return {"skipped": True, "outliers": int(table["is_outlier"].sum()), "samples": len(samples)}

    # Samples without an image (their file was refused) are scored by nobody: NaN scores, never flagged.
    n = int(kept.sum())
    k = min(config.n_neighbors, n - 1)
    if k < 1:
        scores = {"knn": np.zeros(n), "visual": np.zeros(n), "ood": np.zeros(n)}
        z_semantic = z_visual = np.zeros(n)
    else:
        indices, distances = neighbor_graph(context, k)
        if n < len(samples):
            indices, distances = kept_graph(indices, distances, kept)
        visual_distances = reference_distances(
            visual[kept], k, max_reference=config.max_reference, random_state=context.random_state
        )
        scores = {
            "knn": distances.mean(1),
            "visual": visual_distances,
            "ood": 1.0 - cleanlab_ood_scores(embeddings[kept], indices, distances),
        }
        z_semantic, z_visual = robust_log_z(scores["knn"]), robust_log_z(scores["visual"])
    outlier_score = np.maximum(z_semantic, z_visual)
    flagged = select_outliers(outlier_score, threshold=config.threshold, max_fraction=config.max_fraction)
    if n < len(samples):
        scores = {name: _scatter(values, kept) for name, values in scores.items()}
        z_semantic, z_visual, outlier_score = (
            _scatter(z_semantic, kept),
            _scatter(z_visual, kept),
            _scatter(outlier_score, kept),
        )
        flagged = _scatter(flagged, kept, fill=False).astype(bool)
        n = len(samples)
    table = pd.DataFrame(
        {
            "id": samples["id"].to_numpy(),
            "knn_distance": scores["knn"].astype(np.float32),
            "visual_distance": scores["visual"].astype(np.float32),
            "ood_score": scores["ood"].astype(np.float32),
            "outlier_score": outlier_score.astype(np.float32),
            "is_outlier": flagged,
        }
    )
    flags = flag_table(table, z_semantic, z_visual, config)
    write_artifact(context, "outliers", table, stage=STAGE, config=config, inputs=inputs)
    write_artifact(context, "flags_outliers", flags, stage=STAGE, config=config, inputs=inputs)
    return {
        "skipped": False,
        "outliers": int(flagged.sum()),
        "samples": n,
        "semantic": int((flagged & (z_semantic >= z_visual)).sum()),
        "visual": int((flagged & (z_visual > z_semantic)).sum()),
    }


def _scatter(values: np.ndarray, kept: np.ndarray, *, fill: float = np.nan) -> np.ndarray:
    """``(N,)`` array holding ``values`` (one per kept sample) at the ``kept`` positions, ``fill`` elsewhere."""
    out = np.full(len(kept), fill, dtype=np.float64 if fill is np.nan else np.asarray(values).dtype)
    out[kept] = values
    return out


def reference_distances(vectors: np.ndarray, k: int, *, max_reference: int, random_state: int) -> np.ndarray:
    """``(N,)`` mean euclidean distance of each row to its ``k`` nearest other rows of a reference set.

    The reference set is every row when ``N <= max_reference``, else a random subset of
    ``max_reference`` rows (seeded): a typical image still finds close neighbours among 10,000 others
    while an outlier finds none, and the robust z-score that follows is insensitive to the overall
    scale of the distances.
    """
    n = vectors.shape[0]
    if n <= max_reference:
        return knn_search(vectors, k, random_state=random_state)[1].mean(1)
    from sklearn.neighbors import NearestNeighbors

    reference = np.sort(np.random.default_rng(random_state).choice(n, max_reference, replace=False))
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    search = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(data[reference])
    distances, indices = search.kneighbors(data)
    # A reference row finds itself at distance 0: drop that match, else the farthest of the k + 1.
    is_self = reference[indices] == np.arange(n)[:, None]
    is_self[~is_self.any(1), -1] = True
    return distances[~is_self].reshape(n, k).mean(1)


class PrecomputedNeighbors:
    """A precomputed neighbour graph behind the part of sklearn's ``NearestNeighbors`` API that
    cleanlab's ``OutOfDistribution`` uses (its documented way to plug in another neighbour search).

    Parameters
    ----------
    indices, distances:
        ``(N, k)`` neighbours of each sample (itself excluded) and their cosine distances.
    """

    metric = "cosine"

    def __init__(self, indices: np.ndarray, distances: np.ndarray):
        if indices.shape != distances.shape:
            raise StageInputError(f"indices {indices.shape} and distances {distances.shape} differ in shape")
        self.indices = indices
        self.distances = distances
        self.n_neighbors = indices.shape[1]

    def kneighbors(
        self,
        X: np.ndarray | None = None,  # noqa: N803 (sklearn's name)
        n_neighbors: int | None = None,
        return_distance: bool = True,
    ) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
        if X is not None and len(X) != len(self.indices):
            raise StageInputError(f"the precomputed graph covers {len(self.indices)} samples, got {len(X)} queries")
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if return_distance:
            return self.distances[:, :k].astype(np.float64), self.indices[:, :k]
        return self.indices[:, :k]


def cleanlab_ood_scores(embeddings: np.ndarray, indices: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """cleanlab ``OutOfDistribution`` feature scores (in [0, 1], lower = more atypical), ``(N,)``."""
    from cleanlab.outlier import OutOfDistribution

    estimator = OutOfDistribution(params={"knn": PrecomputedNeighbors(indices, distances), "k": indices.shape[1]})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="cleanlab")
        return np.asarray(estimator.score(features=embeddings), dtype=np.float64)


def robust_log_z(distances: np.ndarray) -> np.ndarray:
    """``(N,)`` robust z-scores of ``log(distances)``: median-centred, scaled by 1.4826 × MAD."""
    logs = np.log(np.maximum(np.asarray(distances, dtype=np.float64), 1e-6))
    centre = np.median(logs)
    scale = max(1.4826 * float(np.median(np.abs(logs - centre))), MIN_LOG_SCALE)
    return (logs - centre) / scale


def select_outliers(score: np.ndarray, *, threshold: float, max_fraction: float) -> np.ndarray:
    """``(N,)`` bool: ``score >= threshold``, keeping at most ``max_fraction`` of N (highest scores)."""
    flagged = score >= threshold
    limit = int(np.floor(max_fraction * len(score)))
    if flagged.sum() > limit:
        order = np.argsort(-score, kind="stable")
        flagged = np.zeros(len(score), dtype=bool)
        flagged[order[:limit]] = True
    return flagged


def flag_table(table: pd.DataFrame, z_semantic: np.ndarray, z_visual: np.ndarray, config: Config) -> pd.DataFrame:
    """``flags_outliers.parquet`` rows for the flagged samples (each has a z-score >= the threshold)."""
    rows = []
    for position in np.flatnonzero(table["is_outlier"].to_numpy()):
        score = float(table["outlier_score"].iat[position])
        severity = float(np.clip(0.5 + 0.5 * (score - config.threshold) / max(config.threshold, 1e-9), 0.5, 1.0))
        reasons = []
        if z_visual[position] >= config.threshold:
            reasons.append(
                f"looks unlike the other images (pixel statistics {z_visual[position]:.1f} robust SDs "
                f"farther from its {config.n_neighbors} nearest neighbours than typical)"
            )
        if z_semantic[position] >= config.threshold:
            reasons.append(
                f"unlike the other images in embedding space ({z_semantic[position]:.1f} robust SDs "
                f"farther from its nearest neighbours than typical, OOD score "
                f"{float(table['ood_score'].iat[position]):.2f})"
            )
        rows.append((table["id"].iat[position], "outlier", round(severity, 4), "; ".join(reasons)))
    if not rows:
        return pd.DataFrame(
            {
                "id": pd.Series(dtype=str),
                "issue": pd.Series(dtype=str),
                "severity": pd.Series(dtype=float),
                "explanation": pd.Series(dtype=str),
            }
        )
    return pd.DataFrame(rows, columns=list(FLAG_COLUMNS))


SPEC = StageSpec(
    name=STAGE,
    config=Config,
    run=run,
    reads=("embeddings", "visual_features"),
    writes=("outliers", "flags_outliers"),
    description="images unlike the rest (embedding and pixel-descriptor neighbour distances)",
)
