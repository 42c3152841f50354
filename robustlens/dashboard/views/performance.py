"""Model performance: accuracy, confusion matrix (click a cell to see its samples), per-class table,
calibration, metric importance, accuracy by metric and the slice table — two prediction sets side by side."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from robustlens.dashboard import data
from robustlens.dashboard.components.frame import analysis_missing, run_page
from robustlens.dashboard.components.markup import plot_text, text
from robustlens.dashboard.components.navigation import open_in_explorer
from robustlens.dashboard.components.slice_tables import SLICE_FORMAT, slice_columns, slice_table
from robustlens.query.filters import FilterSpec
from robustlens.query.sample_table import prediction_sets
from robustlens.query.summary import (
    confusion_counts,
    constant_metrics,
    per_class_recall,
    table_accuracy,
    varying_metrics,
)

CHART_GENERATION = "perf.chart_generation"
#: Metric-importance columns to chart, in order of preference (the first one present is used).
IMPORTANCE_COLUMNS = ("importance", "mutual_information", "accuracy_spread")


def render() -> None:
    table = data.table()
    sets = prediction_sets(table)
    if not sets:
        st.info("This workspace has no predictions. Add them with `robustlens init --predictions NAME=FILE`.")
        return
    chosen = sets
    if len(sets) > 2:
        chosen = (
            st.multiselect("Prediction sets to compare", sets, default=sets[:2], max_selections=2, key="perf.sets")
            or sets[:1]
        )
    for column, name in zip(st.columns(len(chosen), gap="large"), chosen, strict=True):
        with column:
            _prediction_set(table, name, first=name == sets[0])
    _slices()


def _prediction_set(table: pd.DataFrame, name: str, *, first: bool) -> None:
    st.subheader(text(name))
    report = data.evaluation(name) or {}
    accuracy = table_accuracy(table, name)
    cols = st.columns(3)
    cols[0].metric("Accuracy", f"{accuracy:.2%}")
    top_k = report.get("top_k_accuracy") or report.get("top_k") or {}
    top = max((int(k) for k in top_k), default=None)
    cols[1].metric(f"Top-{top} accuracy" if top else "Top-k accuracy", f"{top_k[str(top)]:.2%}" if top else "—")
    cols[2].metric(
        "ECE",
        f"{report['ece']:.3f}" if "ece" in report else "—",
        help="Expected calibration error: average gap between confidence and accuracy",
    )
    counts = confusion_counts(table, name)
    _confusion_chart(counts, name, first=first)
    _per_class(report, counts)
    _calibration(report, name)
    importance = data.artifact(f"metric_importance_{name}")
    _importance(importance, name)
    _curves(importance, name)
    if not report:
        analysis_missing(f"evaluation report for '{name}' (top-k, calibration, per-class table)")


def _confusion_chart(counts: pd.DataFrame, name: str, *, first: bool) -> None:
    st.markdown("**Confusion matrix** — click a cell to open its samples")
    classes = list(counts.index)
    # Class names are user strings and plotly parses tick and hover text as HTML: it gets them escaped, and a
    # click's escaped name is mapped back to the class.
    shown = [plot_text(c) for c in classes]
    original = dict(zip(shown, classes, strict=True))
    values = counts.to_numpy()
    figure = go.Figure(
        go.Heatmap(
            z=values,
            x=shown,
            y=shown,
            colorscale="Blues",
            showscale=False,
            text=values,
            texttemplate="%{text}",
            hoverinfo="skip",
        )
    )
    # Heatmap cells cannot be selected; an invisible square marker on each cell takes the clicks and the hover.
    grid_x, grid_y = np.meshgrid(shown, shown)
    figure.add_scatter(
        x=grid_x.ravel(),
        y=grid_y.ravel(),
        mode="markers",
        customdata=values.ravel(),
        hovertemplate="given %{y}<br>predicted %{x}<br>%{customdata} samples<extra></extra>",
        marker={"symbol": "square", "size": max(6, 360 // max(len(classes), 1)), "opacity": 0.01},
    )
    figure.update_layout(
        height=440,
        margin=dict(l=10, r=10, t=10, b=10),
        xaxis_title="predicted",
        yaxis_title="given",
        yaxis={"autorange": "reversed"},
        showlegend=False,
    )
    generation = st.session_state.get(CHART_GENERATION, 0)
    event = st.plotly_chart(
        figure, key=f"perf.cm.{name}.{generation}", on_select="rerun", selection_mode="points", width="stretch"
    )
    points = event.selection.get("points", []) if event is not None else []
    if points:
        given, predicted = original.get(points[0].get("y")), original.get(points[0].get("x"))
        if given is not None and predicted is not None and given in classes and predicted in classes:
            # A fresh chart key on return: the old click must not send the user to the explorer again.
            st.session_state[CHART_GENERATION] = generation + 1
            open_in_explorer(_cell_spec(name, given, predicted, first=first))
    cells = [(g, p, int(counts.loc[g, p])) for g in classes for p in classes if g != p and counts.loc[g, p] > 0]
    cells.sort(key=lambda cell: -cell[2])
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    cell = left.selectbox(
        "Or pick a confusion",
        cells,
        index=None,
        key=f"perf.cell.{name}",
        format_func=lambda c: f"{c[0]} → {c[1]} ({c[2]:,})",
        placeholder="given → predicted",
    )
    if right.button("Open in explorer", key=f"perf.open.{name}", disabled=cell is None) and cell is not None:
        open_in_explorer(_cell_spec(name, cell[0], cell[1], first=first))


def _cell_spec(name: str, given: str, predicted: str, *, first: bool) -> FilterSpec:
    return FilterSpec(
        labels=[given],
        predicted=[predicted],
        prediction_set=None if first else name,
        sort_by=f"pred.{name}.confidence",
        descending=True,
    )


def _per_class(report: dict, counts: pd.DataFrame) -> None:
    # the evaluation stage's table when it ran, else recall from the counts shown
    frame = pd.DataFrame(report["per_class"]) if report.get("per_class") else per_class_recall(counts)
    with st.expander("Per-class table", expanded=False):
        st.dataframe(frame, hide_index=True, width="stretch")


def _calibration(report: dict, name: str) -> None:
    bins = (
        (report.get("calibration") or {}).get("bins")
        if isinstance(report.get("calibration"), dict)
        else report.get("calibration")
    )
    if not bins:
        return
    frame = pd.DataFrame(bins)
    if "count" in frame.columns:
        frame = frame[frame["count"] > 0]
    figure = go.Figure()
    width = (frame["upper"] - frame["lower"]) * 0.9 if {"lower", "upper"} <= set(frame.columns) else 0.05
    figure.add_bar(
        x=frame["confidence"],
        y=frame["accuracy"],
        name="accuracy",
        width=width,
        customdata=frame.get("count"),
        hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>%{customdata} samples<extra></extra>",
    )
    figure.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration", line={"dash": "dash"})
    figure.update_layout(
        height=280,
        margin=dict(l=10, r=10, t=30, b=10),
        xaxis={"range": [0, 1], "title": "confidence"},
        yaxis={"range": [0, 1], "title": "accuracy"},
        title={"text": "Reliability diagram", "font": {"size": 13}},
        legend={"orientation": "h"},
    )
    st.plotly_chart(figure, width="stretch", key=f"perf.calibration.{name}")


def _importance(frame: pd.DataFrame | None, name: str) -> None:
    """The importance chart of prediction set ``name`` from its ``metric_importance_<name>`` artifact (``frame``)."""
    if frame is None or frame.empty:
        return
    if "metric" not in frame.columns:
        return
    value = next((c for c in IMPORTANCE_COLUMNS if c in frame.columns), None)
    if value is None:
        return
    constant = constant_metrics(frame, value)
    ordered = frame[~frame["metric"].astype(str).isin(constant)].sort_values(value)
    figure = go.Figure(go.Bar(x=ordered[value], y=ordered["metric"].astype(str).map(plot_text), orientation="h"))
    figure.update_layout(
        height=60 + 22 * len(ordered),
        margin=dict(l=10, r=10, t=30, b=10),
        xaxis_title=value.replace("_", " "),
        title={"text": "Which image metrics go with errors", "font": {"size": 13}},
    )
    st.plotly_chart(figure, width="stretch", key=f"perf.importance.{name}")
    if constant:
        st.caption(f"Left out, constant on this dataset: {', '.join(map(text, constant))}.")


def _curves(importance: pd.DataFrame | None, name: str) -> None:
    """Accuracy by one metric (``metric_curves_<name>``), offering the metrics that vary, ordered by ``importance``."""
    frame = data.artifact(f"metric_curves_{name}")
    if frame is None or frame.empty or "metric" not in frame.columns:
        return
    options = varying_metrics(frame, importance)
    if not options:
        return
    metric = st.selectbox("Accuracy by metric", options, key=f"perf.curve.{name}")
    rows = frame[frame["metric"] == metric]
    if "mean_value" in rows.columns:
        x = rows["mean_value"]
    elif {"lower", "upper"} <= set(rows.columns):
        x = (rows["lower"] + rows["upper"]) / 2
    else:
        x = rows["bin"]
    figure = go.Figure()
    if {"ci_low", "ci_high"} <= set(rows.columns):
        figure.add_scatter(
            x=list(x) + list(x)[::-1],
            y=list(rows["ci_high"]) + list(rows["ci_low"])[::-1],
            fill="toself",
            mode="none",
            fillcolor="rgba(31,119,180,0.15)",
            hoverinfo="skip",
            name="95% interval",
        )
    figure.add_scatter(
        x=x,
        y=rows["accuracy"],
        mode="lines+markers",
        name="accuracy",
        customdata=rows.get("count"),
        hovertemplate="%{x:.3g}: accuracy %{y:.1%}<br>%{customdata} samples<extra></extra>",
    )
    figure.update_layout(
        height=260,
        margin=dict(l=10, r=10, t=10, b=10),
        xaxis_title=plot_text(metric),
        showlegend=False,
        yaxis={"title": "accuracy", "tickformat": ".0%"},
    )
    st.plotly_chart(figure, width="stretch", key=f"perf.curves.{name}")


def _slices() -> None:
    st.subheader("Slices")
    slices = data.artifact("slices")
    if slices is None:
        analysis_missing("slice analysis")
        return
    worst = data.artifact("worst_slices")
    if worst is not None and not worst.empty:
        st.markdown("**Worst slices** (large and much worse than average)")
        slice_table(worst, slice_columns(worst), key="perf.worst", column_config=SLICE_FORMAT)
    with st.expander(f"All {len(slices):,} slices"):
        slice_table(slices, slice_columns(slices), key="perf.slices", column_config=SLICE_FORMAT)


if __name__ == "__main__":
    run_page("performance", render)
