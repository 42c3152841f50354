"""Links into the explorer: make a filter the session's filter and open it (or link to it)."""

from __future__ import annotations

import streamlit as st

from robustlens.dashboard import routes, state
from robustlens.query.filters import FilterSpec, to_query_params


def open_in_explorer(spec: FilterSpec) -> None:
    """Make ``spec`` the filter and go to the explorer (it appears in the URL there)."""
    state.set_filter(spec)
    st.switch_page(routes.page("explorer"), query_params=to_query_params(spec))


def explorer_link(label: str, spec: FilterSpec, *, icon: str = ":material/grid_view:") -> None:
    """A link to the explorer with ``spec`` in its URL (opens in a new tab with a middle click, too)."""
    st.page_link(routes.page("explorer"), label=label, icon=icon, query_params=to_query_params(spec))
