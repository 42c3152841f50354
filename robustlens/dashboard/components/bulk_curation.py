"""Bulk curation: tag / untag / add to a collection / create a collection, for the grid selection or every
match of the filter. Writes go through the curation store under the user's name."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import streamlit as st

from robustlens.analysis.curation import SAVED_FILTER, STATIC
from robustlens.dashboard import data, state
from robustlens.dashboard.components.frame import done, require_user
from robustlens.dashboard.components.markup import text
from robustlens.errors import RobustlensError
from robustlens.query.filters import FilterSpec


def bulk_actions(table: pd.DataFrame, positions: np.ndarray, spec: FilterSpec, *, key: str) -> None:
    """Tag / untag / add to collection / new collection, for the grid selection or the whole filter result."""
    chosen = state.selection()
    options = (["selection"] if chosen else []) + ["filter"]
    labels = {
        "selection": f"selected samples ({len(chosen):,})",
        "filter": f"every match of the filter ({len(positions):,})",
    }
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
            tag_samples(ids(), tag, remove=False)
        if remove.button("Remove tag", key=f"{key}.remove_tag", disabled=not count):
            tag_samples(ids(), tag, remove=True)
    with middle:
        static = [c["name"] for c in store.collections_overview() if c["kind"] == STATIC]
        target = st.selectbox(
            "Collection",
            static,
            key=f"{key}.target",
            index=None,
            placeholder="choose a static collection" if static else "no static collection yet",
        )
        if st.button("Add to collection", key=f"{key}.add_coll", disabled=not (count and target)):
            user = require_user()
            if user and target:
                try:
                    added = store.add_to_collection(target, ids(), user=user)
                except RobustlensError as exc:  # refused input, a write conflict, the database unreachable
                    st.error(text(f"Not saved: {exc}"))
                else:
                    done(f"Added {added:,} sample(s) to '{target}'.")
    with right:
        new_collection_form(spec, ids=ids, count=count, scope=scope, key=f"{key}.new")


def _writer(name: str, missing: str) -> str | None:
    """The user's name for a write that names a tag or collection ``name``; ``None`` (nothing to write) when no
    user is set (:func:`require_user` asks for one) or ``name`` is blank (the warning ``missing`` says so)."""
    user = require_user()
    if user and not name.strip():
        st.warning(missing)
        return None
    return user or None


def tag_samples(ids: list[str], tag: str, *, remove: bool) -> None:
    user = _writer(tag, "Type a tag name first.")
    if not user:
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
        kinds = [STATIC] + ([SAVED_FILTER] if scope == "filter" else [])
        kind = st.radio(
            "Kind",
            kinds,
            key=f"{key}.kind",
            horizontal=True,
            format_func=lambda k: f"static list ({count:,})" if k == STATIC else "saved filter (re-evaluates)",
        )
        submitted = st.form_submit_button("Create collection", icon=":material/add:")
    if submitted:
        create_collection(name, description, kind=kind, ids=ids, spec=spec)


def create_collection(
    name: str, description: str, *, kind: str, ids: Callable[[], list[str]], spec: FilterSpec
) -> None:
    """Create a collection of ``kind`` :data:`~robustlens.analysis.curation.SAVED_FILTER` (``spec``) or
    :data:`~robustlens.analysis.curation.STATIC` (``ids()``) under the user's name, then rerun."""
    user = _writer(name, "Give the collection a name.")
    if not user:
        return
    store = data.curation()
    try:
        if kind == SAVED_FILTER:
            store.create_collection(
                name,
                user=user,
                description=description,
                filter_spec=spec.replace(sort_by=None, descending=False).to_dict(),
            )
        else:
            members = ids()
            store.create_collection(name, user=user, description=description, sample_ids=members)
    except (RobustlensError, ValueError) as exc:
        st.error(text(f"Not saved: {exc}"))
        return
    what = " (saved filter)." if kind == SAVED_FILTER else f" with {len(members):,} samples."
    done(f"Created collection '{name.strip()}'{what}")
