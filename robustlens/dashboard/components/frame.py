"""The page frame: what every page shows and does around its own content, in one place.

A page script ends with ``run_page("<route name>", render)``; the frame then, once per script run:

1. takes the stamp of the workspace's analysis artifacts (:func:`data.refresh_artifacts_stamp`), so every
   cached reader of this run keys on the same stamp and the artifact folders are listed once, not per read;
2. draws the sidebar name box, the page's title and caption (from :mod:`robustlens.dashboard.routes`) and
   the messages queued by earlier actions;
3. runs ``render``; an error the user can act on (bad artifact, unreadable file, bad filter) becomes a
   message, the traceback goes to the server log. Streamlit's own control flow (rerun, page switch, stop)
   passes through untouched.

It also holds the small helpers a page body uses for the same frame-level concerns: writes need an author
(:func:`require_user`), a missing analysis (:func:`analysis_missing`), a confirmed write (:func:`done`), a
filter that cannot be applied (:func:`filtered_positions_or_stop`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
import streamlit as st

from robustlens.dashboard import data, routes, state
from robustlens.dashboard.components.markup import code, text
from robustlens.errors import RobustlensError
from robustlens.query.filters import FilterError, FilterSpec

LOGGER = logging.getLogger("robustlens.dashboard")


def run_page(name: str, render: Callable[[], None]) -> None:
    """Run page ``name`` (a :data:`routes.ROUTES` name) in the frame: stamp, name box, title, notices, errors."""
    route = routes.BY_NAME[name]
    try:
        data.refresh_artifacts_stamp()
        _user_box()
        st.title(route.title)
        if route.caption:
            st.caption(route.caption)
        show_notices()
        render()
    except (RobustlensError, FilterError, ValueError, OSError) as exc:
        LOGGER.exception("page %s failed", name)
        st.error(f"This page cannot be shown: {text(exc)}")
        st.caption(
            "If an analysis artifact is damaged or from another version, run `robustlens analyze` again. "
            "The full error is in the server log."
        )


def show_notices() -> None:
    """Show (once) the messages queued by earlier actions, e.g. "Tagged 12 samples".

    A notice is plain text (it quotes tag names, sample ids, parts of a link): it is shown escaped, so a
    notice never carries markdown of its own.
    """
    for level, message in state.take_notices():
        getattr(st, level if level in ("warning", "success", "info", "error") else "warning")(text(message))


def _user_box() -> None:
    hold_widget_value(state.USER_INPUT, state.user() or "")
    st.sidebar.text_input(
        "Your name",
        key=state.USER_INPUT,
        placeholder="who tags and reviews",
        help="Tags, collections and review decisions are recorded under this name.",
        on_change=lambda: state.set_user(st.session_state[state.USER_INPUT]),
    )


def require_user() -> str | None:
    """The user's name, or ``None`` after telling them to enter it (writes need an author)."""
    name = state.user()
    if name is None:
        st.warning("Enter your name in the sidebar (**Your name**) first: every change is recorded under it.")
    return name


def analysis_missing(what: str) -> None:
    """The empty state of a page whose artifact is not there yet."""
    workspace = data.workspace_path()
    st.info(
        f"No {text(what)} yet. Run {code(f'robustlens analyze {workspace}')} to compute it, then reload this page.",
        icon=":material/info:",
    )


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


def filtered_positions_or_stop(table: pd.DataFrame, spec: FilterSpec) -> np.ndarray:
    """Row positions matching ``spec``; a filter that cannot be applied is explained, kept in the URL (so the
    user can fix it in the sidebar) and ends the page run."""
    try:
        return data.filtered_positions(table, spec)
    except FilterError as exc:
        st.error(f"This filter cannot be applied: {text(exc)}")
        state.publish(spec)
        st.stop()
