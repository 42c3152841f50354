"""Tags & collections: what the team has tagged and collected, and new collections from the current filter
or selection. A collection is a named, described set of samples — a static list, or a saved filter that
re-evaluates as tags, decisions and analyses change."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from robustlens.analysis.curation import SAVED_FILTER
from robustlens.dashboard import data, state
from robustlens.dashboard.components.bulk_curation import new_collection_form
from robustlens.dashboard.components.filter_panel import filter_panel
from robustlens.dashboard.components.frame import done, filtered_positions_or_stop, require_user, run_page
from robustlens.dashboard.components.markup import code, text
from robustlens.dashboard.components.navigation import explorer_link
from robustlens.errors import RobustlensError
from robustlens.query.filters import FilterError, FilterSpec, apply_filter


def render() -> None:
    table = data.table()
    spec = filter_panel(table)
    store = data.curation()
    _tags(store)
    _collections(table, store)
    st.subheader("New collection")
    positions = filtered_positions_or_stop(table, spec)
    chosen = state.selection()
    options = (["selection"] if chosen else []) + ["filter"]
    scope = st.radio(
        "From",
        options,
        key="coll.scope",
        horizontal=True,
        format_func={
            "selection": f"the grid selection ({len(chosen):,})",
            "filter": f"the current filter ({len(positions):,} samples"
            + (": " + " · ".join(map(text, spec.describe())) if spec.describe() else "")
            + ")",
        }.get,
    )
    count = len(chosen) if scope == "selection" else len(positions)
    new_collection_form(
        spec,
        ids=lambda: chosen if scope == "selection" else table["id"].iloc[positions].tolist(),
        count=count,
        scope=scope,
        key="coll.new",
    )
    state.publish(spec)


def _tags(store) -> None:
    st.subheader("Tags")
    counts = store.tag_counts()
    if not counts:
        st.info(
            "No tags yet. Tag samples from the **Explorer** (grid selection or a whole filter result), the "
            "**Embedding map** (lasso) or **Duplicates**."
        )
        return
    for name, count in counts.items():
        left, right = st.columns([3, 1], vertical_alignment="center")
        left.markdown(f"{code(name)} — {count:,} sample(s)")
        with right:
            explorer_link("Open", FilterSpec(tags=[name]))
    with st.expander("Rename or delete a tag"):
        chosen = st.selectbox("Tag", list(counts), key="tag.chosen", format_func=text)
        new_name = st.text_input(
            "New name", key="tag.new_name", help="Renaming into an existing tag merges the two; saved filters follow."
        )
        rename, delete = st.columns(2)
        if rename.button("Rename", key="tag.rename") and chosen:
            _change_tag(store, chosen, new_name)
        if delete.button("Delete tag", key="tag.delete", type="secondary") and chosen:
            _change_tag(store, chosen, None)


def _change_tag(store, tag: str, new_name: str | None) -> None:
    """Rename ``tag`` to ``new_name`` (``None``: delete it) under the user's name; refusals are shown, nothing lost."""
    user = require_user()
    if not user:
        return
    try:
        if new_name is None:
            removed = store.delete_tag(tag, user=user)
            message = f"Deleted tag '{tag}' ({removed:,} sample(s) untagged; the samples are untouched)."
        else:
            count = store.rename_tag(tag, new_name, user=user)
            message = f"Renamed tag '{tag}' to '{new_name.strip()}' ({count:,} sample(s))."
    except RobustlensError as exc:  # unknown tag, a bad name, a saved filter still using it, a write conflict
        state.notice(f"Not changed: {exc}", "error")
        st.rerun()
    done(message)


def _collections(table: pd.DataFrame, store) -> None:
    st.subheader("Collections")
    overview = store.collections_overview()
    if not overview:
        st.info("No collections yet: create one below from the current filter or grid selection.")
        return
    rows = []
    for entry in overview:
        size = entry["size"]
        if entry["kind"] == SAVED_FILTER:
            try:
                size = int(
                    apply_filter(
                        table, FilterSpec.from_dict(entry["filter"]), store, slices=data.slice_membership()
                    ).sum()
                )
            except FilterError as exc:
                size = None
                st.warning(f"Collection '{text(entry['name'])}' cannot be evaluated: {text(exc)}")
        rows.append(
            {
                "name": entry["name"],
                "kind": entry["kind"],
                "samples": size,
                "description": entry["description"],
                "created by": entry["created_by"],
                "created at": pd.Timestamp(entry["created_at"]).strftime("%Y-%m-%d %H:%M"),
            }
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    names = [entry["name"] for entry in overview]
    left, middle, right = st.columns([2, 1, 2], vertical_alignment="bottom")
    chosen = left.selectbox("Collection", names, key="coll.chosen")
    with middle:
        explorer_link("Open in explorer", FilterSpec(collections=[chosen]))
    with right:
        confirm = st.checkbox(f"Yes, delete '{text(chosen)}'", key="coll.confirm")
        if st.button("Delete collection", key="coll.delete", disabled=not confirm, icon=":material/delete:"):
            user = require_user()
            if user:
                try:
                    store.delete_collection(chosen, user=user)
                except RobustlensError as exc:  # a write conflict, the database unreachable: nothing changed
                    state.notice(f"Not deleted: {exc}", "error")
                    st.rerun()
                st.session_state.pop("coll.confirm", None)
                done(f"Deleted collection '{chosen}' (its samples are untouched).")
    entry = next(e for e in overview if e["name"] == chosen)
    if entry["kind"] == SAVED_FILTER:
        st.caption(
            "Filter: " + (" · ".join(map(text, FilterSpec.from_dict(entry["filter"]).describe())) or "everything")
        )
        st.code(FilterSpec.from_dict(entry["filter"]).to_json(), language="json")
    elif state.selection() and st.button(
        f"Remove the {len(state.selection()):,} selected samples from '{text(chosen)}'", key="coll.remove"
    ):
        user = require_user()
        if user:
            try:
                removed = store.remove_from_collection(chosen, state.selection(), user=user)
            except RobustlensError as exc:  # a write conflict, the database unreachable: nothing changed
                state.notice(f"Not removed: {exc}", "error")
                st.rerun()
            done(f"Removed {removed:,} sample(s) from '{chosen}'.")


if __name__ == "__main__":
    run_page("collections", render)
