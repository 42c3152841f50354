"""Stage ``label_issues``: samples whose given label is probably wrong (confident learning, cleanlab).

Confident learning needs out-of-sample class probabilities. They come from one of two places
(recorded as ``probability_source`` in the summary and the index):

* ``"given"`` — a prediction set of the workspace, when it is out-of-sample;
* ``"cross_validated"`` — a logistic regression trained on the embeddings (``artifacts/embeddings.npy``,
  else the imported ones) with stratified k-fold ``cross_val_predict``, used when asked for, when the
  prediction set is marked in-sample (``Config.predictions_in_sample`` or ``"in_sample": true`` in the
  set's manifest entry), or when there are no predictions.

Outputs:

* ``artifacts/label_issues.parquet`` — samples order: ``id``, ``given_label``, ``suggested_label``
  (argmax of the probabilities), ``given_label_probability``, ``suggested_label_probability``,
  ``label_quality`` (cleanlab label-quality score in [0, 1], low = suspicious), ``is_label_issue``,
  ``rank`` (1 = lowest label quality);
* ``artifacts/label_class_summary.parquet`` — per class: ``class``, ``class_index``, ``num_samples``,
  ``num_flagged``, ``mean_label_quality``, and cleanlab's estimates ``label_issues``,
  ``inverse_label_issues``, ``label_noise``, ``inverse_label_noise``, ``label_quality_score``;
* ``artifacts/overlapping_classes.parquet`` — class pairs the annotators (or the model) confuse:
  ``class_a``, ``class_b``, ``class_index_a``, ``class_index_b``, ``num_overlapping``, ``joint_probability``;
* ``artifacts/flags_label_issues.parquet`` — issue ``label_issue``, severity ``1 − label_quality``.

Per-sample part and reduction: none per sample; confident learning (and the cross-validated classifier) is a
whole-dataset reduction of the labels and probabilities. The stage is skipped with a warning when the data cannot
support it (:func:`precondition`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from cleanlab.count import compute_confident_joint
from cleanlab.dataset import find_overlapping_classes, overall_label_health_score, rank_classes_by_label_quality
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from robustlens.analysis.stages.base import (
    StageContext,
    StageInputError,
    StageResult,
    StageSpec,
    check_choice,
    check_number,
    config_error,
    excluded_rows,
    fingerprint,
    is_current,
    write_artifact,
)
from robustlens.analysis.stages.evaluation import json_safe, stored_summary
from robustlens.analysis.workspace import Workspace

STAGE = "label_issues"
ISSUE = "label_issue"
PROBABILITY_MODES = ("auto", "given", "cross_validated")
FILTER_METHODS = (
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_normalized_margin",
    "low_self_confidence",
)
QUALITY_METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")


@dataclass
class Config:
    """Parameters of the label-issue stage.

    Attributes
    ----------
    prediction_set:
        Prediction set to use; ``None`` = the first one.
    probabilities:
        ``"given"`` (the prediction set), ``"cross_validated"`` (classifier on embeddings) or ``"auto"``
        (given ones when out-of-sample, otherwise cross-validated when embeddings exist).
    predictions_in_sample:
        The prediction set was made by a model trained on these very samples, so its probabilities
        overfit the given labels and hide label errors.
    cv_folds:
        Folds of the cross-validated probabilities (reduced to the smallest class size if needed).
    filter_by:
        cleanlab ``find_label_issues`` method. The default ``"low_self_confidence"`` flags the samples of
        lowest label quality, as many as confident learning estimates are mislabelled, so the flagged set
        is the head of the ``rank`` queue. ``"prune_by_noise_rate"`` misses flips whose given label has
        probability ~0 when the model's top class is below that class's confidence threshold: on the
        Fashion-MNIST sample with 5 % planted flips (5 seeds) it reached recall 0.90–0.97 and precision
        0.57–0.58 against 0.95–0.99 and 0.66–0.73 for the default.
    quality_method:
        cleanlab ``get_label_quality_scores`` method.
    logistic_c:
        Inverse regularisation strength of the cross-validated logistic regression.
    logistic_max_iter:
        Iteration cap of its solver.
    """

    prediction_set: str | None = None
    probabilities: str = "auto"
    predictions_in_sample: bool = False
    cv_folds: int = 5
    filter_by: str = "low_self_confidence"
    quality_method: str = "self_confidence"
    logistic_c: float = 1.0
    logistic_max_iter: int = 300

    def __post_init__(self) -> None:
        check_choice(STAGE, self, "probabilities", PROBABILITY_MODES)
        check_choice(STAGE, self, "filter_by", FILTER_METHODS)
        check_choice(STAGE, self, "quality_method", QUALITY_METHODS)
        check_number(STAGE, self, "cv_folds", low=2, integer=True)
        check_number(STAGE, self, "logistic_c", low=0, low_open=True)
        check_number(STAGE, self, "logistic_max_iter", low=1, integer=True)
        if self.prediction_set is not None and not isinstance(self.prediction_set, str):
            raise config_error(STAGE, "prediction_set", "a prediction-set name or None", self.prediction_set)


def load_embeddings(workspace: Workspace) -> tuple[np.ndarray | None, str | None]:
    """The embeddings stage's ``artifacts/embeddings.npy``, else the imported embeddings.

    Returns
    -------
    (embeddings, origin):
        ``(N, D)`` float array or ``None``; ``origin`` names where it came from.
    """
    from robustlens.analysis.artifacts import read_embeddings

    found = read_embeddings(workspace)
    return (None, None) if found is None else (found.matrix, found.origin)


def effective_folds(labels: np.ndarray, folds: int) -> int:
    """``folds`` reduced to the smallest class count of ``(N,)`` labels (every fold must see every class)."""
    present, counts = np.unique(labels, return_counts=True)
    if len(present) < 2:
        raise StageInputError("cross-validated probabilities need at least two classes with samples")
    if counts.min() < 2:
        smallest = int(present[counts.argmin()])
        raise StageInputError(
            f"cross-validation needs at least 2 samples per class; class index {smallest} has {int(counts.min())}"
        )
    return min(folds, int(counts.min()))


def cross_validated_probabilities(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    folds: int = 5,
    random_state: int = 0,
    c: float = 1.0,
    max_iter: int = 300,
) -> np.ndarray:
    """Out-of-sample probabilities of a logistic regression on ``embeddings``.

    Parameters
    ----------
    embeddings:
        ``(N, D)`` features.
    labels:
        ``(N,)`` class indices in ``[0, num_classes)``.
    folds:
        Stratified folds; reduced to the smallest class count (each fold must see every class).

    Returns
    -------
    ``(N, num_classes)`` probabilities; classes without samples get probability 0.
    """
    present = np.unique(labels)
    folds = effective_folds(labels, folds)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=random_state)
    model = LogisticRegression(C=c, max_iter=max_iter)
    partial = cross_val_predict(model, embeddings, labels, cv=splitter, method="predict_proba")
    probabilities = np.zeros((len(labels), num_classes))
    probabilities[:, present] = partial  # predict_proba columns follow the sorted labels seen in training
    return probabilities


def choose_source(context: StageContext, config: Config) -> tuple[str, np.ndarray, dict]:
    """Decide where the probabilities come from, without computing them yet.

    Returns
    -------
    (source, inputs, details):
        ``"given"`` or ``"cross_validated"``; the array they derive from (the ``(N, K)`` given
        probabilities or the ``(N, D)`` embeddings); what was used (for the summary).
    """
    workspace = context.workspace
    names = workspace.prediction_names
    name = config.prediction_set if config.prediction_set is not None else (names[0] if names else None)
    if name is not None and name not in names:
        raise StageInputError(f"unknown prediction set '{name}'; the workspace has {names}")
    in_sample = name is not None and (
        config.predictions_in_sample or bool(workspace.manifest["prediction_sets"][name].get("in_sample", False))
    )
    mode = config.probabilities
    embeddings, origin = (None, None) if mode == "given" else load_embeddings(workspace)
    if mode == "auto":
        if name is not None and not in_sample:
            mode = "given"
        elif embeddings is not None:
            mode = "cross_validated"
        elif name is not None:
            mode = "given"  # in-sample predictions are all there is; the summary warns
        else:
            raise StageInputError(
                "label issues need out-of-sample predictions or embeddings; the workspace has "
                "neither (pass --predictions to 'robustlens init' or run the embeddings stage)"
            )
    if mode == "given":
        if name is None:
            raise StageInputError("probabilities='given' but the workspace has no prediction sets")
        details = {"prediction_set": name, "predictions_in_sample": in_sample}
        if in_sample:
            details["warning"] = (
                "in-sample predictions overfit the given labels, so label errors the model memorised are missed"
            )
        return "given", workspace.predictions(name).astype(np.float64), details
    if embeddings is None:
        raise StageInputError(
            "probabilities='cross_validated' needs embeddings; run the embeddings stage or "
            "pass --embeddings to 'robustlens init'"
        )
    return (
        "cross_validated",
        embeddings,
        {"embeddings": origin, "prediction_set": name, "predictions_in_sample": in_sample if name else None},
    )


def find_issues(
    labels: np.ndarray,
    probabilities: np.ndarray,
    *,
    filter_by: str = "low_self_confidence",
    quality_method: str = "self_confidence",
) -> tuple[pd.DataFrame, np.ndarray]:
    """Confident-learning label issues.

    Parameters
    ----------
    labels:
        ``(N,)`` given class indices.
    probabilities:
        ``(N, K)`` out-of-sample class probabilities.

    Returns
    -------
    (table, confident_joint):
        ``table`` with N rows: ``given``, ``suggested`` (class indices), ``given_label_probability``,
        ``suggested_label_probability``, ``label_quality``, ``is_label_issue``, ``rank``;
        ``confident_joint`` ``(K, K)`` (reused by the class summaries).
    """
    if probabilities.ndim != 2 or probabilities.shape[0] != len(labels):
        raise StageInputError(f"probabilities must have shape ({len(labels)}, K), got {probabilities.shape}")
    confident_joint = compute_confident_joint(labels, probabilities)
    issues = find_label_issues(
        labels, probabilities, filter_by=filter_by, confident_joint=confident_joint, n_jobs=1
    )  # worker processes cost more than they save at these sizes
    quality = get_label_quality_scores(labels, probabilities, method=quality_method)
    suggested = probabilities.argmax(axis=1)
    rows = np.arange(len(labels))
    order = np.lexsort((rows, quality))  # lowest quality first, ties by sample order
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(1, len(labels) + 1)
    table = pd.DataFrame(
        {
            "given": labels,
            "suggested": suggested,
            "given_label_probability": probabilities[rows, labels],
            "suggested_label_probability": probabilities[rows, suggested],
            "label_quality": np.clip(quality, 0.0, 1.0),
            "is_label_issue": issues,
            "rank": rank,
        }
    )
    return table, confident_joint


def class_summary(
    labels: np.ndarray, probabilities: np.ndarray, confident_joint: np.ndarray, issues: pd.DataFrame, classes: list[str]
) -> pd.DataFrame:
    """Per-class noise estimates (see the module docstring), workspace class order."""
    ranked = rank_classes_by_label_quality(labels, probabilities, confident_joint=confident_joint)
    ranked = ranked.rename(
        columns={
            "Class Index": "class_index",
            "Label Issues": "label_issues",
            "Inverse Label Issues": "inverse_label_issues",
            "Label Noise": "label_noise",
            "Inverse Label Noise": "inverse_label_noise",
            "Label Quality Score": "label_quality_score",
        }
    )
    base = pd.DataFrame({"class": classes, "class_index": np.arange(len(classes))})
    grouped = issues.groupby("given")
    base["num_samples"] = base["class_index"].map(grouped.size()).fillna(0).astype(int)
    base["num_flagged"] = base["class_index"].map(grouped["is_label_issue"].sum()).fillna(0).astype(int)
    base["mean_label_quality"] = base["class_index"].map(grouped["label_quality"].mean())
    return base.merge(ranked, on="class_index", how="left")


def overlapping_classes(
    labels: np.ndarray, probabilities: np.ndarray, confident_joint: np.ndarray, classes: list[str]
) -> pd.DataFrame:
    """Class pairs ranked by their estimated joint probability of being confused (symmetric)."""
    overlap = find_overlapping_classes(labels, probabilities, confident_joint=confident_joint)
    overlap = overlap.rename(
        columns={
            "Class Index A": "class_index_a",
            "Class Index B": "class_index_b",
            "Num Overlapping Examples": "num_overlapping",
            "Joint Probability": "joint_probability",
        }
    )
    names = np.asarray(classes, dtype=object)
    overlap.insert(0, "class_b", names[overlap["class_index_b"].to_numpy(dtype=int)])
    overlap.insert(0, "class_a", names[overlap["class_index_a"].to_numpy(dtype=int)])
    return overlap[
        ["class_a", "class_b", "class_index_a", "class_index_b", "num_overlapping", "joint_probability"]
    ].reset_index(drop=True)


def issue_flags(ids: np.ndarray, table: pd.DataFrame, classes: list[str], source: str) -> pd.DataFrame:
    """Flags rows (``id``, ``issue``, ``severity``, ``explanation``) for the flagged samples."""
    names = np.asarray(classes, dtype=object)
    flagged = table[table["is_label_issue"]]
    who = "the model gives" if source == "given" else "a classifier cross-validated on embeddings gives"
    explanation = [
        f"labelled '{names[g]}' but {who} '{names[s]}' {p:.2f} (label quality {q:.2f})"
        for g, s, p, q in zip(
            flagged["given"],
            flagged["suggested"],
            flagged["suggested_label_probability"],
            flagged["label_quality"],
            strict=True,
        )
    ]
    return pd.DataFrame(
        {
            "id": ids[flagged.index.to_numpy()].astype(str),
            "issue": ISSUE,
            "severity": (1.0 - flagged["label_quality"].to_numpy()).clip(0.0, 1.0),
            "explanation": pd.Series(explanation, dtype=str),
        }
    )


def _with_excluded(
    per_sample: pd.DataFrame, ids: np.ndarray, labels: np.ndarray, kept: np.ndarray, names: np.ndarray
) -> pd.DataFrame:
    """``per_sample`` (rows of the kept samples) extended to every sample, in samples order: an excluded sample
    keeps its given label as suggestion, has NaN probabilities and quality, no flag, and ranks after the rest."""
    full = per_sample.set_axis(np.flatnonzero(kept)).reindex(np.arange(len(ids)))
    excluded = ~kept
    full["id"] = ids
    for column in ("given_label", "suggested_label"):
        full.loc[excluded, column] = names[labels[excluded]]
    full["is_label_issue"] = full["is_label_issue"].fillna(False).astype(bool)
    rank = full["rank"].to_numpy(dtype=np.float64, copy=True)
    rank[excluded] = len(per_sample) + 1 + np.arange(int(excluded.sum()))
    full["rank"] = rank.astype(np.int64)
    return full


def run(context: StageContext, config: Config) -> StageResult:
    """Find label issues; see the module docstring for the artifacts.

    Summary: ``probability_source`` and its details, ``num_samples``, ``num_label_issues``,
    ``label_health_score``, ``most_overlapping``, ``skipped``.
    """
    return SPEC.result(_run(context, config))


def _run(context: StageContext, config: Config) -> dict:
    workspace = context.workspace
    samples = workspace.samples
    labels = samples["label_index"].to_numpy(dtype=np.int64)
    classes = workspace.classes
    if len(classes) < 2:
        raise StageInputError(f"label issues need at least two classes, the workspace has {classes}")
    source, source_array, details = choose_source(context, config)
    # Cross-validated on embeddings: samples the embeddings stage had no image for (their file was refused) are
    # left out, with no label quality and no flag. Given predictions do not depend on the image files.
    kept = ~excluded_rows(workspace) if source == "cross_validated" else np.ones(len(samples), dtype=bool)
    inputs = fingerprint(
        samples["id"],
        labels,
        source,
        source_array,
        context.random_state,
        *([np.flatnonzero(~kept)] if not kept.all() else []),
    )
    artifacts = ("label_class_summary", "overlapping_classes", "flags_label_issues", "label_issues")
    if all(is_current(context, name, config=config, inputs=inputs) for name in artifacts):
        return {**(stored_summary(context, "label_issues") or {}), "skipped": True}

    all_ids, all_labels = samples["id"].to_numpy(), labels
    labels = labels[kept]
    if source == "given":
        probabilities = source_array
    else:
        probabilities = cross_validated_probabilities(
            source_array[kept],
            labels,
            len(classes),
            folds=config.cv_folds,
            random_state=context.random_state,
            c=config.logistic_c,
            max_iter=config.logistic_max_iter,
        )
        details["cv_folds"] = effective_folds(labels, config.cv_folds)
    table, confident_joint = find_issues(
        labels, probabilities, filter_by=config.filter_by, quality_method=config.quality_method
    )
    ids = all_ids[kept]
    names = np.asarray(classes, dtype=object)
    per_sample = pd.DataFrame(
        {
            "id": ids,
            "given_label": names[table["given"].to_numpy()],
            "suggested_label": names[table["suggested"].to_numpy()],
            **{
                c: table[c].to_numpy()
                for c in (
                    "given_label_probability",
                    "suggested_label_probability",
                    "label_quality",
                    "is_label_issue",
                    "rank",
                )
            },
        }
    )
    if not kept.all():
        per_sample = _with_excluded(per_sample, all_ids, all_labels, kept, names)
        details["samples_skipped"] = int((~kept).sum())
    per_class = class_summary(labels, probabilities, confident_joint, table, classes)
    overlap = overlapping_classes(labels, probabilities, confident_joint, classes)
    flags = issue_flags(ids, table, classes, source)
    summary = json_safe(
        {
            "probability_source": source,
            **details,
            "num_samples": int(len(labels)),
            "num_label_issues": int(table["is_label_issue"].sum()),
            # No confident_joint here: cleanlab recomputes it for this score and warns when given one.
            "label_health_score": overall_label_health_score(labels, probabilities, verbose=False),
            "most_overlapping": overlap[["class_a", "class_b"]].head(3).values.tolist(),
        }
    )
    extra = {"probability_source": source}
    for name, frame in (
        ("label_class_summary", per_class),
        ("overlapping_classes", overlap),
        ("flags_label_issues", flags),
    ):
        write_artifact(context, name, frame, stage=STAGE, config=config, inputs=inputs, extra=extra)
    # Written last: its index entry carries the summary that a skipped re-run reports.
    write_artifact(
        context,
        "label_issues",
        per_sample,
        stage=STAGE,
        config=config,
        inputs=inputs,
        extra={**extra, "summary": summary},
    )
    return {**summary, "skipped": False}


def precondition(context: StageContext, config: Config) -> str | None:
    """Why the label-issues stage cannot run on this workspace, or ``None`` when it can.

    Without out-of-sample predictions the stage cross-validates a classifier on the embeddings, and
    stratified k-fold needs at least two samples of every class.
    """
    classes = context.workspace.classes
    if len(classes) < 2:
        return f"label issues need at least two classes, the workspace has {classes}"
    try:
        source, _, _ = choose_source(context, config)
    except ValueError as exc:  # no predictions and no embeddings: the stage says what is missing
        return str(exc)
    if source != "cross_validated":
        return None
    # Samples whose file was refused are left out of the cross-validation.
    labels = context.workspace.samples["label_index"].to_numpy(dtype=np.int64)[~excluded_rows(context.workspace)]
    counts = np.bincount(labels, minlength=len(classes))
    thin = [
        f"'{classes[i]}' ({int(counts[i])} image{'s' if counts[i] != 1 else ''})"
        for i in np.flatnonzero((counts > 0) & (counts < 2))
    ]
    if thin:
        return (
            f"without out-of-sample predictions, label issues come from cross-validation on the embeddings, "
            f"which needs at least 2 samples per class; class {', '.join(thin)} has fewer (add images or "
            "pass --predictions to 'robustlens init')"
        )
    return None


SPEC = StageSpec(
    name=STAGE,
    config=Config,
    run=run,
    reads=("samples",),
    uses=("predictions", "embeddings"),
    writes=("label_class_summary", "overlapping_classes", "flags_label_issues", "label_issues"),
    precondition=precondition,
    description="samples whose given label is probably wrong (confident learning)",
)
