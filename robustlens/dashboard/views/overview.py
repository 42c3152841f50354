"""Overview: dataset health at a glance — counts, class balance, accuracy, a page of thumbnails."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from robustlens.dashboard import data

THUMBNAILS_PER_PAGE = 48
COLUMNS = 12


def render() -> None:
    ws = data.workspace()
    key = data.cache_key()
    info = data.summary(*key)
    st.title("Overview")
    st.caption(f"Workspace `{info['workspace']}` · dataset `{info['dataset_root']}` ({info['dataset_kind']})")

    cols = st.columns(4)
    cols[0].metric("Samples", f"{info['num_samples']:,}")
    cols[1].metric("Classes", len(info["classes"]))
    cols[2].metric("Skipped at ingest", f"{info['num_skipped']:,}")
    accuracies = data.accuracies(*key)
    if accuracies:
        best = max(accuracies, key=accuracies.get)
        cols[3].metric(f"Accuracy ({best})", f"{accuracies[best]:.1%}")
    else:
        cols[3].metric("Accuracy", "—", help="No prediction set in this workspace")

    left, right = st.columns([3, 2])
    with left:
        st.subheader("Class balance")
        balance = data.balance(*key)
        figure = px.bar(balance, x="class", y="count", hover_data={"share": ":.1%"})
        figure.update_layout(height=320, margin=dict(l=10, r=10, t=10, b=10), xaxis_title=None)
        st.plotly_chart(figure, width="stretch")
    with right:
        st.subheader("Models")
        if accuracies:
            st.dataframe({"prediction set": list(accuracies), "accuracy": [f"{a:.2%}" for a in accuracies.values()],
                          "scores": [info["prediction_sets"][n]["score_kind"] for n in accuracies]},
                         hide_index=True, width="stretch")
        else:
            st.info("No predictions yet: add them with `robustlens init --predictions`.")
        st.write(f"**Model:** {info['model'] or 'none'}")
        st.write("**Splits:** " + ", ".join(f"{k} ({v:,})" for k, v in info["split_counts"].items()))
        if info["metadata_columns"]:
            st.write("**Metadata:** " + ", ".join(f"`{c}`" for c in info["metadata_columns"]))

    _thumbnails(ws, key)
    report = ws.ingest_report()
    if report.get("skipped") or report.get("warnings"):
        with st.expander(f"Ingest report: {len(report.get('skipped', []))} skipped image(s)"):
            for warning in report.get("warnings", []):
                st.warning(warning)
            if report.get("skipped"):
                st.dataframe(report["skipped"], hide_index=True, width="stretch")


def _thumbnails(ws, key) -> None:
    st.subheader("Samples")
    samples = ws.samples
    pages = max(1, -(-len(samples) // THUMBNAILS_PER_PAGE))
    page = st.columns([1, 5])[0].number_input(f"Page (of {pages})", min_value=1, max_value=pages, value=1, step=1,
                                              key="overview_page")
    start = (page - 1) * THUMBNAILS_PER_PAGE
    chunk = samples.iloc[start:start + THUMBNAILS_PER_PAGE]
    predicted = None
    if ws.prediction_names:
        predicted = data.predicted_labels(*key, ws.prediction_names[0])
    for row_start in range(0, len(chunk), COLUMNS):
        cols = st.columns(COLUMNS)
        for col, (position, row) in zip(cols, chunk.iloc[row_start:row_start + COLUMNS].iterrows(), strict=False):
            caption = row["label"]
            if predicted is not None and predicted[position] != row["label"]:
                caption = f"{row['label']} → {predicted[position]}"
            col.image(str(ws.image_path(row["path"])), caption=caption, width="stretch")
