"""The thumbnail grid: captions, select boxes (the session's selection) and Details buttons."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import streamlit as st

from robustlens.dashboard import data, state
from robustlens.dashboard.components.markup import text
from robustlens.query.sample_table import prediction_sets


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


def thumbnail_grid(
    table: pd.DataFrame,
    positions: np.ndarray,
    *,
    columns: int,
    key: str,
    selectable: bool = True,
    on_open: Callable[[str], None] | None = None,
    caption: Callable[[pd.Series], str] | None = None,
) -> None:
    """Thumbnails of the rows at ``positions`` in ``columns`` columns, with select boxes and Details buttons."""
    if len(positions) == 0:
        return
    paths = data.thumbnails(positions)
    chosen = set(state.selection())
    rows = table.iloc[positions]
    for start in range(0, len(positions), columns):
        cells = st.columns(columns)
        for cell, (_, row), path in zip(
            cells, rows.iloc[start : start + columns].iterrows(), paths[start : start + columns], strict=False
        ):
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
                    st.button(
                        "Details",
                        key=f"{key}.open.{sample_id}",
                        on_click=on_open,
                        args=(sample_id,),
                        type="tertiary",
                        help=f"Show everything about {text(sample_id)}",
                    )


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
