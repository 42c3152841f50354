"""Stage ``slices``: performance and issue rates per data slice, and automatic worst-slice discovery.

A *base predicate* selects the samples of one value of one feature:

=========== ============================================================================================
source      predicates
=========== ============================================================================================
class       ``label = <class>``
split       ``split = <split>`` (only when there is more than one split)
metadata    ``<column> = <value>`` for categorical ``meta.*`` columns; quantile bins of numeric ones
metric      quartile bins of every metric in ``artifacts/metrics.parquet``
cluster     ``embedding cluster = <k>`` (k-means on the embeddings, k ≈ √N / 2, capped)
issue       ``flagged <issue>`` for every issue in ``artifacts/flags_*.parquet``
=========== ============================================================================================

A *slice* is a conjunction of up to ``max_conditions`` base predicates of different features. Worst
slices are found with SliceLine (Sagadeeva & Boehm, SIGMOD 2021): a level-wise lattice search scored by

    score(S) = α · (error_rate(S) / overall_error − 1) − (1 − α) · (N / |S| − 1)

which trades how much worse a slice is against how small it is, so tiny noisy slices score low; slices
smaller than ``min_support`` are never candidates, and candidates whose score upper bound (from their
parents' sizes and error counts) cannot reach the current top-k are pruned. Slice membership is held as
bit-packed boolean rows (one ``uint64`` word per 64 samples), so a candidate's size and error count are
a few AND + popcount passes over its predicates' rows, never a loop over samples.

Outputs:

* ``artifacts/slices.parquet`` — every base predicate's slice, the discovered conjunctions and an
  ``all samples`` row: ``slice_id``, ``description`` (e.g. ``"label = shirt AND brightness in Q1 [..]"``),
  ``kind`` (class, split, metadata, metric, cluster, issue, all, discovered), ``n_conditions``,
  ``predicate_ids`` (list of ints into ``slice_predicates``), ``size``, ``support`` (size / N),
  ``errors``, ``accuracy``, ``error_rate``, ``gap`` (error_rate − overall error; > 0 is worse),
  ``ci_low`` / ``ci_high`` (Wilson 95 % interval of ``error_rate``), ``score`` (SliceLine), ``searched``
  (the slice met the minimum support and took part in discovery), ``members_digest`` (equal for slices
  holding the same samples), ``accuracy.<set>`` per prediction set,
  ``issue_rate.<issue>`` per issue; error columns refer to ``Config.prediction_set`` (default: first);
* ``artifacts/worst_slices.parquet`` — the same columns plus ``rank``: the ``top_k`` best-scoring
  searched slices with a positive score, leaving out conjunctions that score no higher than a slice made
  of a subset of their conditions and repeats of the same member set;
* ``artifacts/slice_predicates.parquet`` — ``predicate_id``, ``feature``, ``kind``, ``value``, ``lower``,
  ``upper`` (numeric bins: ``lower < v <= upper``, the first bin also holds ``lower``), ``description``,
  ``size``;
* ``artifacts/slice_predicate_masks.npy`` — ``(num_predicates, ceil(N / 8))`` uint8, each predicate's
  membership bit-packed (``numpy.packbits``, little bit order) in samples order; :func:`slice_mask`
  turns a slice row back into a boolean mask;
* ``artifacts/slice_clusters.parquet`` — ``id``, ``cluster`` (when embeddings exist).

Per-sample part and reduction: base-predicate membership is per sample (a sample's class, split, metadata, metric
bin, cluster, flags), but bin edges (quantiles), clusters (k-means) and the SliceLine search are whole-dataset
reductions.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn.cluster import KMeans

from robustlens.analysis import artifacts, storage
from robustlens.analysis.stages.base import (
    StageContext,
    StageInputError,
    StageResult,
    StageSpec,
    check_number,
    config_error,
    excluded_rows,
    fingerprint,
    is_current,
    read_artifact,
    record_artifact,
    write_artifact,
)
from robustlens.analysis.stages.evaluation import (
    aligned_metrics,
    json_safe,
    quantile_bins,
    stored_summary,
    wilson_interval,
)
from robustlens.analysis.stages.issues import ANALYSIS_FLAGS, collect_flags
from robustlens.analysis.stages.label_issues import load_embeddings
from robustlens.analysis.workspace import Workspace

STAGE = "slices"
MASKS_NAME = "slice_predicate_masks"
# Words of bit-packed rows processed at once when counting candidates (~64 MiB of uint64 per block).
_BLOCK_WORDS = 8_000_000
# Cells of the (parents × extensions) grid built at once when growing candidates.
_GRID_CELLS = 4_000_000
PREDICATE_COLUMNS = ("predicate_id", "feature", "kind", "value", "lower", "upper", "description", "size")


@dataclass
class Config:
    """Parameters of the slice stage.

    Attributes
    ----------
    prediction_set:
        Prediction set whose errors define accuracy, gap and score; ``None`` = the first one.
    max_conditions:
        Most predicates in a discovered slice (1–4).
    min_support:
        Smallest slice searched; ``None`` = ``max(min_support_floor, ceil(min_support_fraction · N))``.
    alpha:
        SliceLine weight of the error term against the size term, in (0, 1].
    top_k:
        Number of worst slices reported (and the size of the top-k list that drives pruning).
    max_reported:
        Most discovered conjunctions (2+ conditions) kept in ``slices.parquet``.
    metric_bins, metadata_bins:
        Quantile bins of each quality metric / numeric metadata column (4 = quartiles).
    max_levels:
        Most values of one categorical metadata column turned into predicates (the most frequent).
    max_categorical_unique:
        Numeric metadata with at most this many distinct values is categorical.
    num_clusters:
        k of the embedding k-means; ``None`` = ``round(√N / 2)`` clipped to ``[2, max_clusters]``.
    exclude_from_search:
        Features shown as slices but not searched. ``issue.label_issue`` is excluded by default because
        label issues are found from the same predictions' disagreement with the labels, so "flagged
        label_issue" would trivially top every worst-slice list.
    """

    prediction_set: str | None = None
    max_conditions: int = 3
    min_support: int | None = None
    min_support_fraction: float = 0.01
    min_support_floor: int = 20
    alpha: float = 0.95
    top_k: int = 20
    max_reported: int = 200
    metric_bins: int = 4
    metadata_bins: int = 4
    max_levels: int = 30
    max_categorical_unique: int = 20
    num_clusters: int | None = None
    max_clusters: int = 30
    exclude_from_search: tuple[str, ...] = ("issue.label_issue",)

    def __post_init__(self) -> None:
        check_number(STAGE, self, "max_conditions", low=1, high=4, integer=True)
        check_number(STAGE, self, "alpha", low=0, high=1, low_open=True)
        for name in (
            "top_k",
            "metric_bins",
            "metadata_bins",
            "max_levels",
            "max_clusters",
            "max_categorical_unique",
            "min_support_floor",
        ):
            check_number(STAGE, self, name, low=1, integer=True)
        check_number(STAGE, self, "min_support", low=1, integer=True, optional=True)
        check_number(STAGE, self, "min_support_fraction", low=0, high=1)
        check_number(STAGE, self, "num_clusters", low=2, integer=True, optional=True)
        check_number(STAGE, self, "max_reported", low=0, integer=True)
        if self.prediction_set is not None and not isinstance(self.prediction_set, str):
            raise config_error(STAGE, "prediction_set", "a prediction-set name or None", self.prediction_set)
        if isinstance(self.exclude_from_search, str) or not all(
            isinstance(name, str) for name in self.exclude_from_search
        ):
            raise config_error(STAGE, "exclude_from_search", "a sequence of feature names", self.exclude_from_search)


# -- base predicates -------------------------------------------------------------------------------------


def _predicate(
    feature: str,
    kind: str,
    description: str,
    mask: np.ndarray,
    *,
    value: Any = None,
    lower: float = np.nan,
    upper: float = np.nan,
) -> tuple[dict, np.ndarray]:
    row = {
        "feature": feature,
        "kind": kind,
        "value": None if value is None else str(value),
        "lower": float(lower),
        "upper": float(upper),
        "description": description,
    }
    return row, mask


def categorical_predicates(
    values: pd.Series, feature: str, kind: str, label: str, max_levels: int | None = None
) -> list[tuple[dict, np.ndarray]]:
    """``label = v`` for the (most frequent ``max_levels``) values ``v`` of ``values`` (N,), NaN excluded."""
    counts = values.value_counts(dropna=True)
    if max_levels is not None:
        counts = counts.head(max_levels)
    array = values.to_numpy()
    return [_predicate(feature, kind, f"{label} = {level}", array == level, value=level) for level in counts.index]


def binned_predicates(
    values: np.ndarray, feature: str, kind: str, label: str, num_bins: int
) -> list[tuple[dict, np.ndarray]]:
    """One predicate per quantile bin of ``values`` (N,) floats; NaN in no bin."""
    bins, edges = quantile_bins(values, num_bins)
    count = len(edges) - 1
    predicates = []
    for b in range(count):
        # "Q1" only when the bins really are quartiles; ties can merge quantiles into fewer bins.
        name = f"Q{b + 1}" if count == num_bins == 4 else f"bin {b + 1}/{count}"
        description = f"{label} in {name} [{edges[b]:.4g}, {edges[b + 1]:.4g}]"
        predicates.append(
            _predicate(feature, kind, description, bins == b, value=name, lower=edges[b], upper=edges[b + 1])
        )
    return predicates


def metadata_predicates(samples: pd.DataFrame, config: Config) -> tuple[list, list[str]]:
    """Predicates of every ``meta.*`` column; returns them and notes on columns left out."""
    predicates, notes = [], []
    for column in [c for c in samples.columns if c.startswith("meta.")]:
        series = samples[column]
        label = column.removeprefix("meta.")
        unique = series.nunique(dropna=True)
        numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
        if unique == 0:
            notes.append(f"{column}: no values")
        elif (
            pd.api.types.is_integer_dtype(series)
            and unique == series.notna().sum()
            and unique > config.max_categorical_unique
        ):
            notes.append(f"{column}: distinct integers (an identifier), not sliced")
        elif numeric and unique > config.max_categorical_unique:
            predicates += binned_predicates(
                series.to_numpy(dtype=float), column, "metadata", label, config.metadata_bins
            )
        elif unique == series.notna().sum() and unique > config.max_levels:
            notes.append(f"{column}: every value is unique (an identifier), not sliced")
        else:
            predicates += categorical_predicates(series, column, "metadata", label, config.max_levels)
    return predicates, notes


def cluster_embeddings(embeddings: np.ndarray, num_clusters: int, random_state: int) -> np.ndarray:
    """``(N,)`` k-means cluster index of each ``(N, D)`` embedding row (seeded, one initialisation)."""
    model = KMeans(n_clusters=num_clusters, n_init=1, random_state=random_state)
    return model.fit_predict(np.asarray(embeddings, dtype=np.float32))


def default_cluster_count(num_samples: int, max_clusters: int) -> int:
    """``round(√N / 2)`` clipped to ``[2, max_clusters]`` and to ``N``."""
    return int(min(num_samples, max(2, min(max_clusters, round(np.sqrt(num_samples) / 2)))))


def build_predicates(context: StageContext, config: Config) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """All base predicates of the workspace.

    Returns
    -------
    (table, masks, extras):
        ``table`` — one row per predicate (:data:`PREDICATE_COLUMNS`); ``masks`` — ``(P, N)`` bool;
        ``extras`` — ``notes`` (what was left out and why), ``clusters`` (``(N,)`` or ``None``),
        ``issues`` (issue name → ``(N,)`` bool).
    """
    workspace = context.workspace
    samples = workspace.samples
    n = len(samples)
    notes: list[str] = []
    predicates = categorical_predicates(samples["label"], "label", "class", "label")
    if samples["split"].nunique() > 1:
        predicates += categorical_predicates(samples["split"], "split", "split", "split")
    meta, meta_notes = metadata_predicates(samples, config)
    predicates += meta
    notes += meta_notes

    metrics = aligned_metrics(workspace)
    if metrics is None:
        notes.append("no metric slices: artifacts/metrics.parquet is missing (run the metrics stage)")
    else:
        for column in metrics.columns:
            predicates += binned_predicates(
                metrics[column].to_numpy(dtype=float), column, "metric", column, config.metric_bins
            )

    clusters = None
    embeddings, _ = load_embeddings(workspace)
    if embeddings is None:
        notes.append("no cluster slices: no embeddings (run the embeddings stage)")
    elif (~excluded_rows(workspace)).sum() >= 4:
        # Samples the embeddings stage had no image for (their file was refused) are in no cluster (-1).
        kept = ~excluded_rows(workspace)
        m = int(kept.sum())
        k = config.num_clusters or default_cluster_count(m, config.max_clusters)
        clusters = np.full(n, -1, dtype=np.int64)
        clusters[kept] = cluster_embeddings(embeddings[kept], min(k, m), context.random_state)
        predicates += [
            _predicate("cluster", "cluster", f"embedding cluster = {c}", clusters == c, value=c)
            for c in range(int(clusters.max()) + 1)
        ]

    issues = issue_masks(context)
    predicates += [
        _predicate(f"issue.{name}", "issue", f"flagged {name}", mask, value=name) for name, mask in issues.items()
    ]

    # A predicate that selects nothing or everything is no slice.
    chosen = [(row, mask) for row, mask in predicates if 0 < mask.sum() < n]
    table = pd.DataFrame([row for row, _ in chosen], columns=list(PREDICATE_COLUMNS[1:-1]))
    masks = np.array([mask for _, mask in chosen], dtype=bool).reshape(len(chosen), n)
    table.insert(0, "predicate_id", np.arange(len(chosen)))
    table["size"] = masks.sum(axis=1)
    return table, masks, {"notes": notes, "clusters": clusters, "issues": issues}


def issue_masks(context: StageContext) -> dict[str, np.ndarray]:
    """Issue name → ``(N,)`` bool, whether each sample is flagged with it (all ``flags_*.parquet``)."""
    samples = context.workspace.samples
    flags = collect_flags(context)
    # Flags of samples no longer in the workspace (position -1) are ignored.
    position = pd.Index(samples["id"]).get_indexer(flags["id"])
    issues = flags["issue"].to_numpy()
    masks = {}
    for issue in sorted(set(issues[position >= 0])):
        mask = np.zeros(len(samples), dtype=bool)
        mask[position[(issues == issue) & (position >= 0)]] = True
        masks[str(issue)] = mask
    return masks


# -- bit-packed membership ---------------------------------------------------------------------------------


def pack_rows(masks: np.ndarray) -> np.ndarray:
    """``(P, N)`` bool → ``(P, ceil(N / 64))`` uint64, bit ``i`` of a row = sample ``i``; padding bits 0."""
    packed = np.packbits(np.atleast_2d(masks), axis=1, bitorder="little")
    pad = (-packed.shape[1]) % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return np.ascontiguousarray(packed).view(np.uint64)


def popcount(bits: np.ndarray) -> np.ndarray:
    """Number of set bits of each row of a ``(P, W)`` uint64 array → ``(P,)`` int64."""
    return np.bitwise_count(bits).sum(axis=-1, dtype=np.int64)


def count_conjunctions(bits: np.ndarray, candidates: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Size of each conjunction and how many of its members each target holds.

    Parameters
    ----------
    bits:
        ``(P, W)`` uint64 packed predicate rows.
    candidates:
        ``(C, L)`` int predicate indices; a candidate is the AND of its ``L`` rows (repeat an index, or
        point at an all-ones row, to express fewer conditions).
    targets:
        ``(T, W)`` uint64 packed target rows (e.g. errors, issues).

    Returns
    -------
    (sizes, hits):
        ``(C,)`` int64 and ``(C, T)`` int64.
    """
    c, length = candidates.shape
    sizes = np.empty(c, dtype=np.int64)
    hits = np.empty((c, len(targets)), dtype=np.int64)
    block = max(1, _BLOCK_WORDS // max(bits.shape[1], 1))
    for start in range(0, c, block):
        chunk = candidates[start : start + block]
        members = bits[chunk[:, 0]]
        for j in range(1, length):
            np.bitwise_and(members, bits[chunk[:, j]], out=members)
        sizes[start : start + len(chunk)] = popcount(members)
        for t, target in enumerate(targets):
            hits[start : start + len(chunk), t] = popcount(members & target)
    return sizes, hits


# -- SliceLine -----------------------------------------------------------------------------------------------


def sliceline_score(
    sizes: ArrayLike, errors: ArrayLike, num_samples: int, mean_error: float, alpha: float
) -> np.ndarray:
    """SliceLine score of slices with ``sizes`` members and ``errors`` errors (arrays); -inf for empty."""
    sizes = np.asarray(sizes, dtype=float)
    errors = np.asarray(errors, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = alpha * ((errors / sizes) / mean_error - 1) - (1 - alpha) * (num_samples / sizes - 1)
    return np.where(sizes > 0, score, -np.inf)


def score_upper_bound(
    size_bound: ArrayLike, error_bound: ArrayLike, num_samples: int, mean_error: float, min_support: int, alpha: float
) -> np.ndarray:
    """Highest score any slice with at most ``size_bound`` members and ``error_bound`` errors can reach.

    With 0/1 errors a slice of size ``s`` has at most ``min(s, error_bound)`` errors; the score is
    monotone in ``s`` on each side of ``s = error_bound``, so the maximum over ``s`` in
    ``[min_support, size_bound]`` lies at one of three probe points (as in SliceLine).
    """
    size_bound = np.asarray(size_bound, dtype=float)
    error_bound = np.asarray(error_bound, dtype=float)
    feasible = size_bound >= min_support
    probes = np.stack(
        [
            np.full_like(size_bound, float(min_support)),
            np.clip(error_bound, min_support, np.maximum(size_bound, min_support)),
            np.maximum(size_bound, min_support),
        ]
    )
    scores = sliceline_score(probes, np.minimum(probes, error_bound), num_samples, mean_error, alpha)
    return np.where(feasible, scores.max(axis=0), -np.inf)


def _encode(rows: np.ndarray, base: int) -> np.ndarray:
    """Injective int64 key of each row of sorted predicate indices (Horner in base ``base``)."""
    key = np.zeros(len(rows), dtype=np.int64)
    for j in range(rows.shape[1]):
        key = key * base + rows[:, j]
    return key


def extend_candidates(
    parents: np.ndarray, extensions: np.ndarray, features: np.ndarray, num_predicates: int
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates of the next level whose every subset one condition smaller is a parent (apriori).

    Parameters
    ----------
    parents:
        ``(p, L-1)`` sorted predicate indices of the surviving slices of the previous level.
    extensions:
        Sorted predicate indices that may be added (the surviving single predicates).
    features:
        ``(P,)`` feature id of each predicate; a slice uses each feature at most once.

    Returns
    -------
    (candidates, subset_rows):
        ``(c, L)`` sorted predicate indices and ``(c, L)`` row in ``parents`` of each subset that drops
        one condition (for the upper bounds).
    """
    width = parents.shape[1]
    # Parents are expanded a block at a time so the (parents × extensions) grid stays small.
    block = max(1, _GRID_CELLS // max(len(extensions), 1))
    grown = []
    for start in range(0, len(parents), block):
        chunk = parents[start : start + block]
        parent_index, ext_index = np.nonzero(extensions[None, :] > chunk[:, -1:])
        added = extensions[ext_index]
        distinct = np.ones(len(added), dtype=bool)
        for j in range(width):
            distinct &= features[chunk[parent_index, j]] != features[added]
        grown.append(np.column_stack([chunk[parent_index[distinct]], added[distinct]]))
    candidates = np.concatenate(grown) if grown else np.empty((0, width + 1), dtype=np.int64)
    keys = _encode(parents, num_predicates)
    order = np.argsort(keys)
    sorted_keys = keys[order]
    subset_rows = np.empty(candidates.shape, dtype=np.int64)
    complete = np.ones(len(candidates), dtype=bool)
    for j in range(width + 1):
        subset_keys = _encode(np.delete(candidates, j, axis=1), num_predicates)
        position = np.minimum(np.searchsorted(sorted_keys, subset_keys), len(sorted_keys) - 1)
        complete &= sorted_keys[position] == subset_keys
        subset_rows[:, j] = order[position]
    return candidates[complete], subset_rows[complete]


def _top_threshold(scores: list[np.ndarray], top_k: int) -> float:
    """Score a candidate must beat to enter the top-k (0 until k positive scores are known)."""
    pooled = np.concatenate(scores) if scores else np.empty(0)
    pooled = pooled[pooled > 0]
    return float(np.partition(pooled, -top_k)[-top_k]) if len(pooled) >= top_k else 0.0


def search_slices(
    bits: np.ndarray,
    features: np.ndarray,
    searchable: np.ndarray,
    error_bits: np.ndarray,
    *,
    num_samples: int,
    min_support: int,
    max_conditions: int = 3,
    alpha: float = 0.95,
    top_k: int = 20,
) -> pd.DataFrame:
    """SliceLine search for the conjunctions of predicates with the highest score.

    Parameters
    ----------
    bits:
        ``(P, W)`` packed predicate rows (:func:`pack_rows`).
    features:
        ``(P,)`` int feature id of each predicate.
    searchable:
        ``(P,)`` bool, predicates that may take part.
    error_bits:
        ``(W,)`` packed row of the samples the model gets wrong.

    Returns
    -------
    DataFrame of every evaluated slice meeting the support with at least one error and no redundant
    condition: ``predicate_ids`` (tuple), ``size``, ``errors``, ``score``, sorted by score descending.
    """
    if not 1 <= max_conditions <= 4:
        raise StageInputError(f"max_conditions must be in [1, 4], got {max_conditions}")
    if not 0 < alpha <= 1:
        raise StageInputError(f"alpha must be in (0, 1], got {alpha}")
    num_predicates = bits.shape[0]
    total_errors = int(popcount(error_bits[None, :])[0])
    empty = pd.DataFrame({"predicate_ids": [], "size": [], "errors": [], "score": []})
    if total_errors == 0 or num_predicates == 0:
        return empty
    mean_error = total_errors / num_samples

    def score(sizes: np.ndarray, errors: np.ndarray) -> np.ndarray:
        return sliceline_score(sizes, errors, num_samples, mean_error, alpha)

    def bound(sizes: np.ndarray, errors: np.ndarray) -> np.ndarray:
        return score_upper_bound(sizes, errors, num_samples, mean_error, min_support, alpha)

    sizes, hits = count_conjunctions(bits, np.arange(num_predicates)[:, None], error_bits[None, :])
    errors = hits[:, 0]
    valid = searchable & (sizes >= min_support) & (errors > 0)
    found_ids, found_sizes, found_errors, found_scores = (
        [np.flatnonzero(valid)[:, None]],
        [sizes[valid]],
        [errors[valid]],
        [score(sizes[valid], errors[valid])],
    )
    threshold = _top_threshold(found_scores, top_k)
    alive = valid & (bound(sizes, errors) > threshold)
    parents, parent_sizes, parent_errors = np.flatnonzero(alive)[:, None], sizes[alive], errors[alive]
    extensions = parents[:, 0].copy()

    for _level in range(2, max_conditions + 1):
        if len(parents) == 0:
            break
        candidates, subsets = extend_candidates(parents, extensions, features, num_predicates)
        size_bound = parent_sizes[subsets].min(axis=1)
        error_bound = parent_errors[subsets].min(axis=1)
        promising = bound(size_bound, error_bound) > threshold
        candidates, subsets = candidates[promising], subsets[promising]
        sizes, hits = count_conjunctions(bits, candidates, error_bits[None, :])
        errors = hits[:, 0]
        # A conjunction with as many members as one of its parents *is* that parent: not a new slice.
        redundant = (sizes[:, None] == parent_sizes[subsets]).any(axis=1)
        valid = (sizes >= min_support) & (errors > 0) & ~redundant
        found_ids.append(candidates[valid])
        found_sizes.append(sizes[valid])
        found_errors.append(errors[valid])
        found_scores.append(score(sizes[valid], errors[valid]))
        threshold = _top_threshold(found_scores, top_k)
        alive = valid & (bound(sizes, errors) > threshold)
        parents, parent_sizes, parent_errors = candidates[alive], sizes[alive], errors[alive]

    result = pd.DataFrame(
        {
            "predicate_ids": [tuple(int(i) for i in row) for ids in found_ids for row in ids],
            "size": np.concatenate(found_sizes),
            "errors": np.concatenate(found_errors),
            "score": np.concatenate(found_scores),
        }
    )
    return result.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


# -- slice table -----------------------------------------------------------------------------------------------


def _slice_id(predicate_ids: tuple[int, ...], descriptions: list[str]) -> str:
    if not predicate_ids:
        return "all"
    text = " AND ".join(descriptions[i] for i in predicate_ids)
    return "s" + hashlib.sha1(text.encode()).hexdigest()[:12]


def members_digest(row: np.ndarray) -> str:
    """Short hash of a packed membership row: slices with equal digests hold the same samples."""
    return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=8).hexdigest()


def slice_table(
    slices: list[tuple[int, ...]],
    kinds: list[str],
    predicates: pd.DataFrame,
    bits: np.ndarray,
    error_rows: dict[str, np.ndarray],
    issue_rows: dict[str, np.ndarray],
    primary: str | None,
    *,
    num_samples: int,
    min_support: int,
    searchable: np.ndarray,
    alpha: float,
    z: float = 1.96,
) -> pd.DataFrame:
    """Statistics of each slice (see the module docstring for the columns).

    Parameters
    ----------
    slices:
        Predicate-index tuples (``()`` = all samples).
    kinds:
        The ``kind`` of each slice.
    error_rows, issue_rows:
        Prediction set / issue name → ``(W,)`` packed row of erring / flagged samples.
    primary:
        The prediction set the error columns and score refer to (``None``: no predictions).
    """
    descriptions = predicates["description"].tolist()
    all_row = pack_rows(np.ones((1, num_samples), dtype=bool))
    padded_bits = np.vstack([bits, all_row]) if len(bits) else all_row
    width = max([len(s) for s in slices] + [1])
    # Shorter slices are padded with the all-samples row (index P), which leaves the AND unchanged.
    candidates = np.full((len(slices), width), len(bits), dtype=np.int64)
    for row, ids in enumerate(slices):
        candidates[row, : len(ids)] = ids
    targets = list(error_rows.values()) + list(issue_rows.values())
    stacked = np.array(targets, dtype=np.uint64).reshape(len(targets), padded_bits.shape[1])
    sizes, hits = count_conjunctions(padded_bits, candidates, stacked)
    table = pd.DataFrame(
        {
            "slice_id": [_slice_id(ids, descriptions) for ids in slices],
            "description": [" AND ".join(descriptions[i] for i in ids) if ids else "all samples" for ids in slices],
            "kind": kinds,
            "n_conditions": [len(ids) for ids in slices],
            "predicate_ids": [list(ids) for ids in slices],
            "size": sizes,
            "support": sizes / num_samples,
            "members_digest": [members_digest(np.bitwise_and.reduce(padded_bits[row], axis=0)) for row in candidates],
        }
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        if primary is None:
            for column in ("errors", "accuracy", "error_rate", "gap", "ci_low", "ci_high", "score"):
                table[column] = np.nan
        else:
            errors = hits[:, list(error_rows).index(primary)]
            overall = float(popcount(error_rows[primary][None, :])[0]) / num_samples
            low, high = wilson_interval(errors, sizes, z)
            table["errors"] = errors
            table["error_rate"] = errors / sizes
            table["accuracy"] = 1 - table["error_rate"]
            table["gap"] = table["error_rate"] - overall
            table["ci_low"], table["ci_high"] = low, high
            table["score"] = sliceline_score(sizes, errors, num_samples, overall, alpha) if overall > 0 else np.nan
        in_search = np.array([all(searchable[i] for i in ids) for ids in slices])
        table["searched"] = in_search & (sizes >= min_support) & (table["n_conditions"].to_numpy() > 0)
        for t, name in enumerate(error_rows):
            table[f"accuracy.{name}"] = 1 - hits[:, t] / sizes
        for t, name in enumerate(issue_rows, start=len(error_rows)):
            table[f"issue_rate.{name}"] = hits[:, t] / sizes
    return table


def worst_slices(table: pd.DataFrame, top_k: int) -> pd.DataFrame:
    """The ``top_k`` searched slices with the highest positive score, with a 1-based ``rank``.

    A conjunction that scores no higher than a slice made of a subset of its conditions is left out:
    the simpler slice already explains it, and without this rule the list fills up with the worst
    class cut by random quartiles of unrelated metrics.
    """
    candidates = table[table["searched"] & (table["score"] > 0)]
    score_of = {tuple(ids): score for ids, score in zip(table["predicate_ids"], table["score"], strict=True)}
    dominated = np.array(
        [
            _dominated(tuple(ids), score, score_of)
            for ids, score in zip(candidates["predicate_ids"], candidates["score"], strict=True)
        ],
        dtype=bool,
    )
    candidates = candidates[~dominated]
    # Equal member sets under different names (e.g. brightness and mean_r of grayscale images): keep the
    # simplest description.
    worst = candidates.sort_values(["score", "n_conditions", "size"], ascending=[False, True, False], kind="stable")
    worst = worst.drop_duplicates("members_digest").head(top_k)
    worst = worst.reset_index(drop=True)
    worst.insert(0, "rank", np.arange(1, len(worst) + 1))
    return worst


def _dominated(ids: tuple[int, ...], score: float, score_of: dict[tuple[int, ...], float]) -> bool:
    """Whether a slice made of a proper, non-empty subset of ``ids`` scores at least ``score``."""
    subsets = (sub for size in range(1, len(ids)) for sub in combinations(ids, size))
    return any(score_of.get(sub, -np.inf) >= score for sub in subsets)


# -- membership for the dashboard ---------------------------------------------------------------------------


def slice_mask(workspace: Workspace, slice_row: str | Mapping | pd.Series) -> np.ndarray:
    """Boolean ``(N,)`` membership of a slice, in ``workspace.samples`` order.

    Parameters
    ----------
    workspace:
        The workspace the slices stage ran on.
    slice_row:
        A row of ``slices.parquet`` / ``worst_slices.parquet`` (a mapping or Series with
        ``predicate_ids``), or a ``slice_id`` string.
    """
    if isinstance(slice_row, str):
        table = read_artifact(workspace, "slices")
        if table is None:
            raise FileNotFoundError(f"{workspace.artifact_path('slices.parquet')} is missing; run the slices stage")
        match = table[table["slice_id"] == slice_row]
        if match.empty:
            raise KeyError(f"no slice '{slice_row}' in {workspace.artifact_path('slices.parquet')}")
        slice_row = match.iloc[0]
    if not isinstance(slice_row, Mapping | pd.Series) or "predicate_ids" not in slice_row:
        raise StageInputError("slice_row must be a slice_id or a slices.parquet row with 'predicate_ids'")
    ids = np.asarray(slice_row["predicate_ids"], dtype=np.int64)
    n = len(workspace.samples)
    if len(ids) == 0:
        return np.ones(n, dtype=bool)
    packed = artifacts.read_slice_masks(workspace)  # WorkspaceError when stale: re-run the slices stage
    try:
        return artifacts.slice_membership(packed, ids, n)
    except IndexError as exc:
        raise StageInputError(str(exc)) from exc


def slice_members(workspace: Workspace, slice_row: str | Mapping | pd.Series) -> list[str]:
    """Sample ids of a slice (see :func:`slice_mask`)."""
    return workspace.samples["id"][slice_mask(workspace, slice_row)].tolist()


# -- the stage ---------------------------------------------------------------------------------------------------


def resolve_min_support(config: Config, num_samples: int) -> int:
    """``config.min_support`` or ``max(floor, ceil(fraction · N))``, at least 1."""
    if config.min_support is not None:
        if config.min_support < 1:
            raise config_error(STAGE, "min_support", "an integer >= 1 or None", config.min_support)
        return int(config.min_support)
    return max(1, config.min_support_floor, int(np.ceil(config.min_support_fraction * num_samples)))


def _inputs(context: StageContext, extras_source: dict) -> str:
    workspace = context.workspace
    samples = workspace.samples
    keep = ["id", "label_index", "split"] + [c for c in samples.columns if c.startswith("meta.")]
    parts = [samples[keep].astype(str), context.random_state, workspace.prediction_names]
    parts += [workspace.predictions(name) for name in workspace.prediction_names]
    parts += [extras_source[key] for key in sorted(extras_source)]
    return fingerprint(*parts)


def run(context: StageContext, config: Config) -> StageResult:
    """Compute slice statistics and discover the worst slices; see the module docstring.

    Summary: ``prediction_set``, ``num_predicates``, ``predicates_by_kind``, ``min_support``,
    ``num_candidates_found``, ``num_slices``, ``overall_error_rate``, ``worst``, ``search_seconds``, ``seconds``,
    ``notes``, ``skipped``.
    """
    summary = _run(context, config)
    clusters = (
        ("slice_clusters",)
        if summary.get("skipped") is not True and context.workspace.artifact_path("slice_clusters.parquet").exists()
        else ()
    )
    return SPEC.result(summary, artifacts=None if summary.get("skipped") is True else SPEC.writes + clusters)


def _run(context: StageContext, config: Config) -> dict:
    started = time.perf_counter()
    workspace = context.workspace
    samples = workspace.samples
    n = len(samples)
    names = workspace.prediction_names
    primary = config.prediction_set if config.prediction_set is not None else (names[0] if names else None)
    if primary is not None and primary not in names:
        raise StageInputError(f"unknown prediction set '{primary}'; the workspace has {names}")
    min_support = resolve_min_support(config, n)

    metrics = aligned_metrics(workspace)
    embeddings, _ = load_embeddings(workspace)
    flags = collect_flags(context)
    inputs = _inputs(
        context,
        {
            "metrics": "none" if metrics is None else metrics,
            "embeddings": "none" if embeddings is None else embeddings,
            "flags": flags[["id", "issue"]],
            **({"excluded": np.flatnonzero(excluded)} if (excluded := excluded_rows(workspace)).any() else {}),
        },
    )
    artifacts = ("slice_predicates", MASKS_NAME, "worst_slices", "slices")
    if all(is_current(context, name, config=config, inputs=inputs) for name in artifacts):
        return {**(stored_summary(context, "slices") or {}), "skipped": True}

    predicates, masks, extras = build_predicates(context, config)
    bits = pack_rows(masks) if len(masks) else np.zeros((0, (n + 63) // 64), dtype=np.uint64)
    feature_codes = pd.factorize(predicates["feature"])[0]
    # A predicate selecting the same samples as an earlier one (a metric duplicated under another name)
    # would only repeat the earlier one's slices, so it is shown but not searched.
    digests = pd.Series([members_digest(row) for row in bits], dtype=object)
    searchable = ~predicates["feature"].isin(config.exclude_from_search).to_numpy() & ~digests.duplicated().to_numpy()
    labels = samples["label_index"].to_numpy()
    error_rows = {name: pack_rows((workspace.predictions(name).argmax(axis=1) != labels)[None, :])[0] for name in names}
    issue_rows = {name: pack_rows(mask[None, :])[0] for name, mask in extras["issues"].items()}

    notes = list(extras["notes"])
    search_started = time.perf_counter()
    if primary is None:
        found = pd.DataFrame({"predicate_ids": [], "score": []})
        notes.append("no accuracy or worst slices: the workspace has no predictions")
    else:
        found = search_slices(
            bits,
            feature_codes,
            searchable,
            error_rows[primary],
            num_samples=n,
            min_support=min_support,
            max_conditions=config.max_conditions,
            alpha=config.alpha,
            top_k=config.top_k,
        )
    search_seconds = time.perf_counter() - search_started
    conjunctions = [ids for ids in found["predicate_ids"] if len(ids) > 1][: config.max_reported]
    slices = [()] + [(i,) for i in range(len(predicates))] + conjunctions
    kinds = ["all"] + predicates["kind"].tolist() + ["discovered"] * len(conjunctions)
    table = slice_table(
        slices,
        kinds,
        predicates,
        bits,
        error_rows,
        issue_rows,
        primary,
        num_samples=n,
        min_support=min_support,
        searchable=searchable,
        alpha=config.alpha,
    )
    worst = worst_slices(table, config.top_k)

    summary = json_safe(
        {
            "prediction_set": primary,
            "num_predicates": int(len(predicates)),
            "predicates_by_kind": predicates["kind"].value_counts().sort_index().to_dict(),
            "min_support": min_support,
            "num_candidates_found": int(len(found)),
            "num_slices": int(len(table)),
            "overall_error_rate": float(table["error_rate"].iloc[0]),
            "worst": worst[["description", "size", "error_rate", "score"]].head(3).to_dict(orient="records"),
            "search_seconds": round(search_seconds, 3),
            "seconds": round(time.perf_counter() - started, 3),
            "notes": notes,
        }
    )
    if extras["clusters"] is not None:
        write_artifact(
            context,
            "slice_clusters",
            pd.DataFrame({"id": samples["id"], "cluster": extras["clusters"]}),
            stage=STAGE,
            config=config,
            inputs=inputs,
        )
    write_artifact(context, "slice_predicates", predicates, stage=STAGE, config=config, inputs=inputs)
    storage.write_npy(
        workspace.artifact_path(f"{MASKS_NAME}.npy"),
        np.packbits(masks, axis=1, bitorder="little") if len(masks) else np.zeros((0, (n + 7) // 8), dtype=np.uint8),
    )
    record_artifact(context, MASKS_NAME, stage=STAGE, config=config, inputs=inputs)
    write_artifact(context, "worst_slices", worst, stage=STAGE, config=config, inputs=inputs)
    # Written last: its index entry carries the summary that a skipped re-run reports.
    write_artifact(context, "slices", table, stage=STAGE, config=config, inputs=inputs, extra={"summary": summary})
    return {**summary, "skipped": False}


SPEC = StageSpec(
    name=STAGE,
    config=Config,
    run=run,
    reads=("samples", "metrics", "embeddings", *ANALYSIS_FLAGS),
    uses=("predictions", "flags_robustness"),
    writes=("slice_predicates", MASKS_NAME, "worst_slices", "slices"),
    may_write=("slice_clusters",),
    description="accuracy and issue rates per data slice; worst slices found with SliceLine",
)
