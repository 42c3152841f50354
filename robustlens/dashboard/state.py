"""Session and URL state shared by the pages: the current filter, the grid selection, the user's name.

The filter lives in three places that this module keeps in step:

* ``st.session_state[FILTER]`` — the canonical :class:`~robustlens.query.filters.FilterSpec` (as a dict),
  global to the session, so switching pages keeps it;
* the filter widgets in the sidebar (seeded from the canonical spec when they appear or when the spec
  is changed by code, e.g. "open these samples in the explorer");
* the URL query string (:func:`publish`), so a filtered view can be sent to a colleague. A URL that
  arrives from outside — a first visit, a link — is adopted (:func:`adopt_url_filter`); a URL emptied by
  page navigation is not, so moving between pages never loses the filter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd
import streamlit as st

from robustlens.query import filters
from robustlens.query.filters import FilterError, FilterSpec

FILTER = "rl.filter"
URL_SEEN = "rl.url_seen"
RESEED = "rl.reseed"
SELECTION = "rl.selection"
SELECTION_GREW = "rl.selection_grew"
USER = "rl.user"
USER_INPUT = "rl.user_input"
NOTICES = "rl.notices"


# -- URL ------------------------------------------------------------------------------------------------
def url_params() -> dict[str, list[str]]:
    """The current query string, every value as a list (repeated keys kept)."""
    return {key: list(st.query_params.get_all(key)) for key in st.query_params}


def url_value(key: str) -> str | None:
    values = st.query_params.get_all(key)
    return values[-1] if values else None


def _as_lists(params: Mapping[str, str | list[str]]) -> dict[str, list[str]]:
    return {key: [value] if isinstance(value, str) else list(value) for key, value in params.items()}


def _filter_part(params: Mapping[str, list[str]]) -> dict[str, list[str]]:
    return {key: value for key, value in params.items() if filters.is_filter_key(key)}


def adopt_url_filter(table: pd.DataFrame) -> None:
    """Take the filter from the URL when the URL came from outside (first run, a link); see the module doc."""
    incoming = _filter_part(url_params())
    seen = st.session_state.get(URL_SEEN)
    if incoming == seen or (not incoming and (seen is not None or FILTER in st.session_state)):
        return
    try:
        spec = filters.from_query_params(incoming)
    except FilterError as exc:
        notice(f"The link's filter could not be read and was ignored: {exc}")
        spec = FilterSpec()
    from robustlens.dashboard import data  # data's readers are cached per server; state is imported first

    spec, problems = filters.prune_spec(table, spec, slices=data.slice_membership())
    for problem in problems:
        notice(f"Part of the link's filter does not apply to this workspace and was ignored: {problem}")
    set_filter(spec)
    st.session_state[URL_SEEN] = incoming


def publish(spec: FilterSpec, page_params: Mapping[str, str | list[str] | None] | None = None) -> None:
    """Write the filter and this page's own parameters to the URL, if they changed.

    Only pages that use the filter call this; other pages leave the URL as navigation made it.
    """
    desired = _as_lists(filters.to_query_params(spec))
    for key, value in (page_params or {}).items():
        if value not in (None, "", []):
            desired[key] = [value] if isinstance(value, str) else list(value)
    if desired != url_params():
        st.query_params.from_dict(desired)
    st.session_state[URL_SEEN] = _filter_part(desired)


# -- filter ---------------------------------------------------------------------------------------------
def current_filter() -> FilterSpec:
    """The session's filter (empty when none was set)."""
    try:
        return FilterSpec.from_dict(st.session_state.get(FILTER, {}))
    except FilterError:
        return FilterSpec()


def set_filter(spec: FilterSpec, *, reseed: bool = True) -> None:
    """Replace the session's filter; ``reseed`` makes the sidebar widgets show it on the next render."""
    st.session_state[FILTER] = spec.to_dict()
    if reseed:
        st.session_state[RESEED] = True


def take_reseed() -> bool:
    """Whether the filter widgets must be re-seeded (and clear the request)."""
    return bool(st.session_state.pop(RESEED, False))


# -- selection --------------------------------------------------------------------------------------------
def selection() -> list[str]:
    """Ids selected in the grid (in selection order)."""
    return list(st.session_state.get(SELECTION, []))


def set_selection(ids: Iterable[str]) -> None:
    """Replace the selection; remembers whether it grew (bulk actions then default to the selection)."""
    before = len(st.session_state.get(SELECTION, []))
    st.session_state[SELECTION] = list(dict.fromkeys(ids))
    st.session_state[SELECTION_GREW] = len(st.session_state[SELECTION]) > before


def selection_grew() -> bool:
    """Whether the last selection change added samples (and forget it)."""
    return bool(st.session_state.pop(SELECTION_GREW, False))


def toggle_selected(sample_id: str, selected: bool) -> None:
    current = selection()
    if selected and sample_id not in current:
        current.append(sample_id)
    elif not selected and sample_id in current:
        current.remove(sample_id)
    set_selection(current)


# -- user -----------------------------------------------------------------------------------------------
def user() -> str | None:
    """The name this browser session writes tags and decisions under, or ``None`` if not given yet."""
    name = str(st.session_state.get(USER) or "").strip()
    return name or None


def set_user(name: str) -> None:
    """Remember the user's name (the sidebar box shows it from the next render on)."""
    st.session_state[USER] = name.strip()


# -- notices ----------------------------------------------------------------------------------------------
def notice(message: str, level: str = "warning") -> None:
    """Queue a message (``warning``, ``success`` or ``info``) to show at the top of the next rendered page."""
    st.session_state.setdefault(NOTICES, []).append((level, message))


def take_notices() -> list[tuple[str, str]]:
    return list(st.session_state.pop(NOTICES, []))
