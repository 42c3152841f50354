"""Pure table builders of the robustness run: sample selection, corruption families, per-sample scores,
per-slice robustness with Wilson intervals, and the ``fragile`` issue flags.

Everything here works on numpy arrays / DataFrames already computed by :mod:`.run`; nothing touches the
model or the disk, so the slice table can be rebuilt from ``robustness_samples.parquet`` alone when only
the slices changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from robustlens.analysis.stages.evaluation import wilson_interval

from ._common import RobustnessInputError

#: Corruption families (ImageNet-C grouping; ``saturate`` is one of its "extra" digital corruptions).
FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "weather": ("brightness", "fog"),
    "digital": ("contrast", "saturate", "pixelate", "jpeg_compression", "elastic_transform"),
}
FAMILY_OF: dict[str, str] = {name: family for family, names in FAMILIES.items() for name in names}

#: Columns of ``robustness_slices.parquet``.
SLICE_COLUMNS = (
    "slice_id",
    "description",
    "kind",
    "n_samples",
    "clean_accuracy",
    "clean_accuracy_ci_low",
    "clean_accuracy_ci_high",
    "corruption_accuracy",
    "corruption_accuracy_ci_low",
    "corruption_accuracy_ci_high",
    "n_attacked",
    "robust_accuracy_linf",
    "robust_accuracy_linf_ci_low",
    "robust_accuracy_linf_ci_high",
    "robust_accuracy_l2",
    "robust_accuracy_l2_ci_low",
    "robust_accuracy_l2_ci_high",
    "n_certified",
    "certified_accuracy",
    "certified_accuracy_ci_low",
    "certified_accuracy_ci_high",
    "n_stability",
    "flip_probability",
    "worst_rank",
    "rank_note",
)
#: ``rank_note`` of a slice with fewer attacked (or, without attacks, evaluated) samples than ``min_samples``.
TOO_FEW = "too few samples"
FLAG_ISSUE = "fragile"


def family_of(corruption: str) -> str:
    """Family (``noise``, ``blur``, ``weather``, ``digital``) of a corruption name; ``other`` if unknown."""
    return FAMILY_OF.get(corruption, "other")


# -- sample selection -------------------------------------------------------------------------------------


def select_samples(labels: np.ndarray, max_samples: int, random_state: int) -> np.ndarray:
    """Choose up to ``max_samples`` sample positions, stratified by class, in a stratified order.

    Parameters
    ----------
    labels:
        ``(N,)`` integer class of every sample (workspace order).
    max_samples:
        How many to choose (``>= 1``); all ``N`` when larger.
    random_state:
        Seed of the shuffle.

    Returns
    -------
    numpy.ndarray
        ``(M,)`` int64 positions, ``M = min(max_samples, N)``. Each class gets a share proportional to its
        frequency (largest remainder), and the order interleaves the classes so that every *prefix* of the
        result is stratified too (the attack and certification subsets are prefixes).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise RobustnessInputError(
            f"labels must be a 1-D integer array; got shape {labels.shape}, dtype {labels.dtype}"
        )
    if isinstance(max_samples, bool) or not isinstance(max_samples, int | np.integer) or max_samples < 1:
        raise RobustnessInputError(f"max_samples must be an integer >= 1; got {max_samples!r}")
    n = labels.shape[0]
    rng = np.random.default_rng(random_state)
    shuffled = rng.permutation(n)
    classes, counts = np.unique(labels, return_counts=True)
    total = min(int(max_samples), n)
    exact = counts * total / n
    quota = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - quota), kind="stable")
    quota[remainder_order[: total - int(quota.sum())]] += 1
    rank = np.empty(n, dtype=np.int64)
    quota_of = np.zeros(n, dtype=np.int64)
    for cls, share in zip(classes, quota, strict=True):
        members = shuffled[labels[shuffled] == cls]
        rank[members] = np.arange(members.shape[0])
        quota_of[members] = share
    keep = shuffled[rank[shuffled] < quota_of[shuffled]]
    # (rank + 1/2) / quota spreads each class evenly over the order; the stable sort keeps the shuffle as tie-break.
    key = (rank[keep] + 0.5) / quota_of[keep]
    return keep[np.argsort(key, kind="stable")].astype(np.int64)


# -- per-sample scores ------------------------------------------------------------------------------------


