"""Explorer: every sample as a thumbnail grid — filter in the sidebar, sort, select, tag, and open one sample."""

from __future__ import annotations

import math

import streamlit as st

from robustlens.dashboard import data, state
from robustlens.dashboard.components.bulk_curation import bulk_actions
from robustlens.dashboard.components.filter_panel import filter_panel
from robustlens.dashboard.components.frame import filtered_positions_or_stop, run_page
from robustlens.dashboard.components.grid import caption_for, clear_selection, select_ids, thumbnail_grid
from robustlens.dashboard.components.markup import text
from robustlens.dashboard.components.sample_detail import sample_detail

PAGE_SIZE = 48
PAGE_NO = "explorer.page_no"
PAGE_GENERATION = "explorer.page_generation"
DETAIL = "explorer.detail"
URL_SEEN = "explorer.url_seen"
LAST_FILTER = "explorer.last_filter"


def render() -> None:
    table = data.table()
    spec = filter_panel(table)
    positions = filtered_positions_or_stop(table, spec)
    _adopt_url_page_state()
    conditions = spec.describe()
    st.markdown(
        f"**{len(positions):,}** of {len(table):,} samples"
        + (" match: " + " · ".join(map(text, conditions)) if conditions else " (no filter)")
    )
    pages = max(1, math.ceil(len(positions) / PAGE_SIZE))
    _reset_page_if_filter_changed(spec)
    with st.expander(f"Tag or collect ({len(state.selection()):,} selected)", expanded=bool(state.selection())):
        bulk_actions(table, positions, spec, key="explorer.bulk")
    page = _toolbar(table, positions, pages)
    shown = positions[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    detail = data.position_of(st.session_state.get(DETAIL))
    if detail is None:
        st.session_state[DETAIL] = None  # e.g. a link to a sample that is no longer in the workspace
    if len(positions) == 0:
        st.info("No sample matches this filter. Loosen it in the sidebar, or **Clear all filters**.")
    elif detail is not None:
        grid, side = st.columns([3, 2], gap="medium")
        with grid:
            _grid(table, shown, spec, columns=6)
        with side, st.container(border=True):
            st.button("Close details", on_click=_open, args=(None,), icon=":material/close:", key="explorer.close")
            sample_detail(table, detail, key="explorer.detail_view", on_open=_open)
    else:
        _grid(table, shown, spec, columns=8)
    state.publish(spec, {"p": str(page) if page > 1 else None, "sample": st.session_state.get(DETAIL)})
    st.session_state[URL_SEEN] = (state.url_value("p"), state.url_value("sample"))


def _grid(table, shown, spec, *, columns: int) -> None:
    thumbnail_grid(
        table,
        shown,
        columns=columns,
        key="explorer.grid",
        on_open=_open,
        caption=lambda row: caption_for(row, table, spec.sort_by),
    )


def _toolbar(table, positions, pages: int) -> int:
    left, middle, right = st.columns([3, 1, 1], vertical_alignment="center")
    with left:
        page = _pagination(pages)
    start = (page - 1) * PAGE_SIZE
    page_ids = table["id"].iloc[positions[start : start + PAGE_SIZE]].tolist()
    middle.button(
        "Select this page", on_click=select_ids, args=(page_ids,), key="explorer.select_page", disabled=not page_ids
    )
    right.button(
        f"Clear selection ({len(state.selection()):,})",
        on_click=clear_selection,
        key="explorer.clear_selection",
        disabled=not state.selection(),
    )
    return page


def _pagination(pages: int) -> int:
    """Page picker; its key changes when code moves the page (a new filter, a link), so no stale value wins."""
    current = min(max(int(st.session_state.get(PAGE_NO, 1)), 1), pages)
    key = f"explorer.pages.{st.session_state.get(PAGE_GENERATION, 0)}.{pages}"
    page = st.pagination(pages, default=current, key=key, max_visible_pages=9)
    st.session_state[PAGE_NO] = page
    return page


def _set_page(page: int) -> None:
    st.session_state[PAGE_NO] = page
    st.session_state[PAGE_GENERATION] = st.session_state.get(PAGE_GENERATION, 0) + 1


def _open(sample_id: str | None) -> None:
    st.session_state[DETAIL] = sample_id


def _adopt_url_page_state() -> None:
    """Page number and open sample from a link (first visit or a link from another page)."""
    incoming = (state.url_value("p"), state.url_value("sample"))
    seen = st.session_state.get(URL_SEEN)
    if seen is not None and (incoming == (None, None) or incoming == seen):
        return
    page, sample = incoming
    if page and page.isdigit():
        _set_page(int(page))
        st.session_state[LAST_FILTER] = state.current_filter().to_json()
    st.session_state[DETAIL] = sample


def _reset_page_if_filter_changed(spec) -> None:
    """A new filter starts at its first page."""
    key = spec.to_json()
    if st.session_state.get(LAST_FILTER) != key:
        _set_page(1)
        st.session_state[LAST_FILTER] = key


if __name__ == "__main__":
    run_page("explorer", render)
