"""Building blocks the pages share: page start, the sidebar filter, the thumbnail grid, bulk tag/collect
actions and the one-sample detail view. Reads go through :mod:`data`, writes through the curation store."""

from __future__ import annotations

import html
import logging
import math
import re
from collections.abc import Callable

import numpy as np
import pandas as pd
import streamlit as st

from robustlens.query.filters import REVIEW_STATES, FilterError, FilterSpec, to_query_params
from robustlens.query.sample_table import display_name, issue_types, prediction_sets
from robustlens.dashboard import data, routes, state
from robustlens.errors import RobustlensError

LOGGER = logging.getLogger("robustlens.dashboard")

W = "flt."  # key prefix of the filter widgets
NO_SORT = ""


# -- user strings as text -----------------------------------------------------------------------------------
# Streamlit renders markdown (GitHub-flavoured, plus its own ``:color[…]``, ``:material/…:`` and ``$…$``
# directives) in st.markdown, st.caption, st.title/subheader, alerts, widget labels, radio options, image
# captions, metric values and tooltips. A class name, tag, file name or URL parameter written there as is
# could draw an outside image or a fake link. Every user-controlled string goes through one of these.
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x0b\x0c\x85]+")
_MARKUP = re.compile(
    r"[\\`*~\[\]<>|$]"                          # code, emphasis, strikethrough, links/images, HTML, tables, maths
    r"|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])"       # emphasis: '_' at a word edge ('tshirt_top' stays as it is)
    r"|:(?=\S)"                                 # :material/icon:, :emoji:, :color[…], <scheme:…>
    r"|@"                                       # e-mail autolinks
    r"|&(?=#?[0-9A-Za-z]+;)"                    # entity references (&lt; is shown as typed, not as '<')
)
_LINE_START = re.compile(r"^(?:[#>+\-=]|\d+(?=[.)]))")  # headings, quotes, lists, rules: only at the start
# GitHub's autolink literals (http://…, www.…, name@host) are found in the text *after* escapes are
# resolved, so a backslash does not stop them: an invisible word joiner inside the trigger does.
_AUTOLINK_TRIGGER = re.compile(r"(?i:https?)(?=://)|(?<![0-9A-Za-z])(?i:www)(?=\.)|@")
WORD_JOINER = "\u2060"


def text(value: object) -> str:
    """``value`` as markdown that renders exactly as its characters: nothing in it becomes markup.

    A backslash goes before every character that could start markup where it stands (CommonMark shows an
    escaped punctuation character literally): code spans, emphasis, strikethrough, brackets (so no link
    or image), ``<`` and ``>`` (no raw HTML, no ``<autolink>``), tables, ``$`` maths, ``:`` before a
    non-space (no Streamlit ``:material/…:`` or ``:red[…]`` directives), entity references, and a block
    marker (``#``, ``>``, ``-``, ``1.`` …) at the start. GitHub's autolink literals ignore escapes, so an
    invisible word joiner (U+2060) goes into ``http://``, ``https://``, ``www.`` and after ``@``: the text
    looks the same but makes no link. Line breaks become spaces and leading blanks go, so a user string
    never opens a block of its own. Ordinary names keep their look in the source (``tshirt_top``, ``needs-relabel``,
    ``images/a.png``, ``sample(s)``). Use it for every user string placed in markdown: text, captions,
    alerts, titles, widget labels, radio options, image captions, metric values, tooltips.
    """
    body = _LINE_BREAKS.sub(" ", str(value)).lstrip()
    body = _AUTOLINK_TRIGGER.sub(lambda m: m.group(0) + WORD_JOINER, body)
    body = _MARKUP.sub(lambda m: "\\" + m.group(0), body)
    return _LINE_START.sub(lambda m: m.group(0) + "\\" if m.group(0).isdigit() else "\\" + m.group(0), body)