def family_flip_severity(first_flip: pd.DataFrame) -> pd.DataFrame:
    """Lowest flip severity per family.

    Parameters
    ----------
    first_flip:
        ``(M, n_corruptions)``: per sample and corruption, the lowest evaluated severity at which the
        prediction differs from the clean one, NaN if it never does (``CorruptionBenchmark.first_flip_severity``).

    Returns
    -------
    pandas.DataFrame
        ``(M, n_families)``, one column per family present, ``min`` over its corruptions (NaN = never flips).
    """
    out = {}
    for family in [*FAMILIES, "other"]:
        columns = [c for c in first_flip.columns if family_of(c) == family]
        if columns:
            out[family] = first_flip[columns].min(axis=1, skipna=True).to_numpy(dtype=float)
    return pd.DataFrame(out, index=first_flip.index)


@dataclass
class FragilityRule:
    """When a clean-correct sample is flagged ``fragile``.

    Attributes
    ----------
    linf_eps:
        Broken by an L∞ attack at ``ε <= linf_eps``.
    l2:
        Minimal L2 perturbation (DeepFool / C&W) ``<= l2``.
    min_families:
        Prediction flips at the lowest evaluated severity in at least this many corruption families.
    """

    linf_eps: float
    l2: float
    min_families: int


def fragility(samples: pd.DataFrame, rule: FragilityRule, lowest_severity: int | None) -> tuple[np.ndarray, list[str]]:
    """Fragility severity ``(M,)`` in ``[0, 1]`` (0 = not fragile) and an explanation per sample.

    Parameters
    ----------
    samples:
        The per-sample frame (``rob_*`` columns, see :mod:`.run`), one row per evaluated sample.
    rule:
        Thresholds.
    lowest_severity:
        Lowest corruption severity evaluated (``None``: no corruptions ran).

    Each criterion that fires gives a score: ``1 - size / (2·threshold)`` for the two perturbation sizes
    (so in ``[0.5, 1]``, 1 for the smallest possible perturbation) and ``0.5 + 0.5·fraction`` of the
    families that flip at the lowest severity; the severity is the largest score.
    """
    m = len(samples)
    correct = samples["rob_clean_correct"].to_numpy(dtype=bool)
    score = np.zeros(m)
    reasons: list[list[str]] = [[] for _ in range(m)]
    if "rob_min_linf_eps" in samples:
        eps = samples["rob_min_linf_eps"].to_numpy(dtype=float)
        hit = correct & (eps <= rule.linf_eps * (1 + 1e-6))
        score = np.where(hit, np.maximum(score, 1 - eps / (2 * rule.linf_eps)), score)
        for i in np.flatnonzero(hit):
            reasons[i].append(f"an L∞ attack changes its prediction at ε = {eps[i] * 255:.3g}/255")
    if "rob_min_l2" in samples:
        size = samples["rob_min_l2"].to_numpy(dtype=float)
        hit = correct & (size <= rule.l2)
        score = np.where(hit, np.maximum(score, 1 - size / (2 * rule.l2)), score)
        for i in np.flatnonzero(hit):
            reasons[i].append(f"a minimal L2 perturbation of {size[i]:.3f} changes its prediction")
    family_columns = [c for c in samples.columns if c.startswith("rob_flip_severity_")]
    if family_columns and lowest_severity is not None:
        flips = samples[family_columns].to_numpy(dtype=float) <= lowest_severity
        count = flips.sum(axis=1)
        hit = correct & (count >= rule.min_families)
        score = np.where(hit, np.maximum(score, 0.5 + 0.5 * count / len(family_columns)), score)
        names = np.array([c.removeprefix("rob_flip_severity_") for c in family_columns])
        for i in np.flatnonzero(hit):
            reasons[i].append(
                f"the mildest {', '.join(names[flips[i]])} corruptions (severity {lowest_severity}) "
                "change its prediction"
            )
    explanations = ["; ".join(r) for r in reasons]
    return np.clip(score, 0.0, 1.0), explanations


def fragile_flags(samples: pd.DataFrame) -> pd.DataFrame:
    """The ``flags_robustness`` table: ``id``, ``issue`` (= ``fragile``), ``severity``, ``explanation``."""
    fragile = samples[samples["rob_fragile"]]
    return pd.DataFrame(
        {
            "id": fragile["id"].astype(str).to_numpy(),
            "issue": FLAG_ISSUE,
            "severity": fragile["rob_fragility"].to_numpy(dtype=float),
            "explanation": ["correctly classified, but " + text for text in fragile["rob_fragile_reason"]],
        }
    )


# -- per-slice robustness ---------------------------------------------------------------------------------


@dataclass
class SliceReference:
    """Budgets at which slices are compared (``None`` where the analysis did not run)."""

    linf_eps: float | None
    l2_eps: float | None
    radius: float | None


