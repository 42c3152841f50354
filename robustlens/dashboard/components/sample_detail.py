"""One sample: image, facts, predictions, issues, tags, review decisions, metrics and nearest neighbours."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import streamlit as st

from robustlens.dashboard import data
from robustlens.dashboard.components.bulk_curation import tag_samples
from robustlens.dashboard.components.grid import thumbnail_grid
from robustlens.dashboard.components.markup import code, text
from robustlens.query.sample_table import display_name, prediction_sets


def sample_detail(
    table: pd.DataFrame, position: int, *, key: str, on_open: Callable[[str], None] | None = None
) -> None:
    """Everything about one sample: image, facts, predictions, issues, tags, decisions, metrics, neighbours."""
    row = table.iloc[position]
    sample_id = row["id"]
    workspace = data.workspace()
    st.subheader(text(sample_id))
    image_col, facts_col = st.columns([1, 1])
    with image_col:
        path = data.thumbnails([position])[0]
        if path:
            st.image(path, width="stretch", output_format="JPEG")
        else:
            st.warning("The image file cannot be read any more.")
    with facts_col:
        facts = {
            "label": row["label"],
            "split": row["split"],
            "path": row["path"],
            "size": f"{row['width']}×{row['height']} {row['mode']}",
        }
        if "label_issue.suggested_label" in row.index and pd.notna(row["label_issue.suggested_label"]):
            facts["suggested label"] = row["label_issue.suggested_label"]
            facts["label quality"] = f"{row['label_issue.label_quality']:.3f}"
        st.markdown("\n".join(f"- **{k}:** {text(v)}" for k, v in facts.items()))
        st.caption(f"File: {code(workspace.image_path(row['path']))}")
    _predictions_block(table, row, position)
    issues = data.sample_issues(sample_id)
    if len(issues):
        st.markdown("**Issues**")
        st.dataframe(issues, hide_index=True, width="stretch")
    else:
        st.caption("No issues flagged." if "issue_count" in table.columns else "Issues: run `robustlens analyze`.")
    _tags_block(sample_id, key)
    history = data.curation().decision_history(sample_id)
    if history:
        st.markdown("**Review decisions**")
        st.dataframe(
            pd.DataFrame(history)[["created_by", "action", "new_label", "note", "created_at"]].rename(
                columns={"created_by": "created by", "new_label": "new label", "created_at": "created at"}
            ),
            hide_index=True,
            width="stretch",
        )
    metrics = [c for c in table.columns if c.startswith("metric.")]
    if metrics:
        with st.expander("Metrics"):
            st.dataframe(
                pd.DataFrame({"metric": [display_name(c) for c in metrics], "value": [float(row[c]) for c in metrics]}),
                hide_index=True,
                width="stretch",
            )
    neighbours_block(table, position, key=key, on_open=on_open)


def _predictions_block(table: pd.DataFrame, row: pd.Series, position: int) -> None:
    sets = prediction_sets(table)
    if not sets:
        return
    classes = list(table["label"].cat.categories)
    lines = []
    for name in sets:
        probabilities = data.probabilities(name, position)
        top = np.argsort(probabilities)[::-1][:3]
        verdict = "✓" if row[f"pred.{name}.correct"] else "✗"
        ranked = ", ".join(f"{text(classes[i])} {probabilities[i]:.2f}" for i in top)
        lines.append(f"- **{text(name)}** {verdict} {text(row[f'pred.{name}.label'])} — {ranked}")
    st.markdown("**Predictions**\n" + "\n".join(lines))


def _tags_block(sample_id: str, key: str) -> None:
    store = data.curation()
    tags = store.tags_of(sample_id)
    st.markdown("**Tags:** " + (", ".join(code(t) for t in tags) if tags else "none"))
    with st.form(f"{key}.tagform", clear_on_submit=True, border=False):
        left, right = st.columns([3, 1], vertical_alignment="bottom")
        tag = left.text_input("Add a tag to this sample", key=f"{key}.tag_one")
        submitted = right.form_submit_button("Add")
    if submitted:
        tag_samples([sample_id], tag, remove=False)
    if tags:
        remove = st.selectbox("Remove a tag", tags, index=None, key=f"{key}.untag", placeholder="choose a tag")
        if remove and st.button("Remove", key=f"{key}.untag_btn"):
            tag_samples([sample_id], remove, remove=True)


def neighbours_block(table: pd.DataFrame, position: int, *, key: str, on_open: Callable[[str], None] | None) -> None:
    found = data.neighbours(position, k=6)
    if not found:
        st.caption("Nearest neighbours need embeddings: run `robustlens analyze`.")
        return
    st.markdown("**Nearest neighbours** (embedding cosine)")
    similarity = dict(found)
    positions = np.array([p for p, _ in found])
    thumbnail_grid(
        table,
        positions,
        columns=6,
        key=f"{key}.nn",
        selectable=False,
        on_open=on_open,
        caption=lambda r: f"{r['label']} · cos {similarity[int(r.name)]:.3f}",
    )
