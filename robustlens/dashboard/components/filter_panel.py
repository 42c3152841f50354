"""The sidebar filter: widgets seeded from the session's filter (or a shared link), read back into a
:class:`~robustlens.query.filters.FilterSpec`, with chips for the parts that have no widget (slice, map
region, chosen samples). The filter itself is evaluated by :mod:`robustlens.query.filters` only."""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from robustlens.dashboard import data, state
from robustlens.dashboard.components.frame import hold_widget_value, show_notices
from robustlens.dashboard.components.markup import text
from robustlens.query.filters import REVIEW_STATES, FilterError, FilterSpec
from robustlens.query.sample_table import display_name, issue_types, prediction_sets

W = "flt."  # key prefix of the filter widgets
NO_SORT = ""


def filter_panel(table: pd.DataFrame) -> FilterSpec:
    """Render the sidebar filter (seeded from the session / URL) and return the current spec."""
    state.adopt_url_filter(table)
    show_notices()
    spec = state.current_filter()
    _seed_widgets(table, spec, force=state.take_reseed())
    sidebar = st.sidebar
    sidebar.subheader("Filter")
    classes = list(table["label"].cat.categories)
    categories = data.category_values()
    bounds = data.column_bounds()
    store = data.curation()
    sidebar.text_input("Search id or path", key=W + "text", placeholder="part of a file name")
    sidebar.multiselect("Label", classes, key=W + "labels", placeholder="any label")
    if len(categories.get("split", [])) > 1:
        sidebar.multiselect("Split", categories["split"], key=W + "splits", placeholder="any split")
    sets = prediction_sets(table)
    if sets:
        if len(sets) > 1:
            sidebar.selectbox("Prediction set", sets, key=W + "pset")
        sidebar.multiselect("Predicted label", classes, key=W + "predicted", placeholder="any prediction")
        sidebar.radio("Prediction", ["any", "correct", "incorrect"], key=W + "correct", horizontal=True)
    issues = issue_types(table)
    if issues:
        sidebar.multiselect(
            "Issues", issues, key=W + "issues", placeholder="any or no issue", format_func=lambda i: i.replace("_", " ")
        )
        sidebar.radio(
            "Flagged with",
            ["any", "all"],
            key=W + "issue_mode",
            horizontal=True,
            format_func=lambda m: f"{m} of these issues",
        )
    tags = list(store.tag_counts())
    if tags:
        _keep_valid(W + "tags", tags)
        sidebar.multiselect("Tags", tags, key=W + "tags", placeholder="any tag")
    collections = store.collection_names()
    if collections:
        _keep_valid(W + "collections", collections)
        sidebar.multiselect("Collections", collections, key=W + "collections", placeholder="any collection")
    sidebar.multiselect("Review status", list(REVIEW_STATES), key=W + "review", placeholder="any status")
    meta = [c for c in categories if c.startswith("meta.")]
    if meta:
        with sidebar.expander("Metadata"):
            for column in meta:
                st.multiselect(text(display_name(column)), categories[column], key=W + column)
    with sidebar.expander("Metric ranges", expanded=bool(st.session_state.get(W + "range_cols"))):
        st.multiselect(
            "Add a range on",
            list(bounds),
            key=W + "range_cols",
            format_func=display_name,
            placeholder="choose metrics or scores",
        )
        for column in st.session_state.get(W + "range_cols", []):
            low, high, integer = bounds[column]
            key = W + "range." + column
            hold_widget_value(key, st.session_state.get(key, (_bound(low, integer), _bound(high, integer))))
            st.slider(
                text(display_name(column)),
                min_value=_bound(low, integer),
                max_value=_bound(high, integer),
                key=W + "range." + column,
                step=1 if integer else _step(low, high),
            )
    sort_options = [NO_SORT, *bounds, "label"]
    sidebar.selectbox(
        "Sort by",
        sort_options,
        key=W + "sort",
        format_func=lambda c: "(dataset order)" if c == NO_SORT else display_name(c),
    )
    sidebar.toggle("Descending", key=W + "desc")
    _selection_chips(table, spec)
    sidebar.button("Clear all filters", on_click=_clear_filter, icon=":material/filter_alt_off:")
    new = _spec_from_widgets(table, spec, bounds)
    state.set_filter(new, reseed=False)
    return new


def _keep_valid(key: str, options: list[str]) -> None:
    """Drop chosen values that are no longer options (a tag or collection another reviewer deleted)."""
    chosen = st.session_state.get(key)
    if chosen and any(value not in options for value in chosen):
        st.session_state[key] = [value for value in chosen if value in options]


def _bound(value: float, integer: bool):
    return int(round(value)) if integer else float(value)


