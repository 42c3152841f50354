"""Overview: dataset health at a glance — counts, class balance, issues with examples, accuracy, worst slices."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from robustlens.dashboard import data
from robustlens.dashboard.components.frame import analysis_missing, run_page
from robustlens.dashboard.components.grid import thumbnail_grid
from robustlens.dashboard.components.markup import code, plot_text, text
from robustlens.dashboard.components.navigation import explorer_link
from robustlens.dashboard.components.slice_tables import SLICE_FORMAT, slice_columns, slice_table
from robustlens.query.filters import FilterSpec
from robustlens.query.sample_table import prediction_sets
from robustlens.query.summary import flagged_samples, issue_counts, most_severe, table_accuracy

EXAMPLES_PER_ISSUE = 6


def render() -> None:
    ws = data.workspace()
    info = data.summary()
    st.caption(
        f"Workspace {code(info['workspace'])} · dataset {code(info['dataset_root'])} ({text(info['dataset_kind'])})"
    )
    table = data.table()
    _headline(info, table)
    left, right = st.columns([3, 2])
    with left:
        st.subheader("Class balance")
        balance = data.balance().assign(**{"class": lambda f: f["class"].map(plot_text)})
        figure = px.bar(balance, x="class", y="count", hover_data={"share": ":.1%"})
        figure.update_layout(height=320, margin=dict(l=10, r=10, t=10, b=10), xaxis_title=None)
        st.plotly_chart(figure, width="stretch", key="overview.balance")
    with right:
        _models(info, table)
    _issues(table)
    _worst_slices()
    report = ws.ingest_report()
    if report.get("skipped") or report.get("warnings"):
        with st.expander(f"Ingest report: {len(report.get('skipped', []))} skipped image(s)"):
            for warning in report.get("warnings", []):
                st.warning(text(warning))
            if report.get("skipped"):
                st.dataframe(report["skipped"], hide_index=True, width="stretch")


def _headline(info: dict, table) -> None:
    cols = st.columns(5)
    cols[0].metric("Samples", f"{info['num_samples']:,}")
    cols[1].metric("Classes", len(info["classes"]))
    cols[2].metric("Skipped at ingest", f"{info['num_skipped']:,}")
    accuracies = {name: entry["accuracy"] for name, entry in info["prediction_sets"].items()}
    if accuracies:
        best = max(accuracies, key=lambda name: accuracies[name])
        cols[3].metric(f"Accuracy ({text(best)})", f"{accuracies[best]:.1%}")
    else:
        cols[3].metric("Accuracy", "—", help="No prediction set in this workspace")
    flagged = flagged_samples(table)
    if flagged is not None:
        cols[4].metric("Samples with issues", f"{flagged:,}", help=f"{flagged / max(len(table), 1):.1%} of all samples")
    else:
        cols[4].metric("Samples with issues", "—", help="Run `robustlens analyze` to find issues")


def _models(info: dict, table) -> None:
    st.subheader("Models")
    sets = prediction_sets(table)
    if sets:
        rows: dict[str, list[str]] = {"prediction set": [], "accuracy": [], "scores": []}
        for name in sets:
            rows["prediction set"].append(name)
            rows["accuracy"].append(f"{table_accuracy(table, name):.2%}")
            rows["scores"].append(info["prediction_sets"][name]["score_kind"])
        st.dataframe(rows, hide_index=True, width="stretch")
    else:
        st.info("No predictions yet: add them with `robustlens init --predictions`.")
    st.markdown(f"**Model:** {text(info['model'] or 'none')}")
    st.markdown("**Splits:** " + ", ".join(f"{text(k)} ({v:,})" for k, v in info["split_counts"].items()))
    if info["metadata_columns"]:
        st.markdown("**Metadata:** " + ", ".join(code(c) for c in info["metadata_columns"]))


def _issues(table) -> None:
    st.subheader("Issues")
    counts = issue_counts(table)
    if not counts:
        analysis_missing("issue flags (dark, blurry, duplicates, label errors, outliers …)")
        return
    for kind, count in counts.items():
        with st.container(border=True):
            head, link = st.columns([4, 1], vertical_alignment="center")
            head.markdown(f"**{text(kind.replace('_', ' '))}** — {count:,} samples ({count / max(len(table), 1):.1%})")
            spec = FilterSpec(issues=[kind], sort_by=f"issue.{kind}", descending=True)
            if count:
                with link:
                    explorer_link("Open in explorer", spec)
                worst = most_severe(table, kind, EXAMPLES_PER_ISSUE)
                thumbnail_grid(table, worst, columns=EXAMPLES_PER_ISSUE * 2, key=f"overview.{kind}", selectable=False)


def _worst_slices() -> None:
    st.subheader("Worst slices")
    worst = data.artifact("worst_slices")
    if worst is None:
        analysis_missing("slice analysis (where the model is weakest)")
        return
    if worst.empty:
        st.success("No slice is clearly worse than the rest.")
        return
    slice_table(worst.head(10), slice_columns(worst), key="overview.worst", column_config=SLICE_FORMAT)


if __name__ == "__main__":
    run_page("overview", render)