def code(value: object) -> str:
    """``value`` as an inline code span (monospace, shown literally): a backtick fence longer than any run of
    backticks inside it, padded with spaces, so nothing in ``value`` can close it. Line breaks become spaces."""
    body = _LINE_BREAKS.sub(" ", str(value))
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * (longest + 1)
    return f"{fence} {body} {fence}"


def plot_text(value: object) -> str:
    """``value`` for plotly (tick labels, legend entries, hover text, titles) and for HTML text: the characters
    plotly reads as markup (``<a href>``, ``<b>``, ``<br>`` …, ``&`` entities) are HTML-escaped, so it shows
    them as typed. Quotes are kept (they mean nothing outside a tag, and plotly would show ``&quot;``)."""
    return html.escape(str(value), quote=False)


# -- page frame ---------------------------------------------------------------------------------------------
def run_page(render: Callable[[], None]) -> None:
    """Run a page; an error the user can act on (bad artifact, unreadable file, bad filter) becomes a message.

    The traceback goes to the server log, not the browser. Streamlit's own control flow (rerun, page
    switch, stop) passes through untouched.
    """
    try:
        render()
    except (RobustlensError, FilterError, ValueError, OSError) as exc:
        LOGGER.exception("page failed")
        st.error(f"This page cannot be shown: {text(exc)}")
        st.caption("If an analysis artifact is damaged or from another version, run `robustlens analyze` again. "
                   "The full error is in the server log.")


def filtered_positions_or_stop(table: pd.DataFrame, spec: FilterSpec):
    """Row positions matching ``spec``; a filter that cannot be applied is explained, kept in the URL (so the
    user can fix it in the sidebar) and ends the page run."""
    try:
        return data.filtered_positions(table, spec)
    except FilterError as exc:
        st.error(f"This filter cannot be applied: {text(exc)}")
        state.publish(spec)
        st.stop()


def start_page(title: str, caption: str | None = None) -> None:
    """Sidebar name box, queued messages, title: the first call of every page."""
    _user_box()
    st.title(title)
    if caption:
        st.caption(caption)
    show_notices()


def show_notices() -> None:
    """Show (once) the messages queued by earlier actions, e.g. "Tagged 12 samples".

    A notice is plain text (it quotes tag names, sample ids, parts of a link): it is shown escaped, so a
    notice never carries markdown of its own.
    """
    for level, message in state.take_notices():
        getattr(st, level if level in ("warning", "success", "info", "error") else "warning")(text(message))


def _user_box() -> None:
    hold_widget_value(state.USER_INPUT, state.user() or "")
    st.sidebar.text_input("Your name", key=state.USER_INPUT, placeholder="who tags and reviews",
                          help="Tags, collections and review decisions are recorded under this name.",
                          on_change=lambda: state.set_user(st.session_state[state.USER_INPUT]))


def require_user() -> str | None:
    """The user's name, or ``None`` after telling them to enter it (writes need an author)."""
    name = state.user()
    if name is None:
        st.warning("Enter your name in the sidebar (**Your name**) first: every change is recorded under it.")
    return name


def analysis_missing(what: str) -> None:
    """The empty state of a page whose artifact is not there yet."""
    workspace = data.workspace_path()
    st.info(f"No {text(what)} yet. Run {code(f'robustlens analyze {workspace}')} to compute it, then reload this page.",
            icon=":material/info:")


def hold_widget_value(key: str, value: object) -> None:
    """Give the keyed widget ``key`` the value ``value``, and make this run send it to the browser.

    Call it before the widget is created, on every run, for a widget whose value the code owns (the filter
    widgets follow the session's filter, the name box the session's user). Streamlit sends a value set by
    code to the browser only in the run that set it; a browser that has not yet shown the widget from that
    run (its component is still loading, or the user acted first) then builds it from a later run with its
    *default* value. Server and browser disagree from then on, and the browser's empty value wins on the
    next interaction: the filter from a shared link was silently dropped that way. Setting the value again
    on every run sends it every time; the browser shows it whenever the widget appears. Restating an
    unchanged value does not disturb typing in a text box (a box being edited keeps its text).
    """
    st.session_state[key] = value