def sample_outcomes(samples: pd.DataFrame, reference: SliceReference) -> dict[str, np.ndarray]:
    """Per evaluated sample ``(M,)``: what the slice table averages.

    Returns ``clean`` (bool), ``corruption`` (float accuracy over corruption × severity cells, NaN if none
    ran), ``attacked`` (bool), ``robust_linf`` / ``robust_l2`` (bool, survives every attack of that norm at
    the reference budget; only meaningful where ``attacked``), ``has_linf`` / ``has_l2`` (whether that norm
    was attacked), ``certified_in`` (bool, in the smoothing subset) and ``certified`` (bool, the smoothed
    classifier certifies the true class with a radius of at least the reference radius), ``flip_probability``
    (float, mean ImageNet-P flip probability; NaN outside the stability subset).
    """
    m = len(samples)

    def column(name: str, fill: float = np.nan) -> np.ndarray:
        return samples[name].to_numpy(dtype=float) if name in samples else np.full(m, fill)

    attacked = samples["rob_attacked"].to_numpy(dtype=bool) if "rob_attacked" in samples else np.zeros(m, bool)
    clean = samples["rob_clean_correct"].to_numpy(dtype=bool)
    out = {"clean": clean, "corruption": column("rob_corruption_accuracy"), "attacked": attacked}
    budgets = (("linf", reference.linf_eps, "rob_min_linf_eps"), ("l2", reference.l2_eps, "rob_min_l2_eps"))
    for norm, eps, name in budgets:
        breaking = column(name)
        # NaN = not broken at any budget of the grid; 0 = a clean error.
        out[f"robust_{norm}"] = attacked & clean & ~(breaking <= (eps if eps is not None else -1) * (1 + 1e-6))
        out[f"has_{norm}"] = np.full(m, eps is not None and name in samples)
    radius = column("rob_certified_radius")
    out["certified_in"] = ~np.isnan(radius)
    certified_correct = (
        samples["rob_certified_correct"].to_numpy(dtype=bool, na_value=False)
        if "rob_certified_correct" in samples
        else np.zeros(m, bool)
    )
    ref = reference.radius if reference.radius is not None else np.inf
    out["certified"] = out["certified_in"] & certified_correct & (np.nan_to_num(radius, nan=-1.0) >= ref)
    out["flip_probability"] = column("rob_flip_probability")
    return out


def rate_with_interval(
    values: np.ndarray, members: np.ndarray | slice = slice(None)
) -> tuple[int, float, float, float]:
    """Count, mean and Wilson 95 % interval of ``values`` ``(M,)`` (bool or [0, 1] floats; NaN floats left out) over
    ``members`` (a ``(M,)`` bool mask; default all): ``(n, mean, ci_low, ci_high)``, NaNs when ``n = 0``."""
    chosen = values[members]
    chosen = chosen[~np.isnan(chosen)] if chosen.dtype.kind == "f" else chosen
    n = int(chosen.shape[0])
    if n == 0:
        return 0, np.nan, np.nan, np.nan
    successes = float(np.sum(chosen))
    low, high = wilson_interval(np.array([successes]), np.array([float(n)]))
    return n, successes / n, float(low[0]), float(high[0])


def slice_robustness(
    samples: pd.DataFrame, slices: Sequence[Mapping], reference: SliceReference, *, min_samples: int, top_k: int
) -> pd.DataFrame:
    """Robustness of every slice, over the evaluated samples it holds.

    Parameters
    ----------
    samples:
        Per-sample frame (one row per evaluated sample).
    slices:
        Each a mapping with ``slice_id``, ``description``, ``kind`` and ``members``: ``(M,)`` bool over the
        rows of ``samples``.
    reference:
        Budgets of the robust and certified accuracies.
    min_samples:
        Slices with fewer attacked (or, without attacks, evaluated) samples are not ranked.
    top_k:
        Length of the worst-robustness list (``worst_rank`` 1..top_k, NaN otherwise).

    Returns
    -------
    pandas.DataFrame
        :data:`SLICE_COLUMNS`. The corruption-accuracy interval treats a sample's mean accuracy over the
        corruption × severity cells as its success fraction (an approximation: cells of one sample are not
        independent). Slices are ranked by robust L∞ accuracy at the reference ε, else robust L2, else
        corruption accuracy (ascending); the "all" slice and slices defined by the ``fragile`` flag itself
        are not ranked, and slices holding the same evaluated samples are ranked once.
    """
    outcome = sample_outcomes(samples, reference)
    rows = []
    for spec in slices:
        members = np.asarray(spec["members"], dtype=bool)
        row: dict[str, Any] = {
            "slice_id": str(spec["slice_id"]),
            "description": str(spec["description"]),
            "kind": str(spec["kind"]),
        }
        row["n_samples"], *clean = rate_with_interval(outcome["clean"].astype(float), members)
        row["clean_accuracy"], row["clean_accuracy_ci_low"], row["clean_accuracy_ci_high"] = clean
        _, *corr = rate_with_interval(outcome["corruption"], members)
        row["corruption_accuracy"], row["corruption_accuracy_ci_low"], row["corruption_accuracy_ci_high"] = corr
        attacked = members & outcome["attacked"]
        row["n_attacked"] = int(attacked.sum())
        for norm in ("linf", "l2"):
            robust = outcome[f"robust_{norm}"].astype(float)
            values = (
                rate_with_interval(robust, attacked)[1:] if outcome[f"has_{norm}"].any() else (np.nan, np.nan, np.nan)
            )
            name = f"robust_accuracy_{norm}"
            row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = values
        certified_members = members & outcome["certified_in"]
        row["n_certified"], *cert = rate_with_interval(outcome["certified"].astype(float), certified_members)
        row["certified_accuracy"], row["certified_accuracy_ci_low"], row["certified_accuracy_ci_high"] = cert
        flips = outcome["flip_probability"][members]
        flips = flips[~np.isnan(flips)]
        row["n_stability"] = int(flips.size)
        row["flip_probability"] = float(flips.mean()) if flips.size else np.nan
        row["_digest"] = hashlib.blake2b(np.packbits(members).tobytes(), digest_size=8).hexdigest()
        rows.append(row)
    table = pd.DataFrame(rows, columns=[*SLICE_COLUMNS[:-2], "_digest"])
    table["worst_rank"] = _worst_ranks(table, min_samples=min_samples, top_k=top_k)
    table["rank_note"] = _rank_notes(table, min_samples=min_samples)
    return table.drop(columns="_digest").reset_index(drop=True)


