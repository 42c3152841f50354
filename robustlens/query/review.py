"""The label-review queue: which samples to review, most suspicious first, as a filter of the one filter engine.

The queue is a :class:`~robustlens.query.filters.FilterSpec` (so the CLI, export and a saved filter can name
the same samples) evaluated by :func:`~robustlens.query.filters.filter_positions`:

* ``flagged_only`` keeps the samples the label-issues stage flagged (``label_issue.is_label_issue``);
* ``label`` keeps one given label;
* ``hide_decided`` keeps samples without a review decision (review state ``unreviewed``), so several reviewers
  can work one queue at once;
* the order is the label-issue rank (``label_issue.rank``), else the label quality, lowest first; samples
  without a value come last.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from robustlens.query.filters import CurationReader, FilterSpec, filter_positions

FLAG_COLUMN = "label_issue.is_label_issue"
QUALITY_COLUMN = "label_issue.label_quality"
RANK_COLUMN = "label_issue.rank"


def has_review_queue(table: pd.DataFrame) -> bool:
    """Whether the label-issues stage's ranking is in the sample table (the stage ran)."""
    return QUALITY_COLUMN in table.columns


def flagged_count(table: pd.DataFrame) -> int:
    """How many samples the label-issues stage flagged (0 when it wrote no flag column)."""
    if FLAG_COLUMN not in table.columns:
        return 0
    return int(table[FLAG_COLUMN].fillna(False).to_numpy(dtype=bool).sum())


def review_queue_spec(table: pd.DataFrame, *, flagged_only: bool, label: str | None, hide_decided: bool) -> FilterSpec:
    """The filter of the review queue (see the module docstring); ``table`` decides the sort column."""
    return FilterSpec(
        ranges={FLAG_COLUMN: [1.0, None]} if flagged_only and FLAG_COLUMN in table.columns else {},
        labels=[label] if label else [],
        review=["unreviewed"] if hide_decided else [],
        sort_by=RANK_COLUMN if RANK_COLUMN in table.columns else QUALITY_COLUMN,
    )


def review_queue(
    table: pd.DataFrame, curation: CurationReader | None, *, flagged_only: bool, label: str | None, hide_decided: bool
) -> np.ndarray:
    """Row positions ``(Q,)`` of ``table`` to review, in queue order (:func:`review_queue_spec`).

    ``curation`` (the curation store) is needed when ``hide_decided``: it holds the decisions.
    """
    spec = review_queue_spec(table, flagged_only=flagged_only, label=label, hide_decided=hide_decided)
    return filter_positions(table, spec, curation)
