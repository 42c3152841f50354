"""Slice tables (worst slices, all slices, robustness per slice) whose rows open the explorer on exactly
that slice's samples."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import streamlit as st

from robustlens.dashboard import data
from robustlens.dashboard.components.navigation import open_in_explorer
from robustlens.query.filters import FilterSpec


def slice_columns(frame: pd.DataFrame) -> list[str]:
    """The slice-table columns worth showing, in order."""
    return [
        c
        for c in ("rank", "description", "size", "accuracy", "error_rate", "gap", "ci_low", "ci_high", "score")
        if c in frame.columns
    ]


def slice_description(slice_id: str) -> str:
    """The ``description`` of slice ``slice_id`` in ``slices.parquet`` (the id itself when it is not there)."""
    table = data.artifact("slices")
    if table is not None and "slice_id" in table.columns:
        match = table.loc[table["slice_id"].astype(str) == slice_id, "description"]
        if len(match):
            return str(match.iloc[0])
    return slice_id


def class_slice_id(label: str) -> str:
    """The id the robustness stage gives its slice of class ``label`` (``class_slices`` in
    :mod:`robustlens.analysis.robustness.tables`, written when the slices stage did not run)."""
    return f"label={label}"


def slice_spec(row: pd.Series, known: set[str], classes: Sequence[str] = ()) -> FilterSpec | None:
    """The filter that keeps exactly the samples of one slice-table row; ``None`` if it cannot be expressed.

    ``all`` keeps everything; an id of ``slices.parquet`` (``known``) becomes :attr:`FilterSpec.slice`,
    resolved with the slices stage's own masks; a robustness class slice (``kind == "class"``) of one of
    ``classes`` is a label filter. Ids are matched whole against the ids those slices have, never taken apart.
    """
    slice_id = row.get("slice_id")
    if slice_id is None or (isinstance(slice_id, float) and math.isnan(slice_id)):
        return None
    slice_id = str(slice_id)
    if slice_id == "all":
        return FilterSpec()
    if slice_id in known:
        return FilterSpec(slice=slice_id)
    if row.get("kind") == "class":
        label = {class_slice_id(name): name for name in classes}.get(slice_id)
        return None if label is None else FilterSpec(labels=[label])
    return None


def slice_filters(frame: pd.DataFrame) -> list[FilterSpec | None]:
    """The filter of every row of ``frame`` (:func:`slice_spec`), carried beside the table shown."""
    known = known_slice_ids()
    classes = [str(name) for name in data.table()["label"].cat.categories]
    return [slice_spec(row, known, classes) for _, row in frame.iterrows()]


def known_slice_ids() -> set[str]:
    """Ids of the slices the filter engine can resolve: rows of ``slices.parquet`` written with their masks."""
    table = data.artifact("slices")
    if table is None or "slice_id" not in table.columns or "predicate_ids" not in table.columns:
        return set()
    if not data.workspace().artifact_path("slice_predicate_masks.npy").exists():
        return set()
    return set(table["slice_id"].astype(str))


def slice_table(frame: pd.DataFrame, columns: list[str], *, key: str, column_config: dict | None = None) -> None:
    """A slice table whose rows open the explorer: selecting a row shows exactly that slice's samples there.

    ``frame`` must hold ``slice_id`` (not necessarily shown). Without it the table is shown read-only.
    """
    if "slice_id" not in frame.columns:
        st.dataframe(frame[columns], hide_index=True, width="stretch", column_config=column_config)
        return
    generation = st.session_state.get(f"{key}.generation", 0)
    event = st.dataframe(
        frame[columns],
        hide_index=True,
        width="stretch",
        column_config=column_config,
        on_select="rerun",
        selection_mode="single-row",
        key=f"{key}.{generation}",
    )
    st.caption("Select a row to open that slice's samples in the explorer.")
    rows = list(event.selection.get("rows", [])) if event is not None else []
    if rows and 0 <= rows[0] < len(frame):
        spec = slice_filters(frame)[rows[0]]
        if spec is not None:
            # A fresh table key on return: the old selection must not send the user to the explorer again.
            st.session_state[f"{key}.generation"] = generation + 1
            open_in_explorer(spec)
        st.warning(
            "This slice's members are not stored (an older analysis): run `robustlens analyze` again "
            "to open slices in the explorer."
        )


PERCENT = st.column_config.NumberColumn(format="percent")
SLICE_FORMAT = {
    "accuracy": PERCENT,
    "error_rate": st.column_config.NumberColumn("error rate", format="percent"),
    "gap": st.column_config.NumberColumn("gap (error − overall)", format="percent"),
    "ci_low": st.column_config.NumberColumn("error CI low", format="percent"),
    "ci_high": st.column_config.NumberColumn("error CI high", format="percent"),
}
