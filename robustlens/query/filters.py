"""The one filter engine: which samples a view, a saved-filter collection or an export is about.

A :class:`FilterSpec` is a plain, JSON-serialisable description of a subset of the sample table
(:func:`robustlens.query.sample_table.load_sample_table`) and an order. :func:`apply_filter` turns
it into a boolean mask with vectorized column operations (no Python loop over rows), so it stays well
under a second at a million samples; :func:`filter_positions` adds the sort. The dashboard keeps the
current spec in the URL (:func:`to_query_params` / :func:`from_query_params`), collections store it as
``filter_json`` (:meth:`FilterSpec.to_dict`), and ``robustlens export`` accepts either form.

Conditions combine with AND; the values listed inside one condition combine with OR (``labels=[a, b]``
keeps samples labelled *a* or *b*), except ``issues`` whose ``issue_mode`` picks ``any`` or ``all``.

The engine reads only what it is given: the table, the curation store (tags, collections, review states)
and the slice membership (:class:`~robustlens.query.slices.SliceMembership`, for ``slice``). It never
opens a workspace file itself.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Protocol, TypeGuard

import numpy as np
import pandas as pd

from robustlens.errors import ValidationError
from robustlens.query.sample_table import current_column_name, prediction_sets
from robustlens.query.slices import SliceError, SliceMembership

CORRECTNESS = ("any", "correct", "incorrect")
ISSUE_MODES = ("any", "all")
REVIEW_STATES = ("unreviewed", "reviewed", "relabel", "keep", "ambiguous", "exclude")
#: How deep saved filters may refer to collections that are saved filters themselves.
MAX_COLLECTION_DEPTH = 5


class FilterError(ValidationError, ValueError):
    """A filter that cannot be applied: names what is wrong and what was expected.

    A :class:`~robustlens.errors.ValidationError` (bad input, exit status 2 in the CLI) and, as before, a
    :class:`ValueError`.
    """


class CurationReader(Protocol):
    """What the filter engine reads from the curation store (:class:`~robustlens.analysis.curation.CurationStore`)."""

    def samples_with_tag(self, tag: str) -> list[str]: ...

    def collection(self, name: str) -> dict | None: ...

    def decisions(self, *, latest_only: bool = True) -> list[dict]: ...


@dataclass
class FilterSpec:
    """A subset of the sample table and its order.

    Attributes
    ----------
    ranges:
        Numeric column → ``[low, high]`` (inclusive; ``None`` = open). Samples with a missing value fail.
    labels, splits:
        Given labels / splits to keep.
    prediction_set:
        Prediction set that ``predicted`` and ``correctness`` refer to (``None``: the table's first).
    predicted:
        Predicted labels to keep.
    correctness:
        ``"any"``, ``"correct"`` or ``"incorrect"`` (prediction vs given label).
    metadata:
        Metadata name (without ``meta.``) → values to keep, compared as text.
    issues, issue_mode:
        Issue types a sample must be flagged with: ``any`` of them or ``all`` of them.
    tags, collections:
        Keep samples carrying any of these tags / in any of these collections (saved filters re-evaluate).
    review:
        Review states to keep: ``unreviewed``, ``reviewed`` or a decision action (the latest decision).
    text:
        Case-insensitive substring of the sample id or path.
    ids:
        Explicit sample ids (e.g. a grid selection).
    region:
        Polygon ``[[x, y], …]`` on the embedding map (``map.x``, ``map.y``), e.g. a lasso.
    slice:
        ``slice_id`` of a row of ``artifacts/slices.parquet`` (also ``worst_slices`` / ``robustness_slices``):
        keeps exactly the slice's members, from the masks the slices stage counted them with
        (:func:`robustlens.analysis.artifacts.slice_membership`). Needs the workspace's
        :class:`~robustlens.query.slices.SliceMembership` (``slices=`` of :func:`apply_filter`).
    sort_by, descending:
        Sort column (``None``: table order) and direction; missing values sort last.
    """

    ranges: dict[str, list[float | None]] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    prediction_set: str | None = None
    predicted: list[str] = field(default_factory=list)
    correctness: str = "any"
    metadata: dict[str, list[str]] = field(default_factory=dict)
    issues: list[str] = field(default_factory=list)
    issue_mode: str = "any"
    tags: list[str] = field(default_factory=list)
    collections: list[str] = field(default_factory=list)
    review: list[str] = field(default_factory=list)
    text: str = ""
    ids: list[str] = field(default_factory=list)
    region: list[list[float]] = field(default_factory=list)
    slice: str | None = None
    sort_by: str | None = None
    descending: bool = False

    def __post_init__(self) -> None:
        self._normalise()
        self.validate()

    # -- validation and conversion ---------------------------------------------------------------
    def _normalise(self) -> None:
        """Lossless conversions only: tuples → lists, numeric bounds / region points → ``float``, metadata
        numbers → text. Anything of another type is left for :meth:`validate` to name."""
        for name in _STRING_LIST_FIELDS + ("review",):
            value = getattr(self, name)
            if isinstance(value, tuple):
                setattr(self, name, list(value))
        if isinstance(self.ranges, Mapping) and not isinstance(self.ranges, dict):
            self.ranges = dict(self.ranges)
        if isinstance(self.ranges, dict):
            self.ranges = {
                column: ([_as_float(b) for b in bounds] if isinstance(bounds, list | tuple) else bounds)
                for column, bounds in self.ranges.items()
            }
        if isinstance(self.metadata, Mapping) and not isinstance(self.metadata, dict):
            self.metadata = dict(self.metadata)
        if isinstance(self.metadata, dict):
            # An empty value list is no condition (as an empty ``labels`` list is), not "keep nothing".
            self.metadata = {
                key: ([_metadata_text(v) for v in values] if isinstance(values, list | tuple) else values)
                for key, values in self.metadata.items()
                if not (isinstance(values, list | tuple) and not values)
            }
        if isinstance(self.region, tuple):
            self.region = list(self.region)
        if isinstance(self.region, list):
            self.region = [
                [_as_float(c) for c in point] if isinstance(point, list | tuple) else point for point in self.region
            ]

    def validate(self) -> FilterSpec:
        """Check every field's type and allowed values.

        Raises
        ------
        FilterError
            Naming the field, what it got and what was expected. Total over any Python/JSON value: no other
            exception escapes, whatever the fields hold.
        """
        if not isinstance(self.ranges, dict):
            raise FilterError(f"'ranges' must be an object {{column: [low, high]}}, got {_shown(self.ranges)}")
        for column, bounds in self.ranges.items():
            if not isinstance(column, str) or not column:
                raise FilterError(f"'ranges': keys must be column names (non-empty text), got {column!r}")
            if not isinstance(bounds, list) or len(bounds) != 2:
                raise FilterError(f"'ranges': range for '{column}' must be [low, high], got {_shown(bounds)}")
            for bound in bounds:
                if bound is not None and not (_is_float(bound) and not math.isnan(bound)):
                    raise FilterError(
                        f"'ranges': range for '{column}': bounds must be numbers or null, got {_shown(bound)}"
                    )
            low, high = bounds
            if low is not None and high is not None and low > high:
                raise FilterError(f"'ranges': range for '{column}': low {low:g} is above high {high:g}")
        for name in _STRING_LIST_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise FilterError(f"'{name}' must be a list of strings, got {_shown(value)}")
        if not isinstance(self.review, list) or not all(isinstance(v, str) for v in self.review):
            raise FilterError(f"'review' must be a list of review states {REVIEW_STATES}, got {_shown(self.review)}")
        unknown = [state for state in self.review if state not in REVIEW_STATES]
        if unknown:
            raise FilterError(f"'review': states {unknown} are not among {REVIEW_STATES}")
        for name, choices in (("correctness", CORRECTNESS), ("issue_mode", ISSUE_MODES)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise FilterError(f"{name} must be one of {choices}, got {_shown(value)}")
        if not isinstance(self.metadata, dict):
            raise FilterError(f"'metadata' must be an object {{name: [values]}}, got {_shown(self.metadata)}")
        for key, values in self.metadata.items():
            if not isinstance(key, str) or not key:
                raise FilterError(f"'metadata': keys must be metadata names (non-empty text), got {key!r}")
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise FilterError(
                    f"'metadata': values for '{key}' must be a list of strings or numbers, got {_shown(values)}"
                )
        for name in ("prediction_set", "sort_by"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise FilterError(f"'{name}' must be a name (non-empty text) or null, got {_shown(value)}")
        if self.slice is not None and (not isinstance(self.slice, str) or not self.slice.strip()):
            raise FilterError(f"'slice' must be a slice id (text) or null, got {_shown(self.slice)}")
        if not isinstance(self.text, str):
            raise FilterError(f"'text' must be a string, got {_shown(self.text)}")
        if not isinstance(self.descending, bool):
            raise FilterError(f"'descending' must be true or false, got {_shown(self.descending)}")
        if not isinstance(self.region, list):
            raise FilterError(f"'region' must be a list of [x, y] points, got {_shown(self.region)}")
        if self.region:
            if len(self.region) < 3:
                raise FilterError(f"'region' must be a polygon of at least 3 [x, y] points, got {len(self.region)}")
            for point in self.region:
                if (
                    not isinstance(point, list)
                    or len(point) != 2
                    or not all(_is_float(c) and math.isfinite(c) for c in point)
                ):
                    raise FilterError(f"'region': every point must be [x, y] with finite numbers, got {_shown(point)}")
        return self

    def to_dict(self) -> dict:
        """JSON-serialisable dict holding only the fields that differ from the defaults."""
        default = FilterSpec()
        return {key: value for key, value in asdict(self).items() if value != getattr(default, key)}

    @classmethod
    def from_dict(cls, payload: Mapping) -> FilterSpec:
        """Inverse of :meth:`to_dict`.

        Column names of ``ranges`` and ``sort_by`` written before a sample-table column was renamed (a saved
        filter in a curation database, an old link) are read under their current names
        (:data:`robustlens.query.sample_table.COLUMN_ALIASES`, e.g. ``rob_fragility`` → ``rob.fragility``).

        Raises
        ------
        FilterError
            ``payload`` is not a mapping, has unknown keys, or a field of the wrong type or value (the message
            names the field and what was expected; see :meth:`validate`).
        """
        if not isinstance(payload, Mapping):
            raise FilterError(f"a filter must be a JSON object, got {type(payload).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted((key for key in payload if key not in names), key=repr)
        if unknown:
            raise FilterError(f"unknown filter field(s) {[_shown(k) for k in unknown]}; fields: {sorted(names)}")
        values = dict(payload)
        if isinstance(values.get("ranges"), Mapping):
            values["ranges"] = {
                current_column_name(c) if isinstance(c, str) else c: bounds for c, bounds in values["ranges"].items()
            }
        if isinstance(values.get("sort_by"), str):
            values["sort_by"] = current_column_name(values["sort_by"])
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FilterSpec:
        """A spec from JSON text (``robustlens export --filter``); :class:`FilterError` when it is not one."""
        if not isinstance(text, str | bytes | bytearray):
            raise FilterError(f"a filter must be JSON text, got {type(text).__name__}")
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FilterError(f"filter is not valid JSON: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise FilterError(f"filter is not UTF-8 text: {exc}") from exc
        except RecursionError as exc:
            raise FilterError("filter JSON is nested too deeply") from exc
        return cls.from_dict(payload)

    def replace(self, **changes: Any) -> FilterSpec:
        """A copy with ``changes`` applied (validated)."""
        return replace(self, **changes)

    def is_empty(self) -> bool:
        """True when the spec keeps every sample (the sort does not count)."""
        return not {k for k in self.to_dict() if k not in ("sort_by", "descending", "prediction_set")}

    def describe(self) -> list[str]:
        """One short human-readable line per condition, for the UI and export logs."""
        lines = []
        for column, (low, high) in self.ranges.items():
            shown_low = "-∞" if low is None else f"{low:g}"
            shown_high = "∞" if high is None else f"{high:g}"
            lines.append(f"{column} in [{shown_low}, {shown_high}]")
        for name, label in (
            ("labels", "label"),
            ("splits", "split"),
            ("predicted", "predicted"),
            ("tags", "tag"),
            ("collections", "collection"),
            ("review", "review"),
        ):
            if getattr(self, name):
                lines.append(f"{label} ∈ {{{', '.join(getattr(self, name))}}}")
        if self.correctness != "any":
            lines.append(f"prediction {self.correctness}")
        for key, values in self.metadata.items():
            lines.append(f"{key} ∈ {{{', '.join(values)}}}")
        if self.issues:
            lines.append(f"{self.issue_mode} of issues {{{', '.join(self.issues)}}}")
        if self.text:
            lines.append(f"id/path contains '{self.text}'")
        if self.ids:
            lines.append(f"{len(self.ids):,} selected sample(s)")
        if self.region:
            lines.append(f"map region ({len(self.region)}-point polygon)")
        if self.slice:
            lines.append(f"in slice {self.slice}")
        return lines


# -- evaluation -----------------------------------------------------------------------------------
def apply_filter(
    table: pd.DataFrame,
    spec: FilterSpec,
    curation: CurationReader | None = None,
    *,
    slices: SliceMembership | None = None,
    _depth: int = 0,
) -> np.ndarray:
    """Boolean mask (``len(table)``) of the rows ``spec`` keeps.

    Parameters
    ----------
    table:
        The sample table (:func:`~robustlens.query.sample_table.load_sample_table`).
    spec:
        The filter.
    curation:
        Needed when the spec uses tags, collections or review states.
    slices:
        The workspace's slice membership (:func:`~robustlens.query.slices.load_slice_membership`); needed when
        the spec (or a saved filter it refers to) has a ``slice``.

    Raises
    ------
    FilterError
        A column, prediction set, slice or collection the spec names does not exist, or curation / slice
        membership is needed and missing.
    """
    mask = np.ones(len(table), dtype=bool)
    for column, (low, high) in spec.ranges.items():
        values = _numeric(table, column)
        with np.errstate(invalid="ignore"):
            if low is not None:
                mask &= values >= low
            if high is not None:
                mask &= values <= high
    if spec.labels:
        mask &= _isin(table, "label", spec.labels)
    if spec.splits:
        mask &= _isin(table, "split", spec.splits)
    if spec.predicted or spec.correctness != "any":
        prefix = f"pred.{resolve_prediction_set(table, spec.prediction_set)}."
        if spec.predicted:
            mask &= _isin(table, prefix + "label", spec.predicted)
        if spec.correctness != "any":
            correct = table[prefix + "correct"].to_numpy(dtype=bool)
            mask &= correct if spec.correctness == "correct" else ~correct
    for key, wanted in spec.metadata.items():
        mask &= _metadata_mask(table, key, wanted)
    if spec.issues:
        mask &= _issue_mask(table, spec.issues, spec.issue_mode)
    if spec.text:
        mask &= _text_mask(table, spec.text)
    if spec.ids:
        mask &= table["id"].isin(spec.ids).to_numpy()
    if spec.region:
        mask &= region_mask(table, spec.region)
    if spec.slice:
        mask &= slice_mask(table, spec.slice, slices)
    if spec.tags or spec.collections or spec.review:
        if curation is None:
            raise FilterError("this filter uses tags, collections or review states: it needs the curation database")
        if spec.tags:
            tagged = set().union(*(curation.samples_with_tag(tag) for tag in spec.tags))
            mask &= table["id"].isin(tagged).to_numpy()
        if spec.collections:
            mask &= _collections_mask(table, spec.collections, curation, _depth, slices)
        if spec.review:
            mask &= _review_mask(table, spec.review, curation)
    return mask


def filter_positions(
    table: pd.DataFrame,
    spec: FilterSpec,
    curation: CurationReader | None = None,
    *,
    mask: np.ndarray | None = None,
    slices: SliceMembership | None = None,
) -> np.ndarray:
    """Row positions kept by ``spec``, in its sort order (table order when unsorted); arguments as
    :func:`apply_filter` (``mask``: its result, when already computed)."""
    if mask is None:
        mask = apply_filter(table, spec, curation, slices=slices)
    positions = np.flatnonzero(mask)
    if spec.sort_by is None or positions.size == 0:
        return positions
    if spec.sort_by not in table.columns:
        raise FilterError(f"cannot sort by '{spec.sort_by}': no such column")
    values = table[spec.sort_by].iloc[positions]
    if isinstance(values.dtype, pd.CategoricalDtype):
        values = values.cat.codes.where(values.notna(), other=np.nan)
    order = (
        pd.Series(values.to_numpy())
        .sort_values(ascending=not spec.descending, na_position="last", kind="stable")
        .index.to_numpy()
    )
    return positions[order]


def filter_ids(
    table: pd.DataFrame,
    spec: FilterSpec,
    curation: CurationReader | None = None,
    *,
    slices: SliceMembership | None = None,
) -> list[str]:
    """Ids kept by ``spec``, in its order."""
    return table["id"].iloc[filter_positions(table, spec, curation, slices=slices)].tolist()


def resolve_prediction_set(table: pd.DataFrame, name: str | None) -> str:
    """``name``, or the table's first prediction set; :class:`FilterError` if there is none / no such set."""
    available = prediction_sets(table)
    if name is None:
        if not available:
            raise FilterError("this filter uses predictions, but the workspace has no prediction set")
        return available[0]
    if name not in available:
        raise FilterError(f"no prediction set '{name}' (have: {available})")
    return name


def region_mask(table: pd.DataFrame, polygon: Sequence[Sequence[float]]) -> np.ndarray:
    """Rows whose map point (``map.x``, ``map.y``) lies inside ``polygon`` (even-odd rule)."""
    for column in ("map.x", "map.y"):
        if column not in table.columns:
            raise FilterError("a map-region filter needs the embedding map: run `robustlens analyze`")
    x = table["map.x"].to_numpy(dtype=float)
    y = table["map.y"].to_numpy(dtype=float)
    vertices = np.asarray(polygon, dtype=float)
    inside = np.zeros(len(table), dtype=bool)
    box = (
        (x >= vertices[:, 0].min())
        & (x <= vertices[:, 0].max())
        & (y >= vertices[:, 1].min())
        & (y <= vertices[:, 1].max())
    )
    candidates = np.flatnonzero(box)
    px, py = x[candidates], y[candidates]
    hit = np.zeros(candidates.size, dtype=bool)
    x1, y1 = vertices[:, 0], vertices[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for ax, ay, bx, by in zip(x1, y1, x2, y2, strict=True):
        crosses = (ay > py) != (by > py)
        if not crosses.any():
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            at = ax + (py - ay) * (bx - ax) / (by - ay)
        hit ^= crosses & (px < at)
    inside[candidates] = hit
    return inside


def slice_mask(table: pd.DataFrame, slice_id: str, slices: SliceMembership | None) -> np.ndarray:
    """Rows of ``table`` in slice ``slice_id`` (a ``slice_id`` of ``slices.parquet``).

    The slices stage's own membership (:meth:`~robustlens.query.slices.SliceMembership.mask`: the AND of the
    slice's bit-packed predicate rows) — the samples its ``size`` counted, nothing re-derived.

    Raises
    ------
    FilterError
        ``slices`` is ``None``, the slice is unknown, or the membership does not fit ``table``.
    """
    if slices is None:
        raise FilterError(
            "a slice filter needs the slice membership of the sample table of a workspace: pass "
            "slices=load_slice_membership(workspace) (robustlens.query.slices)"
        )
    try:
        mask = slices.mask(slice_id)
    except SliceError as exc:
        raise FilterError(exc.detail) from exc
    if len(mask) != len(table):
        raise FilterError(
            f"slice '{slice_id}' covers {len(mask):,} samples, the table has {len(table):,}: "
            "the slices are stale, run `robustlens analyze` again"
        )
    return mask


def check_spec(table: pd.DataFrame, spec: FilterSpec, *, slices: SliceMembership | None = None) -> list[str]:
    """Problems that would make ``spec`` fail or match nothing on ``table`` (unknown columns, labels…)."""
    problems = []
    columns = set(table.columns)
    for column in spec.ranges:
        if column not in columns:
            problems.append(f"no column '{column}'")
    for key in spec.metadata:
        if f"meta.{key}" not in columns:
            problems.append(f"no metadata column '{key}'")
    issue_columns = {c.removeprefix("issue.") for c in columns if c.startswith("issue.")}
    missing = [i for i in spec.issues if i not in issue_columns]
    if missing:
        problems.append(f"issue type(s) {missing} not in this workspace (have: {sorted(issue_columns)})")
    if spec.sort_by is not None and spec.sort_by not in columns:
        problems.append(f"no column '{spec.sort_by}' to sort by")
    if spec.region and "map.x" not in columns:
        problems.append("no embedding map for the region filter")
    if spec.slice:
        try:
            slice_mask(table, spec.slice, slices)
        except FilterError as exc:
            problems.append(str(exc))
    if spec.predicted or spec.correctness != "any" or spec.prediction_set:
        try:
            resolve_prediction_set(table, spec.prediction_set)
        except FilterError as exc:
            problems.append(str(exc))
    return problems


def prune_spec(
    table: pd.DataFrame, spec: FilterSpec, *, slices: SliceMembership | None = None
) -> tuple[FilterSpec, list[str]]:
    """Drop the parts of ``spec`` that do not apply to ``table`` (e.g. from an old link); returns them too."""
    problems = check_spec(table, spec, slices=slices)
    if not problems:
        return spec, []
    columns = set(table.columns)
    issue_columns = {c.removeprefix("issue.") for c in columns if c.startswith("issue.")}
    slice_ok = True
    if spec.slice:
        try:
            slice_mask(table, spec.slice, slices)
        except FilterError:
            slice_ok = False
    try:
        prediction_set = resolve_prediction_set(table, spec.prediction_set)
        predictions_ok = True
    except FilterError:
        prediction_set, predictions_ok = None, False
    pruned = spec.replace(
        ranges={c: b for c, b in spec.ranges.items() if c in columns},
        metadata={k: v for k, v in spec.metadata.items() if f"meta.{k}" in columns},
        issues=[i for i in spec.issues if i in issue_columns],
        sort_by=spec.sort_by if spec.sort_by in columns else None,
        region=spec.region if "map.x" in columns else [],
        slice=spec.slice if slice_ok else None,
        prediction_set=prediction_set if spec.prediction_set else None,
        predicted=spec.predicted if predictions_ok else [],
        correctness=spec.correctness if predictions_ok else "any",
    )
    return pruned, problems


# -- URL state ------------------------------------------------------------------------------------
#: Query-string keys of a filter; ``r.<column>`` (range) and ``m.<name>`` (metadata) are families.
LIST_KEYS = {
    "label": "labels",
    "split": "splits",
    "pred": "predicted",
    "issue": "issues",
    "tag": "tags",
    "coll": "collections",
    "review": "review",
    "id": "ids",
}
SCALAR_KEYS = ("pset", "correct", "issue_mode", "q", "region", "slice", "sort", "desc")
RANGE_PREFIX, META_PREFIX = "r.", "m."


def is_filter_key(key: str) -> bool:
    """Whether a query-string key belongs to the filter (other keys are page state)."""
    return key in LIST_KEYS or key in SCALAR_KEYS or key.startswith((RANGE_PREFIX, META_PREFIX))


def to_query_params(spec: FilterSpec) -> dict[str, str | list[str]]:
    """The spec as query-string parameters (lists become repeated keys); empty spec → ``{}``.

    ``label=coat&label=shirt&r.metric.brightness=0.1:0.5&issue=dark&sort=metric.brightness&desc=1``
    """
    params: dict[str, str | list[str]] = {}
    for key, name in LIST_KEYS.items():
        if getattr(spec, name):
            params[key] = list(getattr(spec, name))
    for column, (low, high) in spec.ranges.items():
        params[RANGE_PREFIX + column] = (
            f"{'' if low is None else repr(float(low))}:{'' if high is None else repr(float(high))}"
        )
    for key, values in spec.metadata.items():
        params[META_PREFIX + key] = list(values)
    if spec.prediction_set:
        params["pset"] = spec.prediction_set
    if spec.correctness != "any":
        params["correct"] = "1" if spec.correctness == "correct" else "0"
    if spec.issue_mode != "any":
        params["issue_mode"] = spec.issue_mode
    if spec.text:
        params["q"] = spec.text
    if spec.region:
        params["region"] = ";".join(f"{repr(float(x))},{repr(float(y))}" for x, y in spec.region)
    if spec.slice:
        params["slice"] = spec.slice
    if spec.sort_by:
        params["sort"] = spec.sort_by
        if spec.descending:
            params["desc"] = "1"
    return params


def from_query_params(params: Mapping[str, str | Sequence[str]]) -> FilterSpec:
    """Inverse of :func:`to_query_params`; keys that are not filter keys are ignored.

    Values may be strings or lists of strings (repeated keys). Malformed values raise :class:`FilterError`.
    """
    values: dict = {}
    if not isinstance(params, Mapping):
        raise FilterError(f"query parameters must be a mapping, got {type(params).__name__}")
    for key, raw in params.items():
        if not isinstance(key, str):
            raise FilterError(f"query parameter names must be text, got {_shown(key)}")
        if isinstance(raw, str):
            items = [raw]
        elif isinstance(raw, list | tuple) and all(isinstance(v, str) for v in raw):
            items = list(raw)
        else:
            raise FilterError(f"query parameter {key!r}: expected text or a list of texts, got {_shown(raw)}")
        if not items:
            continue
        last = items[-1]
        if key in LIST_KEYS:
            values[LIST_KEYS[key]] = items
        elif key.startswith(RANGE_PREFIX):
            values.setdefault("ranges", {})[key.removeprefix(RANGE_PREFIX)] = _parse_range(key, last)
        elif key.startswith(META_PREFIX):
            values.setdefault("metadata", {})[key.removeprefix(META_PREFIX)] = items
        elif key == "pset":
            values["prediction_set"] = last
        elif key == "correct":
            if last not in ("0", "1"):
                raise FilterError(f"query parameter correct={last!r}: expected 1 (correct) or 0 (incorrect)")
            values["correctness"] = "correct" if last == "1" else "incorrect"
        elif key == "issue_mode":
            values["issue_mode"] = last
        elif key == "q":
            values["text"] = last
        elif key == "region":
            values["region"] = _parse_region(last)
        elif key == "slice":
            values["slice"] = last
        elif key == "sort":
            values["sort_by"] = last
        elif key == "desc":
            values["descending"] = last in ("1", "true", "yes")
    return FilterSpec.from_dict(values)


# -- helpers ------------------------------------------------------------------------------------------
_STRING_LIST_FIELDS = ("labels", "splits", "predicted", "issues", "tags", "collections", "ids")


def _is_number(value: object) -> TypeGuard[numbers.Real]:
    """A real number that is not a boolean (JSON ``true`` is not a bound)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _is_float(value: object) -> TypeGuard[numbers.Real]:
    """A number that converts to a ``float`` (not a boolean, not an integer beyond the float range)."""
    if not _is_number(value):
        return False
    try:
        float(value)
    except (OverflowError, ValueError, TypeError):
        return False
    return True


def _as_float(value: object) -> Any:
    """``value`` as a ``float`` when it is a number a float holds; anything else unchanged (for validate)."""
    if _is_number(value) and not isinstance(value, float):
        try:
            return float(value)
        except (OverflowError, ValueError, TypeError):
            return value
    return value


def _metadata_text(value: object) -> Any:
    """Metadata values compare as text: numbers and booleans become their text, anything else is left for
    :meth:`FilterSpec.validate` to refuse."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        try:
            return str(int(value))
        except ValueError:  # beyond Python's int-to-text digit limit
            return value
    if _is_float(value) and math.isfinite(value):
        return str(value)
    return value


def _shown(value: object, limit: int = 80) -> str:
    """A short description of a bad value for an error message: its repr (cut) and type."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - an exotic object's repr must not hide the real error
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[:limit] + "…"
    return f"{text} ({type(value).__name__})"


def _numeric(table: pd.DataFrame, column: str) -> np.ndarray:
    if column not in table.columns:
        raise FilterError(f"no column '{column}' to filter on (is its analysis stage run?)")
    series = table[column]
    if isinstance(series.dtype, pd.CategoricalDtype) or not (
        pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)
    ):
        raise FilterError(f"column '{column}' is not numeric; a range filter needs numbers")
    return series.to_numpy(dtype=float, na_value=np.nan)


def _isin(table: pd.DataFrame, column: str, values: Iterable[str]) -> np.ndarray:
    if column not in table.columns:
        raise FilterError(f"no column '{column}' to filter on")
    return table[column].isin(list(values)).to_numpy(dtype=bool)


def _metadata_mask(table: pd.DataFrame, key: str, values: list[str]) -> np.ndarray:
    column = f"meta.{key}"
    if column not in table.columns:
        raise FilterError(f"no metadata column '{key}'")
    series = table[column]
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        numbers = pd.to_numeric(pd.Series(values), errors="coerce").dropna().tolist()
        return series.isin(numbers).to_numpy(dtype=bool)
    return series.astype("string").isin(values).fillna(False).to_numpy(dtype=bool)


def _issue_mask(table: pd.DataFrame, issues: list[str], mode: str) -> np.ndarray:
    flagged = []
    for issue in issues:
        column = f"issue.{issue}"
        if column not in table.columns:
            raise FilterError(f"no issue type '{issue}' in this workspace (run `robustlens analyze`)")
        flagged.append(table[column].to_numpy(dtype=float, na_value=0.0) > 0)
    stack = np.vstack(flagged)
    return np.asarray(stack.any(axis=0) if mode == "any" else stack.all(axis=0))


def _text_mask(table: pd.DataFrame, text: str) -> np.ndarray:
    needle = text.strip()
    mask = np.zeros(len(table), dtype=bool)
    for column in ("id", "path"):
        if column in table.columns:
            found = table[column].astype("string").str.contains(needle, case=False, regex=False)
            mask |= found.fillna(False).to_numpy(dtype=bool)
    return mask


def _collections_mask(
    table: pd.DataFrame, names: list[str], curation: CurationReader, depth: int, slices: SliceMembership | None
) -> np.ndarray:
    if depth >= MAX_COLLECTION_DEPTH:
        raise FilterError(
            f"saved filters refer to each other more than {MAX_COLLECTION_DEPTH} levels deep "
            "(a collection that includes itself?)"
        )
    mask = np.zeros(len(table), dtype=bool)
    for name in names:
        entry = curation.collection(name)
        if entry is None:
            raise FilterError(f"no collection named '{name}'")
        if entry.get("members"):
            mask |= table["id"].isin(entry["members"]).to_numpy()
        if entry.get("filter") is not None:
            mask |= apply_filter(
                table, FilterSpec.from_dict(entry["filter"]), curation, slices=slices, _depth=depth + 1
            )
    return mask


def _review_mask(table: pd.DataFrame, states: list[str], curation: CurationReader) -> np.ndarray:
    latest = {row["sample_id"]: row["action"] for row in curation.decisions(latest_only=True)}
    actions = table["id"].map(latest)
    mask = np.zeros(len(table), dtype=bool)
    for state in states:
        if state == "unreviewed":
            mask |= actions.isna().to_numpy()
        elif state == "reviewed":
            mask |= actions.notna().to_numpy()
        else:
            mask |= (actions == state).fillna(False).to_numpy(dtype=bool)
    return mask


def _parse_range(key: str, text: str) -> list[float | None]:
    low, sep, high = text.partition(":")
    if not sep:
        raise FilterError(f"query parameter {key}={text!r}: expected LOW:HIGH (either side may be empty)")
    try:
        return [float(low) if low.strip() else None, float(high) if high.strip() else None]
    except ValueError as exc:
        raise FilterError(f"query parameter {key}={text!r}: bounds must be numbers") from exc


def _parse_region(text: str) -> list[list[float]]:
    try:
        return [[float(x), float(y)] for x, y in (point.split(",") for point in text.split(";") if point)]
    except ValueError as exc:
        raise FilterError(f"query parameter region={text!r}: expected x,y;x,y;… numbers") from exc
