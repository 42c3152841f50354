"""Tags & collections: what the team has tagged and collected, and new collections from the current filter
or selection. A collection is a named, described set of samples — a static list, or a saved filter that
re-evaluates as tags, decisions and analyses change."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from robustlens.query.filters import FilterError, FilterSpec, apply_filter
from robustlens.dashboard import data, state, widgets
from robustlens.errors import RobustlensError


def render() -> None:
    widgets.start_page("Tags & collections")
    table = data.table()
    spec = widgets.filter_panel(table)
    store = data.curation()
    _tags(store)
    _collections(table, store)
    st.subheader("New collection")
    positions = widgets.filtered_positions_or_stop(table, spec)
    chosen = state.selection()
    options = (["selection"] if chosen else []) + ["filter"]
    scope = st.radio("From", options, key="coll.scope", horizontal=True,
                     format_func={"selection": f"the grid selection ({len(chosen):,})",
                                  "filter": f"the current filter ({len(positions):,} samples"
                                            + (": " + " · ".join(map(widgets.text, spec.describe()))
                                               if spec.describe() else "")
                                            + ")"}.get)
    count = len(chosen) if scope == "selection" else len(positions)
    widgets.new_collection_form(
        spec, ids=lambda: chosen if scope == "selection" else table["id"].iloc[positions].tolist(), count=count,
        scope=scope, key="coll.new")
    state.publish(spec)


def _tags(store) -> None:
    st.subheader("Tags")
    counts = store.tag_counts()
    if not counts:
        st.info("No tags yet. Tag samples from the **Explorer** (grid selection or a whole filter result), the "
                "**Embedding map** (lasso) or **Duplicates**.")
        return
    for name, count in counts.items():
        left, right = st.columns([3, 1], vertical_alignment="center")
        left.markdown(f"{widgets.code(name)} — {count:,} sample(s)")
        with right:
            widgets.explorer_link("Open", FilterSpec(tags=[name]))


def _collections(table: pd.DataFrame, store) -> None:
    st.subheader("Collections")
    overview = store.collections_overview()
    if not overview:
        st.info("No collections yet: create one below from the current filter or grid selection.")
        return
    rows = []
    for entry in overview:
        size = entry["members"]
        if entry["kind"] == "saved filter":
            try:
                size = int(apply_filter(table, FilterSpec.from_dict(entry["filter"]), store).sum())
            except FilterError as exc:
                size = None
                st.warning(f"Collection '{widgets.text(entry['name'])}' cannot be evaluated: {widgets.text(exc)}")
        rows.append({"name": entry["name"], "kind": entry["kind"], "samples": size,
                     "description": entry["description"], "created by": entry["created_by"],
                     "created at": pd.Timestamp(entry["created_at"]).strftime("%Y-%m-%d %H:%M")})
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    names = [entry["name"] for entry in overview]
    left, middle, right = st.columns([2, 1, 2], vertical_alignment="bottom")
    chosen = left.selectbox("Collection", names, key="coll.chosen")
    with middle:
        widgets.explorer_link("Open in explorer", FilterSpec(collections=[chosen]))
    with right:
        confirm = st.checkbox(f"Yes, delete '{widgets.text(chosen)}'", key="coll.confirm")
        if st.button("Delete collection", key="coll.delete", disabled=not confirm, icon=":material/delete:"):
            user = widgets.require_user()
            if user:
                try:
                    store.delete_collection(chosen, user=user)
                except RobustlensError as exc:  # a write conflict, the database unreachable: nothing changed
                    state.notice(f"Not deleted: {exc}", "error")
                    st.rerun()
                st.session_state.pop("coll.confirm", None)
                widgets.done(f"Deleted collection '{chosen}' (its samples are untouched).")
    entry = next(e for e in overview if e["name"] == chosen)
    if entry["kind"] == "saved filter":
        st.caption("Filter: " + (" · ".join(map(widgets.text, FilterSpec.from_dict(entry["filter"]).describe()))
                                 or "everything"))
        st.code(FilterSpec.from_dict(entry["filter"]).to_json(), language="json")
    elif state.selection():
        if st.button(f"Remove the {len(state.selection()):,} selected samples from '{widgets.text(chosen)}'",
                     key="coll.remove"):
            user = widgets.require_user()
            if user:
                try:
                    removed = store.remove_from_collection(chosen, state.selection(), user=user)
                except RobustlensError as exc:  # a write conflict, the database unreachable: nothing changed
                    state.notice(f"Not removed: {exc}", "error")
                    st.rerun()
                widgets.done(f"Removed {removed:,} sample(s) from '{chosen}'.")


if __name__ == "__main__":
    widgets.run_page(render)
