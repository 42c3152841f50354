"""Embedding map: every sample as a point of the 2-D projection; lasso or box a region to filter or tag it.

The map shows the samples matching the sidebar filter *without* its map-region condition, so a region
filter can always be redrawn in context; the region in force is outlined. Above :data:`MAX_POINTS` points
a seeded random subset is drawn (and the page says so); a selection is a region, so it applies to every
sample inside it, drawn or not.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from robustlens.dashboard import data, state
from robustlens.dashboard.components.filter_panel import filter_panel
from robustlens.dashboard.components.frame import (
    analysis_missing,
    done,
    filtered_positions_or_stop,
    require_user,
    run_page,
)
from robustlens.dashboard.components.markup import plot_text
from robustlens.dashboard.components.navigation import open_in_explorer
from robustlens.errors import RobustlensError
from robustlens.query.filters import FilterSpec, region_mask
from robustlens.query.sample_table import display_name, issue_types, prediction_sets

MAX_POINTS = 50_000
CHART = "map.chart"
PALETTE = px.colors.qualitative.Dark24 + px.colors.qualitative.Light24
OTHER_COLOUR = "#9e9e9e"


def render() -> None:
    table = data.table()
    spec = filter_panel(table)
    if "map.x" not in table.columns:
        analysis_missing("embedding map (2-D projection of the image embeddings)")
        state.publish(spec)
        return
    context = filtered_positions_or_stop(table, spec.replace(region=[], sort_by=None))
    options = colour_options(table)
    if "map.colour" not in st.session_state and state.url_value("color") in options:
        st.session_state["map.colour"] = state.url_value("color")
    colour = st.selectbox("Colour by", options, key="map.colour", format_func=_colour_label)
    shown = downsample(context, MAX_POINTS)
    if len(shown) < len(context):
        st.caption(
            f"Showing a random {len(shown):,} of {len(context):,} matching samples (WebGL keeps up to "
            f"{MAX_POINTS:,}); selections apply to every sample in the region."
        )
    else:
        st.caption(f"{len(context):,} samples shown.")
    figure, legend = build_figure(table, shown, colour, spec.region)
    event = st.plotly_chart(
        figure,
        key=CHART,
        on_select="rerun",
        selection_mode=("lasso", "box"),
        config={"scrollZoom": True, "displaylogo": False},
    )
    if legend:
        st.html(legend)  # HTML built by build_figure: every category name in it is escaped
    polygon = selection_polygon(event.selection if event is not None else None)
    if polygon:
        _selection_actions(table, context, spec, polygon)
    elif spec.region:
        inside = int(region_mask(table.iloc[context], spec.region).sum())
        st.info(f"Map region filter in force: {inside:,} samples. Clear it in the sidebar.")
    else:
        st.caption("No selection yet.")
    state.publish(spec, {"color": colour if colour != "label" else None})


def colour_options(table: pd.DataFrame) -> list[str]:
    """Columns a map can be coloured by: label, split, predictions and correctness, issues, scores, metrics."""
    options = ["label", "split"]
    for name in prediction_sets(table):
        options += [f"pred.{name}.label", f"pred.{name}.correct", f"pred.{name}.confidence"]
    options += [f"issue.{kind}" for kind in issue_types(table)]
    options += [c for c in ("issue_count", "max_severity", "label_issue.label_quality") if c in table.columns]
    options += [c for c in table.columns if c.startswith("metric.")]
    return options


def _colour_label(column: str) -> str:
    return "label (given)" if column == "label" else display_name(column)


def downsample(positions: np.ndarray, limit: int, *, random_state: int = 0) -> np.ndarray:
    """At most ``limit`` of ``positions`` (a seeded uniform sample, in table order)."""
    if len(positions) <= limit:
        return positions
    rng = np.random.default_rng(random_state)
    return np.sort(rng.choice(positions, size=limit, replace=False))


def build_figure(
    table: pd.DataFrame, positions: np.ndarray, colour: str, region: list[list[float]]
) -> tuple[go.Figure, str]:
    """One ``Scattergl`` trace (``customdata`` = sample id, HTML-escaped) and an HTML legend for categorical colours.

    Category names and sample ids are user strings: they are HTML-escaped (:func:`plot_text`) in
    the legend and in the hover text, which plotly parses as HTML.

    Colours are numbers (category codes on a stepped colour scale, or the metric itself), never one colour
    string per point: plotly then ships them as a typed array, which keeps 50k points fast.
    """
    rows = table.iloc[positions]
    values = rows[colour]
    legend = ""
    marker: dict = {"size": 5 if len(rows) > 5000 else 7, "opacity": 0.8}
    if isinstance(values.dtype, pd.CategoricalDtype) or pd.api.types.is_bool_dtype(values) or values.dtype == object:
        codes, names = _categories(values)
        colours = [PALETTE[i % len(PALETTE)] for i in range(len(names))] + [OTHER_COLOUR]
        marker.update(color=codes, cmin=-0.5, cmax=len(names) + 0.5, colorscale=_stepped(colours), showscale=False)
        present = set(np.unique(codes).tolist())
        legend = " ".join(
            f"<span style='white-space:nowrap;margin-right:.8em'>"
            f"<span style='color:{colours[i]}'>●</span> {plot_text(name)}</span>"
            for i, name in enumerate(names)
            if i in present
        )
    else:
        marker.update(
            color=values.to_numpy(dtype=float, na_value=np.nan),
            colorscale="Viridis",
            showscale=True,
            colorbar={"title": {"text": plot_text(_colour_label(colour))}, "thickness": 12},
        )
    figure = go.Figure(
        go.Scattergl(
            x=rows["map.x"].to_numpy(),
            y=rows["map.y"].to_numpy(),
            mode="markers",
            customdata=_hover_ids(rows["id"]),
            marker=marker,
            hovertemplate="%{customdata}<extra></extra>",
        )
    )
    if region:
        xs = [p[0] for p in region] + [region[0][0]]
        ys = [p[1] for p in region] + [region[0][1]]
        path = "M " + " L ".join(f"{x},{y}" for x, y in zip(xs, ys, strict=True)) + " Z"
        figure.add_shape(type="path", path=path, line={"color": "#d62728", "width": 2, "dash": "dot"})
    figure.update_layout(
        height=620,
        margin=dict(l=10, r=10, t=10, b=10),
        dragmode="lasso",
        showlegend=False,
        xaxis={"visible": False},
        yaxis={"visible": False, "scaleanchor": "x"},
        plot_bgcolor="white",
    )
    return figure, legend


def _hover_ids(ids: pd.Series) -> np.ndarray:
    """Sample ids as plotly shows them in hover text (HTML-escaped; only ids holding ``<``, ``>`` or ``&`` change,
    so the common case costs one vectorised scan)."""
    ids = ids.astype(str)
    if ids.str.contains("[<>&]", regex=True).any():
        ids = ids.map(plot_text)
    return ids.to_numpy()


def _categories(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Integer code per point (missing values get the last code, ``len(names)``) and the category names."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        names = [str(c) for c in values.cat.categories]
        codes = values.cat.codes.to_numpy()
    else:
        codes, uniques = pd.factorize(values, sort=True)
        names = [str(u) for u in uniques]
    return np.where(codes < 0, len(names), codes).astype(np.float32), names


def _stepped(colours: list[str]) -> list[list]:
    """A colour scale mapping code ``k`` (of ``len(colours)``) to ``colours[k]`` exactly."""
    steps = []
    for k, colour in enumerate(colours):
        steps += [[k / len(colours), colour], [(k + 1) / len(colours), colour]]
    return steps


def selection_polygon(selection) -> list[list[float]]:
    """The last lasso or box of a plotly selection state as a polygon ``[[x, y], …]`` (empty: none)."""
    if not selection:
        return []
    lasso = selection.get("lasso") or []
    box = selection.get("box") or []
    if lasso:
        last = lasso[-1]
        return [[_round(x), _round(y)] for x, y in zip(last.get("x", []), last.get("y", []), strict=False)]
    if box:
        last = box[-1]
        (x0, x1), (y0, y1) = sorted(last["x"][:2]), sorted(last["y"][:2])
        return [[_round(x0), _round(y0)], [_round(x1), _round(y0)], [_round(x1), _round(y1)], [_round(x0), _round(y1)]]
    return []


def _round(value: float) -> float:
    return float(f"{float(value):.6g}")


def _selection_actions(table: pd.DataFrame, context: np.ndarray, spec: FilterSpec, polygon: list[list[float]]) -> None:
    inside = context[region_mask(table.iloc[context], polygon)]
    with st.container(border=True):
        st.markdown(f"**{len(inside):,} samples selected** in the drawn region.")
        if len(inside) == 0:
            return
        filter_col, tag_col = st.columns([1, 2])
        with filter_col:
            if st.button("Use as filter", key="map.use_filter", icon=":material/filter_alt:"):
                state.set_filter(spec.replace(region=polygon), reseed=False)
                st.rerun()
            if st.button("Open in explorer", key="map.open", icon=":material/grid_view:"):
                open_in_explorer(spec.replace(region=polygon))
        with tag_col, st.form("map.tag_form", clear_on_submit=True, border=False):
            left, right = st.columns([2, 1], vertical_alignment="bottom")
            tag = left.text_input("Tag the selected samples", key="map.tag", placeholder="e.g. cluster-shoes")
            submitted = right.form_submit_button(f"Tag {len(inside):,} samples", icon=":material/sell:")
        if submitted:
            user = require_user()
            if user and tag.strip():
                ids = table["id"].iloc[inside].tolist()
                try:
                    count = data.curation().add_tag(ids, tag.strip(), user=user)
                except RobustlensError as exc:  # refused tag, a write conflict, the database unreachable
                    state.notice(f"Not tagged: {exc}", "error")
                    st.rerun()
                done(f"Tagged {count:,} sample(s) '{tag.strip()}' from the map selection.")
            elif user:
                st.warning("Type a tag name first.")


if __name__ == "__main__":
    run_page("embedding_map", render)