def _rank_key(table: pd.DataFrame) -> str | None:
    """The column slices are ranked by: robust L∞ accuracy, else robust L2, else corruption accuracy."""
    return next(
        (
            c
            for c in ("robust_accuracy_linf", "robust_accuracy_l2", "corruption_accuracy")
            if c in table and table[c].notna().any()
        ),
        None,
    )


def _rank_notes(table: pd.DataFrame, *, min_samples: int) -> list[str]:
    """Why a slice is (not) ranked: ``ranked #k``, :data:`TOO_FEW` (with the count), or the other reasons."""
    key = _rank_key(table)
    notes = []
    for _, row in table.iterrows():
        size = int(row["n_attacked"] if key is not None and key.startswith("robust") else row["n_samples"])
        if pd.notna(row["worst_rank"]):
            notes.append(f"ranked #{int(row['worst_rank'])}")
        elif row["kind"] == "all":
            notes.append("all samples (not ranked)")
        elif key is None or pd.isna(row[key]):
            notes.append("nothing to rank by")
        elif size < min_samples:
            notes.append(f"{TOO_FEW} ({size} < {min_samples}{' attacked' if key.startswith('robust') else ''})")
        elif f"flagged {FLAG_ISSUE}" in str(row["description"]):
            notes.append("defined by the fragile flag itself (not ranked)")
        else:
            notes.append("not among the least robust")
    return notes


def _worst_ranks(table: pd.DataFrame, *, min_samples: int, top_k: int) -> np.ndarray:
    """1-based rank of the ``top_k`` least robust eligible slices (NaN for the others)."""
    ranks = np.full(len(table), np.nan)
    if table.empty:
        return ranks
    key = _rank_key(table)
    if key is None:
        return ranks
    size = table["n_attacked"] if key.startswith("robust") else table["n_samples"]
    eligible = (
        (size >= min_samples)
        & (table["kind"] != "all")
        & table[key].notna()
        & ~table["description"].str.contains(f"flagged {FLAG_ISSUE}", regex=False)
    )
    candidates = table[eligible].sort_values([key, "n_samples"], ascending=[True, False], kind="stable")
    candidates = candidates.drop_duplicates("_digest").head(top_k)
    ranks[candidates.index.to_numpy()] = np.arange(1, len(candidates) + 1)
    return ranks


def class_slices(labels: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """One slice per class present in ``labels`` ``(M,)`` (class indices), plus the ``all`` slice."""
    slices = [
        {
            "slice_id": "all",
            "description": "all evaluated samples",
            "kind": "all",
            "members": np.ones(labels.shape[0], dtype=bool),
        }
    ]
    for index in np.unique(labels):
        name = classes[int(index)]
        slices.append(
            {"slice_id": f"label={name}", "description": f"label = {name}", "kind": "class", "members": labels == index}
        )
    return slices


def records(frame: pd.DataFrame, columns: Iterable[str]) -> list[dict]:
    """``frame[columns]`` as JSON-friendly records (NaN → None)."""
    subset = frame[list(columns)].astype(object)
    return subset.where(subset.notna(), None).to_dict(orient="records")