def done(message: str) -> None:
    """Confirm a write and rerun so every widget shows the new state."""
    state.notice(message, "success")
    st.rerun()


# -- the sidebar filter ----------------------------------------------------------------------------------
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
        sidebar.multiselect("Issues", issues, key=W + "issues", placeholder="any or no issue",
                            format_func=lambda i: i.replace("_", " "))
        sidebar.radio("Flagged with", ["any", "all"], key=W + "issue_mode", horizontal=True,
                      format_func=lambda m: f"{m} of these issues")
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
        st.multiselect("Add a range on", list(bounds), key=W + "range_cols", format_func=display_name,
                       placeholder="choose metrics or scores")
        for column in st.session_state.get(W + "range_cols", []):
            low, high, integer = bounds[column]
            key = W + "range." + column
            hold_widget_value(key, st.session_state.get(key, (_bound(low, integer), _bound(high, integer))))
            st.slider(text(display_name(column)), min_value=_bound(low, integer), max_value=_bound(high, integer),
                      key=W + "range." + column, step=1 if integer else _step(low, high))
    sort_options = [NO_SORT, *bounds, "label"]
    sidebar.selectbox("Sort by", sort_options, key=W + "sort",
                      format_func=lambda c: "(dataset order)" if c == NO_SORT else display_name(c))
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
    values = {
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
    for column in values["range_cols"]:
        low, high, integer = bounds[column]
        chosen_low, chosen_high = spec.ranges[column]
        values["range." + column] = (
            _bound(low if chosen_low is None else min(max(chosen_low, low), high), integer),
            _bound(high if chosen_high is None else max(min(chosen_high, high), low), integer))
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
    metadata = {column.removeprefix("meta."): list(get(W + column) or [])
                for column in data.category_values() if column.startswith("meta.") and get(W + column)}
    pset = get(W + "pset")
    try:
        return FilterSpec(
            ranges=ranges, labels=list(get(W + "labels") or []), splits=list(get(W + "splits") or []),
            prediction_set=pset if sets and pset in sets and pset != sets[0] else None,
            predicted=list(get(W + "predicted") or []) if sets else [],
            correctness=get(W + "correct") or "any" if sets else "any",
            metadata=metadata, issues=list(get(W + "issues") or []), issue_mode=get(W + "issue_mode") or "any",
            tags=list(get(W + "tags") or []), collections=list(get(W + "collections") or []),
            review=list(get(W + "review") or []), text=(get(W + "text") or "").strip(),
            ids=previous.ids, region=previous.region, slice=previous.slice,
            sort_by=get(W + "sort") or None, descending=bool(get(W + "desc")))
    except FilterError as exc:
        st.sidebar.error(f"Filter not applied: {text(exc)}")
        return previous


def _selection_chips(table: pd.DataFrame, spec: FilterSpec) -> None:
    if spec.slice:
        st.sidebar.info(f"Slice: {text(slice_description(spec.slice))}", icon=":material/pie_chart:")
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


def open_in_explorer(spec: FilterSpec) -> None:
    """Make ``spec`` the filter and go to the explorer (it appears in the URL there)."""
    state.set_filter(spec)
    st.switch_page(routes.page("explorer"), query_params=to_query_params(spec))


def explorer_link(label: str, spec: FilterSpec, *, icon: str = ":material/grid_view:") -> None:
    """A link to the explorer with ``spec`` in its URL (opens in a new tab with a middle click, too)."""
    st.page_link(routes.page("explorer"), label=label, icon=icon, query_params=to_query_params(spec))


# -- thumbnails -----------------------------------------------------------------------------------------------
def caption_for(row: pd.Series, table: pd.DataFrame, sort_by: str | None = None) -> str:
    """``label`` or ``label → predicted`` when the first prediction set disagrees; plus the sort value."""
    text = str(row["label"])
    sets = prediction_sets(table)
    if sets:
        predicted = row[f"pred.{sets[0]}.label"]
        if str(predicted) != text:
            text = f"{text} → {predicted}"
    if sort_by and sort_by != "label" and sort_by in row.index:
        value = row[sort_by]
        if isinstance(value, float | np.floating) and not np.isnan(value):
            text += f" · {value:.3g}"
        elif value is not None and not (isinstance(value, float) and np.isnan(value)):
            text += f" · {value}"
    return text


def thumbnail_grid(table: pd.DataFrame, positions: np.ndarray, *, columns: int, key: str, selectable: bool = True,
                   on_open: Callable[[str], None] | None = None,
                   caption: Callable[[pd.Series], str] | None = None) -> None:
    """Thumbnails of the rows at ``positions`` in ``columns`` columns, with select boxes and Details buttons."""
    if len(positions) == 0:
        return
    paths = data.thumbnails(positions)
    chosen = set(state.selection())
    rows = table.iloc[positions]
    for start in range(0, len(positions), columns):
        cells = st.columns(columns)
        for cell, (_, row), path in zip(cells, rows.iloc[start:start + columns].iterrows(),
                                        paths[start:start + columns], strict=False):
            sample_id = row["id"]
            label = text(caption(row) if caption else caption_for(row, table))
            with cell:
                if path is not None:
                    st.image(path, caption=label, width="stretch", output_format="JPEG")
                else:
                    st.caption(f"{label} (image unavailable)")
                if selectable:
                    box = f"{key}.sel.{sample_id}"
                    if box not in st.session_state:
                        st.session_state[box] = sample_id in chosen
                    st.checkbox("select", key=box, on_change=_toggle, args=(sample_id, box))
                if on_open is not None:
                    st.button("Details", key=f"{key}.open.{sample_id}", on_click=on_open, args=(sample_id,),
                              type="tertiary", help=f"Show everything about {text(sample_id)}")


def _toggle(sample_id: str, box: str) -> None:
    state.toggle_selected(sample_id, bool(st.session_state.get(box)))


def clear_selection() -> None:
    """Deselect everything (grid boxes included)."""
    state.set_selection([])
    for key in [k for k in st.session_state if ".sel." in str(k)]:
        del st.session_state[key]


def select_ids(ids: list[str]) -> None:
    """Add ``ids`` to the selection (their grid boxes follow)."""
    state.set_selection([*state.selection(), *ids])
    for key in [k for k in st.session_state if ".sel." in str(k)]:
        del st.session_state[key]


# -- bulk actions -------------------------------------------------------------------------------------------
def bulk_actions(table: pd.DataFrame, positions: np.ndarray, spec: FilterSpec, *, key: str) -> None:
    """Tag / untag / add to collection / new collection, for the grid selection or the whole filter result."""
    chosen = state.selection()
    options = (["selection"] if chosen else []) + ["filter"]
    labels = {"selection": f"selected samples ({len(chosen):,})",
              "filter": f"every match of the filter ({len(positions):,})"}
    if not chosen or state.selection_grew():
        st.session_state[f"{key}.scope"] = options[0]
    scope = st.radio("Apply to", options, format_func=labels.get, key=f"{key}.scope", horizontal=True)
    count = len(chosen) if scope == "selection" else len(positions)

    def ids() -> list[str]:  # only when a button asks: a million ids is not built on every rerun
        return chosen if scope == "selection" else table["id"].iloc[positions].tolist()

    store = data.curation()
    left, middle, right = st.columns(3)
    with left:
        tag = st.text_input("Tag", key=f"{key}.tag", placeholder="e.g. needs-relabel")
        add, remove = st.columns(2)
        if add.button("Add tag", key=f"{key}.add_tag", icon=":material/sell:", disabled=not count):
            _tag(ids(), tag, remove=False)
        if remove.button("Remove tag", key=f"{key}.remove_tag", disabled=not count):
            _tag(ids(), tag, remove=True)
    with middle:
        static = [c["name"] for c in store.collections_overview() if c["kind"] == "static"]
        target = st.selectbox("Collection", static, key=f"{key}.target", index=None,
                              placeholder="choose a static collection" if static else "no static collection yet")
        if st.button("Add to collection", key=f"{key}.add_coll", disabled=not (count and target)):
            user = require_user()
            if user:
                try:
                    added = store.add_to_collection(target, ids(), user=user)
                except RobustlensError as exc:  # refused input, a write conflict, the database unreachable
                    st.error(text(f"Not saved: {exc}"))
                else:
                    done(f"Added {added:,} sample(s) to '{target}'.")
    with right:
        new_collection_form(spec, ids=ids, count=count, scope=scope, key=f"{key}.new")


def _tag(ids: list[str], tag: str, *, remove: bool) -> None:
    user = require_user()
    if not user:
        return
    if not tag.strip():
        st.warning("Type a tag name first.")
        return
    store = data.curation()
    try:
        count = (store.remove_tag if remove else store.add_tag)(ids, tag.strip(), user=user)
    except RobustlensError as exc:  # refused name, a write conflict, the database unreachable: nothing changed
        st.error(text(f"Not saved: {exc}"))
        return
    if remove:
        done(f"Removed tag '{tag.strip()}' from {count:,} sample(s).")
        return
    done(f"Tagged {count:,} sample(s) '{tag.strip()}' ({len(ids) - count:,} already had it).")


def new_collection_form(spec: FilterSpec, *, ids: Callable[[], list[str]], count: int, scope: str, key: str) -> None:
    """Create a collection: the current filter saved (re-evaluates) or a static list of the chosen samples.

    ``ids`` is called only on submit; ``count`` is how many samples it will return.
    """
    with st.form(key, clear_on_submit=True, border=False):
        name = st.text_input("New collection", placeholder="name", key=f"{key}.name")
        description = st.text_input("Description", key=f"{key}.description", placeholder="what and why (optional)")
        kinds = ["static"] + (["saved"] if scope == "filter" else [])
        kind = st.radio("Kind", kinds, key=f"{key}.kind", horizontal=True,
                        format_func=lambda k: f"static list ({count:,})" if k == "static"
                        else "saved filter (re-evaluates)")
        submitted = st.form_submit_button("Create collection", icon=":material/add:")
    if submitted:
        create_collection(name, description, kind=kind, ids=ids, spec=spec)


def create_collection(name: str, description: str, *, kind: str, ids: Callable[[], list[str]],
                      spec: FilterSpec) -> None:
    """Create a saved-filter (``kind="saved"``) or static collection under the user's name, then rerun."""
    user = require_user()
    if not user:
        return
    if not name.strip():
        st.warning("Give the collection a name.")
        return
    store = data.curation()
    try:
        if kind == "saved":
            store.create_collection(name, user=user, description=description,
                                    filter_spec=spec.replace(sort_by=None, descending=False).to_dict())
        else:
            members = ids()
            store.create_collection(name, user=user, description=description, sample_ids=members)
    except (RobustlensError, ValueError) as exc:
        st.error(text(f"Not saved: {exc}"))
        return
    what = " (saved filter)." if kind == "saved" else f" with {len(members):,} samples."
    done(f"Created collection '{name.strip()}'{what}")


# -- tables ---------------------------------------------------------------------------------------------------
def slice_columns(frame: pd.DataFrame) -> list[str]:
    """The slice-table columns worth showing, in order."""
    return [c for c in ("rank", "description", "size", "accuracy", "error_rate", "gap", "ci_low", "ci_high", "score")
            if c in frame.columns]


def slice_description(slice_id: str) -> str:
    """The ``description`` of slice ``slice_id`` in ``slices.parquet`` (the id itself when it is not there)."""
    table = data.artifact("slices")
    if table is not None and "slice_id" in table.columns:
        match = table.loc[table["slice_id"].astype(str) == slice_id, "description"]
        if len(match):
            return str(match.iloc[0])
    return slice_id


def slice_spec(row: pd.Series, known: set[str]) -> FilterSpec | None:
    """The filter that keeps exactly the samples of one slice-table row; ``None`` if it cannot be expressed.

    ``all`` keeps everything; an id of ``slices.parquet`` (``known``) becomes :attr:`FilterSpec.slice`,
    resolved with the slices stage's own masks; the robustness stage's own class slices (``label=<class>``,
    written when the slices stage did not run) are label filters.
    """
    slice_id = row.get("slice_id")
    if slice_id is None or (isinstance(slice_id, float) and math.isnan(slice_id)):
        return None
    slice_id = str(slice_id)
    if slice_id == "all":
        return FilterSpec()
    if slice_id in known:
        return FilterSpec(slice=slice_id)
    if slice_id.startswith("label=") and row.get("kind") == "class":
        return FilterSpec(labels=[slice_id.removeprefix("label=")])
    return None


def known_slice_ids() -> set[str]:
    """Ids of the slices the filter engine can resolve: rows of ``slices.parquet`` written with their masks."""
    table = data.artifact("slices")
    if table is None or "slice_id" not in table.columns or "predicate_ids" not in table.columns:
        return set()
    if not data.workspace().artifact_path("slice_predicate_masks.npy").exists():
        return set()
    return set(table["slice_id"].astype(str))


def slice_table(frame: pd.DataFrame, columns: list[str], *, key: str,
                column_config: dict | None = None) -> None:
    """A slice table whose rows open the explorer: selecting a row shows exactly that slice's samples there.

    ``frame`` must hold ``slice_id`` (not necessarily shown). Without it the table is shown read-only.
    """
    if "slice_id" not in frame.columns:
        st.dataframe(frame[columns], hide_index=True, width="stretch", column_config=column_config)
        return
    generation = st.session_state.get(f"{key}.generation", 0)
    event = st.dataframe(frame[columns], hide_index=True, width="stretch", column_config=column_config,
                         on_select="rerun", selection_mode="single-row", key=f"{key}.{generation}")
    st.caption("Select a row to open that slice's samples in the explorer.")
    rows = list(event.selection.get("rows", [])) if event is not None else []
    if rows and 0 <= rows[0] < len(frame):
        spec = slice_spec(frame.iloc[rows[0]], known_slice_ids())
        if spec is not None:
            # A fresh table key on return: the old selection must not send the user to the explorer again.
            st.session_state[f"{key}.generation"] = generation + 1
            open_in_explorer(spec)
        st.warning("This slice's members are not stored (an older analysis): run `robustlens analyze` again "
                   "to open slices in the explorer.")


PERCENT = st.column_config.NumberColumn(format="percent")
SLICE_FORMAT = {"accuracy": PERCENT, "error_rate": st.column_config.NumberColumn("error rate", format="percent"),
                "gap": st.column_config.NumberColumn("gap (error − overall)", format="percent"),
                "ci_low": st.column_config.NumberColumn("error CI low", format="percent"),
                "ci_high": st.column_config.NumberColumn("error CI high", format="percent")}



# -- one sample -------------------------------------------------------------------------------------------------
def sample_detail(table: pd.DataFrame, position: int, *, key: str,
                  on_open: Callable[[str], None] | None = None) -> None:
    """Everything about one sample: image, facts, predictions, issues, tags, decisions, metrics, neighbours."""
    row = table.iloc[position]
    sample_id = row["id"]
    workspace = data.workspace()
    st.subheader(text(sample_id))
    image_col, facts_col = st.columns([1, 1])
    with image_col:
        path = data.thumbnails([position])[0]
        if path:
            st.image(path, width="stretch", output_format="JPEG")
        else:
            st.warning("The image file cannot be read any more.")
    with facts_col:
        facts = {"label": row["label"], "split": row["split"], "path": row["path"],
                 "size": f"{row['width']}×{row['height']} {row['mode']}"}
        if "label_issue.suggested_label" in row.index and pd.notna(row["label_issue.suggested_label"]):
            facts["suggested label"] = row["label_issue.suggested_label"]
            facts["label quality"] = f"{row['label_issue.label_quality']:.3f}"
        st.markdown("\n".join(f"- **{k}:** {text(v)}" for k, v in facts.items()))
        st.caption(f"File: {code(workspace.image_path(row['path']))}")
    _predictions_block(table, row, position)
    issues = data.sample_issues(sample_id)
    if len(issues):
        st.markdown("**Issues**")
        st.dataframe(issues, hide_index=True, width="stretch")
    else:
        st.caption("No issues flagged." if "issue_count" in table.columns else "Issues: run `robustlens analyze`.")
    _tags_block(sample_id, key)
    history = data.curation().decision_history(sample_id)
    if history:
        st.markdown("**Review decisions**")
        st.dataframe(pd.DataFrame(history)[["reviewer", "action", "new_label", "note", "created_at"]],
                     hide_index=True, width="stretch")
    metrics = [c for c in table.columns if c.startswith("metric.")]
    if metrics:
        with st.expander("Metrics"):
            st.dataframe(pd.DataFrame({"metric": [display_name(c) for c in metrics],
                                       "value": [float(row[c]) for c in metrics]}), hide_index=True, width="stretch")
    neighbours_block(table, position, key=key, on_open=on_open)


def _predictions_block(table: pd.DataFrame, row: pd.Series, position: int) -> None:
    sets = prediction_sets(table)
    if not sets:
        return
    classes = list(table["label"].cat.categories)
    lines = []
    for name in sets:
        probabilities = data.probabilities(name, position)
        top = np.argsort(probabilities)[::-1][:3]
        verdict = "✓" if row[f"pred.{name}.correct"] else "✗"
        ranked = ", ".join(f"{text(classes[i])} {probabilities[i]:.2f}" for i in top)
        lines.append(f"- **{text(name)}** {verdict} {text(row[f'pred.{name}.label'])} — {ranked}")
    st.markdown("**Predictions**\n" + "\n".join(lines))


def _tags_block(sample_id: str, key: str) -> None:
    store = data.curation()
    tags = store.tags_of(sample_id)
    st.markdown("**Tags:** " + (", ".join(code(t) for t in tags) if tags else "none"))
    with st.form(f"{key}.tagform", clear_on_submit=True, border=False):
        left, right = st.columns([3, 1], vertical_alignment="bottom")
        tag = left.text_input("Add a tag to this sample", key=f"{key}.tag_one")
        submitted = right.form_submit_button("Add")
    if submitted:
        _tag([sample_id], tag, remove=False)
    if tags:
        remove = st.selectbox("Remove a tag", tags, index=None, key=f"{key}.untag", placeholder="choose a tag")
        if remove and st.button("Remove", key=f"{key}.untag_btn"):
            _tag([sample_id], remove, remove=True)


def neighbours_block(table: pd.DataFrame, position: int, *, key: str,
                      on_open: Callable[[str], None] | None) -> None:
    found = data.neighbours(position, k=6)
    if not found:
        st.caption("Nearest neighbours need embeddings: run `robustlens analyze`.")
        return
    st.markdown("**Nearest neighbours** (embedding cosine)")
    similarity = dict(found)
    positions = np.array([p for p, _ in found])
    thumbnail_grid(table, positions, columns=6, key=f"{key}.nn", selectable=False, on_open=on_open,
                   caption=lambda r: f"{r['label']} · cos {similarity[int(r.name)]:.3f}")