def _step(low: float, high: float) -> float:
    span = high - low
    return float(10 ** math.floor(math.log10(span / 100))) if span > 0 else 0.01


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def _seed_widgets(table: pd.DataFrame, spec: FilterSpec, *, force: bool) -> None:
    """Put ``spec`` into the widgets that are missing (or all of them when ``force``); restate the others.

    Every filter widget's value is set on every run (:func:`hold_widget_value`), so the browser shows the
    session's filter even when it first draws a widget after a later run than the one that seeded it.
    """
    classes = set(table["label"].cat.categories)
    sets = prediction_sets(table)
    bounds = data.column_bounds()
    categories = data.category_values()
    issues = set(issue_types(table))
    store = data.curation()
    values: dict[str, object] = {
        "text": spec.text,
        "labels": [v for v in spec.labels if v in classes],
        "splits": [v for v in spec.splits if v in set(categories.get("split", []))],
        "pset": spec.prediction_set if spec.prediction_set in sets else (sets[0] if sets else None),
        "predicted": [v for v in spec.predicted if v in classes],
        "correct": spec.correctness,
        "issues": [v for v in spec.issues if v in issues],
        "issue_mode": spec.issue_mode,
        "tags": [v for v in spec.tags if v in set(store.tag_counts())],
        "collections": [v for v in spec.collections if v in set(store.collection_names())],
        "review": list(spec.review),
        "range_cols": [c for c in spec.ranges if c in bounds],
        "sort": spec.sort_by if spec.sort_by in bounds or spec.sort_by == "label" else NO_SORT,
        "desc": spec.descending,
    }
    for column in categories:
        if column.startswith("meta."):
            allowed = set(categories[column])
            values[column] = [v for v in spec.metadata.get(column.removeprefix("meta."), []) if v in allowed]
    for column in [c for c in spec.ranges if c in bounds]:
        low, high, integer = bounds[column]
        chosen_low, chosen_high = spec.ranges[column]
        values["range." + column] = (
            _bound(low if chosen_low is None else min(max(chosen_low, low), high), integer),
            _bound(high if chosen_high is None else max(min(chosen_high, high), low), integer),
        )
    if force:
        for key in [k for k in st.session_state if str(k).startswith(W + "range.")]:
            del st.session_state[key]
    for name, value in values.items():
        key = W + name
        # Seeded from the spec when missing or asked; otherwise the widget keeps what the user chose.
        hold_widget_value(key, value if force or key not in st.session_state else st.session_state[key])


def _spec_from_widgets(table: pd.DataFrame, previous: FilterSpec, bounds: dict) -> FilterSpec:
    get = st.session_state.get
    sets = prediction_sets(table)
    ranges = {}
    for column in get(W + "range_cols", []) or []:
        low, high, _ = bounds[column]
        chosen = get(W + "range." + column)
        if chosen is None:
            continue
        chosen_low = None if chosen[0] <= low else _round(chosen[0])
        chosen_high = None if chosen[1] >= high else _round(chosen[1])
        if chosen_low is not None or chosen_high is not None:
            ranges[column] = [chosen_low, chosen_high]
    metadata = {
        column.removeprefix("meta."): list(get(W + column) or [])
        for column in data.category_values()
        if column.startswith("meta.") and get(W + column)
    }
    pset = get(W + "pset")
    try:
        return FilterSpec(
            ranges=ranges,
            labels=list(get(W + "labels") or []),
            splits=list(get(W + "splits") or []),
            prediction_set=pset if sets and pset in sets and pset != sets[0] else None,
            predicted=list(get(W + "predicted") or []) if sets else [],
            correctness=get(W + "correct") or "any" if sets else "any",
            metadata=metadata,
            issues=list(get(W + "issues") or []),
            issue_mode=get(W + "issue_mode") or "any",
            tags=list(get(W + "tags") or []),
            collections=list(get(W + "collections") or []),
            review=list(get(W + "review") or []),
            text=(get(W + "text") or "").strip(),
            ids=previous.ids,
            region=previous.region,
            slice=previous.slice,
            sort_by=get(W + "sort") or None,
            descending=bool(get(W + "desc")),
        )
    except FilterError as exc:
        st.sidebar.error(f"Filter not applied: {text(exc)}")
        return previous


def _selection_chips(table: pd.DataFrame, spec: FilterSpec) -> None:
    if spec.slice:
        st.sidebar.info(f"Slice: {text(data.slice_membership().description(spec.slice))}", icon=":material/pie_chart:")
        st.sidebar.button("Clear slice", on_click=_update_filter, kwargs={"slice": None}, key=W + "clear_slice")
    if spec.region:
        st.sidebar.info(f"Map region filter ({len(spec.region)}-point outline)", icon=":material/gesture:")
        st.sidebar.button("Clear map region", on_click=_update_filter, kwargs={"region": []}, key=W + "clear_region")
    if spec.ids:
        st.sidebar.info(f"Restricted to {len(spec.ids):,} chosen sample(s)", icon=":material/checklist:")
        st.sidebar.button("Clear chosen samples", on_click=_update_filter, kwargs={"ids": []}, key=W + "clear_ids")


def _update_filter(**changes) -> None:
    state.set_filter(state.current_filter().replace(**changes), reseed=False)


def _clear_filter() -> None:
    state.set_filter(FilterSpec(), reseed=True)
