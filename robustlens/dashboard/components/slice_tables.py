"""Slice tables (worst slices, all slices, robustness per slice) whose rows open the explorer on exactly
that slice's samples. A row's filter comes from its ``slice_id`` and ``kind`` columns, matched whole by
:func:`robustlens.query.slices.slice_row_filter` (never parsed out of the text shown)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from robustlens.dashboard import data
from robustlens.dashboard.components.navigation import open_in_explorer
from robustlens.query.slices import slice_row_filter


def slice_columns(frame: pd.DataFrame) -> list[str]:
    """The slice-table columns worth showing, in order."""
    return [
        c
        for c in ("rank", "description", "size", "accuracy", "error_rate", "gap", "ci_low", "ci_high", "score")
        if c in frame.columns
    ]


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
        classes = [str(name) for name in data.table()["label"].cat.categories]
        spec = slice_row_filter(frame.iloc[rows[0]], data.slice_membership(), classes)
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
