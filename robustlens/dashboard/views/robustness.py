"""Robustness: how the model breaks under common corruptions and adversarial attacks, what randomized
smoothing certifies, whether the attacks were strong enough (self-checks), which slices are least robust,
and, for one sample, its clean / corrupted / adversarial versions side by side.

Reads the artifacts of ``robustlens robustness WORKSPACE`` (see :mod:`robustlens.analysis.robustness.run`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from robustlens.dashboard import data, widgets

SUMMARY_FILE = "robustness_summary.json"
EXAMPLES_FILE = "robustness_examples.npz"
SAMPLE_KEY = "rob.sample"
#: Display size (pixels) the example images are upscaled to, nearest-neighbour so pixels stay visible.
DISPLAY_PIXELS = 168


# -- reading ---------------------------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=4)
def _summary(path: str, stamp: tuple) -> dict | None:
    file = Path(path) / "artifacts" / SUMMARY_FILE
    return json.loads(file.read_text(encoding="utf-8")) if file.exists() else None


@st.cache_data(show_spinner=False, max_entries=4)
def _examples(path: str, stamp: tuple) -> dict[str, np.ndarray] | None:
    file = Path(path) / "artifacts" / EXAMPLES_FILE
    if not file.exists():
        return None
    with np.load(file, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def summary() -> dict | None:
    """``robustness_summary.json`` or ``None`` when the robustness run has not happened."""
    return _summary(str(data.workspace().root), data.artifacts_stamp())


def examples() -> dict[str, np.ndarray] | None:
    """Arrays of ``robustness_examples.npz`` (see ``example_images`` in the run module) or ``None``."""
    return _examples(str(data.workspace().root), data.artifacts_stamp())


# -- the page ----------------------------------------------------------------------------------------------------
def render() -> None:
    widgets.start_page("Robustness", "Common corruptions, adversarial attacks and certified robustness of the "
                                     "workspace model, on a stratified sample of the data.")
    workspace = data.workspace()
    report = summary()
    if report is None:
        if not workspace.has_model:
            st.info("This workspace has no model, so its robustness cannot be measured. Create it with "
                    "`robustlens init WS --data DIR --model model.pt --model-config model.json`.",
                    icon=":material/info:")
        else:
            st.info(f"No robustness results yet. Run {widgets.code(f'robustlens robustness {workspace.root}')} to "
                    "compute them, "
                    "then reload this page.", icon=":material/info:")
        return
    _self_check_status(report)
    _headline(report)
    _corruptions(report)
    _attacks(report)
    _certified(report)
    _slices()
    _example_viewer(report)


def _pct(value) -> str:
    return "—" if value is None else f"{value:.1%}"


def _self_check_status(report: dict) -> None:
    check = report.get("self_check", {})
    for warning in report.get("warnings", []):
        st.warning(widgets.text(warning), icon=":material/warning:")
    if not check.get("attacks"):
        st.info("No attacks were run, so there is no attack self-check.", icon=":material/info:")
    elif check.get("passed"):
        names = ", ".join(check["attacks"])
        st.success(f"Self-checks passed: every attack ({names}) found the adversarial examples known to exist in "
                   "its active test, and no gradient-masking symptom was seen.", icon=":material/verified:")
    with st.expander("Self-check details"):
        rows = [{"attack": name, "norm": c["norm"], "eps": c["eps"], "passed": c["passed"],
                 "success rate": c["success_rate"], "needed": c["threshold"], "samples": c["n_evaluated"]}
                for name, c in check.get("attacks", {}).items()]
        if rows:
            st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
        for norm, masking in check.get("masking", {}).items():
            flags = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in masking["flags"].items())
            st.markdown(f"**Gradient masking ({norm})** — {flags}; zero-gradient fraction "
                        f"{masking['zero_grad_fraction']:.0%}, white-box success "
                        + ", ".join(f"{k} {_pct(v)}" for k, v in masking["whitebox_success"].items())
                        + (f", black-box (Square) {_pct(masking['blackbox_success'])}"
                           if masking.get("blackbox_success") is not None else ""))


def _headline(report: dict) -> None:
    counts = report["num_samples"]
    st.caption(f"{counts['evaluated']:,} of {counts['workspace']:,} samples evaluated under corruptions, "
               f"{counts['attacked']:,} attacked, {counts['certified']:,} certified.")
    cols = st.columns(5)
    cols[0].metric("Clean accuracy", _pct(report.get("clean_accuracy")))
    corruptions = report.get("corruptions")
    cols[1].metric("Corruption accuracy", _pct(corruptions["mean_accuracy"]) if corruptions else "—",
                   help="Mean over every corruption × severity")
    linf = report.get("attacks", {}).get("linf")
    if linf:
        index = int(np.argmin(np.abs(np.array(linf["eps"]) - linf["reference_eps"])))
        cols[2].metric(f"Robust acc. L∞ {linf['reference_eps'] * 255:.3g}/255",
                       _pct(linf["worst_case_robust_accuracy"][index]), help="Worst case over every L∞ attack")
    else:
        cols[2].metric("Robust accuracy", "—", help="No L∞ attack was run")
    certified = report.get("certified")
    cols[3].metric(f"Certified acc. r = {certified['reference_radius']:.3g}" if certified else "Certified accuracy",
                   _pct(certified["certified_accuracy_at_reference"]) if certified else "—",
                   help="Randomized smoothing (Cohen et al.), L2 radius in pixel units")
    fragile = report.get("fragile", {})
    cols[4].metric("Fragile samples", f"{fragile.get('count', 0):,}",
                   help="Correct, but broken by a tiny attack or by the mildest corruptions; issue 'fragile'")


def _corruptions(report: dict) -> None:
    table = data.artifact("robustness_corruptions")
    if table is None or table.empty:
        return
    st.subheader("Corruptions")
    left, right = st.columns([3, 2])
    grid = table.pivot(index="corruption", columns="severity", values="accuracy")
    grid = grid.reindex(list(dict.fromkeys(table["corruption"])))
    with left:
        figure = go.Figure(go.Heatmap(
            z=grid.to_numpy(), x=[str(s) for s in grid.columns], y=list(grid.index), zmin=0, zmax=1,
            colorscale="RdYlGn", text=np.round(grid.to_numpy() * 100, 1), texttemplate="%{text}",
            hovertemplate="%{y}, severity %{x}<br>accuracy %{z:.1%}<extra></extra>", colorbar={"title": "accuracy"}))
        figure.update_layout(height=max(260, 28 * len(grid) + 80), margin=dict(l=10, r=10, t=30, b=10),
                             xaxis_title="severity", yaxis={"autorange": "reversed"},
                             title="Accuracy per corruption × severity")
        st.plotly_chart(figure, width="stretch", key="rob.heatmap")
    with right:
        figure = go.Figure()
        clean = report.get("clean_accuracy")
        by_family = table.groupby(["family", "severity"])["accuracy"].mean().reset_index()
        for family, rows in by_family.groupby("family"):
            figure.add_scatter(x=rows["severity"], y=rows["accuracy"], mode="lines+markers", name=family)
        overall = table.groupby("severity")["accuracy"].mean()
        figure.add_scatter(x=overall.index, y=overall.to_numpy(), mode="lines+markers", name="all corruptions",
                           line={"width": 4, "color": "black"})
        if clean is not None:
            figure.add_hline(y=clean, line_dash="dot", annotation_text="clean")
        figure.update_layout(height=360, margin=dict(l=10, r=10, t=30, b=10), title="Accuracy vs severity",
                             xaxis={"title": "severity", "dtick": 1}, yaxis={"title": "accuracy", "range": [0, 1.02]})
        st.plotly_chart(figure, width="stretch", key="rob.severity")


def _attacks(report: dict) -> None:
    curves = data.artifact("robustness_curves")
    if curves is None or curves.empty:
        return
    st.subheader("Adversarial attacks")
    st.caption("Robust accuracy = correct and not changed by the attack; the worst case counts a sample robust only "
               "if it survives every attack of that norm. An attack that broke a sample at ε also counts it broken "
               "at larger ε.")
    norms = list(dict.fromkeys(curves["norm"]))
    for column, norm in zip(st.columns(len(norms)), norms, strict=True):
        rows = curves[curves["norm"] == norm]
        figure = go.Figure()
        for attack, points in rows.groupby("attack", sort=False):
            worst = attack == "worst_case"
            x = points["eps"] * (255 if norm == "linf" else 1)
            figure.add_scatter(x=x, y=points["robust_accuracy"], mode="lines+markers",
                               name="worst case" if worst else attack,
                               line={"width": 4, "color": "black"} if worst else None,
                               customdata=points["success_rate"],
                               hovertemplate="ε %{x:.3g}<br>robust accuracy %{y:.1%}<br>success rate "
                                             "%{customdata:.1%}<extra></extra>")
        figure.update_layout(height=340, margin=dict(l=10, r=10, t=30, b=10),
                             title=f"Robust accuracy vs ε ({'L∞' if norm == 'linf' else 'L2'})",
                             xaxis_title="ε (×1/255)" if norm == "linf" else "ε (L2, pixel units)",
                             yaxis={"title": "robust accuracy", "range": [0, 1.02]})
        with column:
            st.plotly_chart(figure, width="stretch", key=f"rob.curve.{norm}")


def _certified(report: dict) -> None:
    curve = data.artifact("robustness_certified")
    certified = report.get("certified")
    if curve is None or curve.empty or not certified:
        return
    st.subheader("Certified robustness (randomized smoothing)")
    st.caption(f"σ = {certified['sigma']}, n₀ = {certified['n0']}, n = {certified['n']}, α = {certified['alpha']}: "
               f"with probability ≥ 1 − α the smoothed classifier's prediction cannot change within the radius. "
               f"Abstains on {_pct(certified['abstention_rate'])} of the samples.")
    figure = go.Figure(go.Scatter(x=curve["radius"], y=curve["certified_accuracy"], mode="lines", line_shape="hv",
                                  hovertemplate="radius %{x:.3g}<br>certified accuracy %{y:.1%}<extra></extra>"))
    figure.update_layout(height=300, margin=dict(l=10, r=10, t=10, b=10), xaxis_title="L2 radius (pixel units)",
                         yaxis={"title": "certified accuracy", "range": [0, 1.02]})
    st.plotly_chart(figure, width="stretch", key="rob.certified")


PERCENT_COLUMNS = ("clean_accuracy", "corruption_accuracy", "robust_accuracy_linf", "robust_accuracy_l2",
                   "certified_accuracy")


def _slices() -> None:
    table = data.artifact("robustness_slices")
    if table is None or table.empty:
        return
    st.subheader("Robustness per slice")
    only_worst = st.toggle("Least robust slices only", value=True, key="rob.only_worst",
                           help="Ranked by robust accuracy at the reference ε (slices with enough attacked samples)")
    shown = table[table["worst_rank"].notna()].sort_values("worst_rank") if only_worst else table
    if shown.empty:
        st.caption("No slice has enough attacked samples to be ranked; showing all.")
        shown = table
    columns = ["worst_rank", "description", "kind", "n_samples", "n_attacked", "n_certified", *PERCENT_COLUMNS]
    config = {name: st.column_config.NumberColumn(name.replace("_", " "), format="percent") for name in PERCENT_COLUMNS}
    config["worst_rank"] = st.column_config.NumberColumn("rank", format="%d")
    widgets.slice_table(shown, [c for c in columns if c in shown.columns], key="rob.slices", column_config=config)
    st.caption("Intervals (Wilson 95 %) are in the artifact `robustness_slices.parquet`; per-sample scores "
               "(`rob_*`) can be filtered and sorted in the explorer. A slice opened there shows all of its samples, "
               "attacked or not.")


# -- one sample ---------------------------------------------------------------------------------------------------
def _upscale(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` in [0, 1] → ``(H·k, W·k)`` or ``(H·k, W·k, 3)`` float32 for ``st.image``."""
    array = np.clip(image.astype(np.float32), 0.0, 1.0)
    factor = max(1, DISPLAY_PIXELS // max(array.shape[1:]))
    array = array.repeat(factor, axis=1).repeat(factor, axis=2)
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def _perturbation_figure(delta: np.ndarray, title: str) -> go.Figure:
    """Heat map of a perturbation ``(C, H, W)`` summed over channels (diverging, symmetric scale)."""
    summed = delta.astype(np.float32).sum(axis=0)
    bound = float(np.abs(summed).max()) or 1e-6
    figure = go.Figure(go.Heatmap(z=summed, zmin=-bound, zmax=bound, colorscale="RdBu", showscale=False,
                                  hovertemplate="(%{x}, %{y}) change %{z:.4f}<extra></extra>"))
    figure.update_layout(height=220, width=220, margin=dict(l=0, r=0, t=24, b=0), title=title,
                         yaxis={"autorange": "reversed", "visible": False, "scaleanchor": "x"},
                         xaxis={"visible": False})
    return figure


def _example_label(arrays: dict, index: int, classes: list[str]) -> str:
    label = classes[int(arrays["labels"][index])]
    broken = arrays["adversarial_pred"][index] != arrays["clean_pred"][index]
    return f"{arrays['ids'][index]} · {label}" + (" · broken by attack" if broken else "")


def _example_viewer(report: dict) -> None:
    arrays = examples()
    if arrays is None or arrays["ids"].size == 0:
        return
    st.subheader("One sample: clean, corrupted, adversarial")
    classes = [str(c) for c in arrays["classes"]]
    index = st.selectbox("Sample", range(arrays["ids"].size), key=SAMPLE_KEY,
                         format_func=lambda i: _example_label(arrays, i, classes))
    clean, corrupted, adversarial = (arrays[k][index].astype(np.float32) for k in ("clean", "corrupted", "adversarial"))
    label = classes[int(arrays["labels"][index])]
    eps = float(arrays["eps"][index])
    norm_text = (f"ε = {eps * 255:.3g}/255" if report.get("attacks", {}).get("linf") and arrays["attack"][index]
                 in report["attacks"]["linf"]["attacks"] else f"ε = {eps:.3g} (L2)")
    versions = [("Clean", clean, arrays["clean_pred"][index], ""),
                ("Corrupted", corrupted, arrays["corrupted_pred"][index],
                 f"{arrays['corruption'][index]}, severity {arrays['severity'][index]}"),
                ("Adversarial", adversarial, arrays["adversarial_pred"][index],
                 f"{arrays['attack'][index]}, {norm_text}")]
    st.markdown(f"**{widgets.text(arrays['ids'][index])}** — label **{widgets.text(label)}**")
    columns = st.columns(4)
    for column, (title, image, prediction, how) in zip(columns, versions, strict=False):
        predicted = classes[int(prediction)]
        verdict = "correct" if predicted == label else "wrong"
        caption = f"{title}: predicted {predicted} ({verdict})" + (f" — {how}" if how else "")
        column.image(_upscale(image), caption=widgets.text(caption), clamp=True, width=DISPLAY_PIXELS)
    delta = arrays["perturbation"][index].astype(np.float32) if "perturbation" in arrays else adversarial - clean
    l2, linf = float(np.sqrt((delta.astype(np.float64) ** 2).sum())), float(np.abs(delta).max())
    with columns[3]:
        st.plotly_chart(_perturbation_figure(delta, "Adversarial perturbation"), key="rob.delta")
        st.caption(f"L∞ {linf * 255:.2f}/255 · L2 {l2:.3f}")
    issues = data.artifact("robustness_samples")
    if issues is not None:
        row = issues[issues["id"] == str(arrays["ids"][index])]
        if not row.empty and bool(row["rob_fragile"].iloc[0]):
            st.warning(f"Fragile: {widgets.text(row['rob_fragile_reason'].iloc[0])}", icon=":material/warning:")


if __name__ == "__main__":
    widgets.run_page(render)
