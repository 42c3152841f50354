"""Robustness: how the model breaks under common corruptions and adversarial attacks, what randomized
smoothing certifies, whether the attacks were strong enough (self-checks), which slices are least robust,
and, for one sample, its clean / corrupted / adversarial versions side by side.

Reads the artifacts of ``robustlens robustness WORKSPACE`` (see :mod:`robustlens.analysis.robustness.run`) through
:mod:`robustlens.dashboard.data`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from robustlens.dashboard import data
from robustlens.dashboard.components.frame import run_page
from robustlens.dashboard.components.markup import code, plot_text, text
from robustlens.dashboard.components.slice_tables import slice_table

SAMPLE_KEY = "rob.sample"
#: Display size (pixels) the example images are upscaled to, nearest-neighbour so pixels stay visible.
DISPLAY_PIXELS = 168


# -- the page ----------------------------------------------------------------------------------------------------
def render() -> None:
    workspace = data.workspace()
    report = data.robustness_summary()
    if report is None:
        if not workspace.has_model:
            st.info(
                "This workspace has no model, so its robustness cannot be measured. Create it with "
                "`robustlens init WS --data DIR --model model.pt --model-config model.json`.",
                icon=":material/info:",
            )
        else:
            st.info(
                f"No robustness results yet. Run {code(f'robustlens robustness {workspace.root}')} to "
                "compute them, "
                "then reload this page.",
                icon=":material/info:",
            )
        return
    _validity(report)
    _self_check_status(report)
    _headline(report)
    _corruptions(report)
    _attacks(report)
    _verification(report)
    _stability(report)
    _settings(report)
    _certified(report)
    _slices()
    _example_viewer(report)


def _pct(value) -> str:
    return "—" if value is None else f"{value:.1%}"


def _ci(low, high) -> str:
    return "" if low is None or high is None else f"95 % CI {low:.1%}–{high:.1%}"


def _eps_text(norm: str, eps: float) -> str:
    return f"{eps * 255:.3g}/255" if norm == "linf" else f"{eps:.3g}"


STATUS_TEXT = {"pass": "passed", "warn": "warned", "fail": "FAILED"}


def _validity(report: dict) -> None:
    """The validity section, shown above the headline: overall status and one row per check."""
    validity = report.get("validity")
    if not validity:
        st.info(
            "This run has no validity section (an older run): run `robustlens robustness` again.",
            icon=":material/info:",
        )
        return
    status = validity.get("status", "warn")
    checks = validity.get("checks", [])
    failing = [c for c in checks if c.get("status") != "pass"]
    verdict = (
        f"Validity checks {STATUS_TEXT.get(status, status)}: {len(checks) - len(failing)} of {len(checks)} "
        "checks passed."
    )
    if status == "pass":
        st.success(
            verdict + " The robust accuracy below is not known to be inflated by gradient masking or weak attacks.",
            icon=":material/verified:",
        )
    else:
        details = "; ".join(
            f"{c.get('name')}{' (' + c['norm'] + ')' if c.get('norm') else ''}: {c.get('message', '')}"
            for c in failing[:4]
        )
        (st.error if status == "fail" else st.warning)(
            verdict + " The robust accuracy below is an UPPER BOUND. " + text(details), icon=":material/gpp_maybe:"
        )
    with st.expander("Validity checks", expanded=status != "pass"):
        rows = [
            {
                "check": c.get("name"),
                "norm": c.get("norm"),
                "status": c.get("status"),
                "value": None if c.get("value") is None else str(c.get("value")),
                "message": c.get("message"),
            }
            for c in checks
        ]
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def _self_check_status(report: dict) -> None:
    check = report.get("self_check", {})
    for warning in report.get("warnings", []):
        if not warning.startswith("validity "):  # the validity section above says it already
            st.warning(text(warning), icon=":material/warning:")
    if not check.get("attacks"):
        st.info("No attacks were run, so there is no attack self-check.", icon=":material/info:")
    elif check.get("passed"):
        names = ", ".join(check["attacks"])
        st.success(
            f"Self-checks passed: every preview attack ({names}) found the adversarial examples known to "
            "exist in its active test, and no gradient-masking symptom was seen.",
            icon=":material/verified:",
        )
    with st.expander("Self-check details"):
        rows = [
            {
                "attack": name,
                "norm": c["norm"],
                "eps": c["eps"],
                "passed": c["passed"],
                "success rate": c["success_rate"],
                "needed": c["threshold"],
                "samples": c["n_evaluated"],
            }
            for name, c in check.get("attacks", {}).items()
        ]
        if rows:
            st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
        for norm, masking in check.get("masking", {}).items():
            flags = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in masking["flags"].items())
            st.markdown(
                f"**Gradient masking ({norm})** — {flags}; zero-gradient fraction "
                f"{masking['zero_grad_fraction']:.0%}, white-box success "
                + ", ".join(f"{k} {_pct(v)}" for k, v in masking["whitebox_success"].items())
                + (
                    f", black-box (Square) {_pct(masking['blackbox_success'])}"
                    if masking.get("blackbox_success") is not None
                    else ""
                )
            )


def _headline(report: dict) -> None:
    counts = report["num_samples"]
    st.caption(
        f"{counts['evaluated']:,} of {counts['workspace']:,} samples evaluated under corruptions, "
        f"{counts['attacked']:,} attacked, {counts['certified']:,} certified."
    )
    cols = st.columns(6)
    cols[0].metric("Clean accuracy", _pct(report.get("clean_accuracy")))
    corruptions = report.get("corruptions")
    cols[1].metric(
        "Corruption accuracy",
        _pct(corruptions["mean_accuracy"]) if corruptions else "—",
        help="Mean over every corruption × severity",
    )
    headline = report.get("headline") or {}
    for column, norm in zip(cols[2:4], ("linf", "l2"), strict=True):
        entry = headline.get(norm)
        name = "L∞" if norm == "linf" else "L2"
        if not entry:
            column.metric(f"Robust acc. {name}", "—", help=f"No {name} attack was run")
            continue
        label = f"Robust acc. {name} {_eps_text(norm, entry['eps'])}" + (
            " (upper bound)" if entry.get("upper_bound") else ""
        )
        source = "preview attacks only, not AutoAttack-grade" if entry.get("preview") else entry.get("label", "")
        interval = _ci(entry.get("ci_low"), entry.get("ci_high"))
        column.metric(
            label,
            _pct(entry.get("robust_accuracy")),
            help=f"Per-sample worst case over every attack run ({source}); {interval}, n = {entry.get('n')}",
        )
        column.caption(f"{interval} · " + ("**preview**" if entry.get("preview") else text(source)))
        if entry.get("upper_bound"):
            column.caption(
                f"Upper bound: the diagnostic attacks lowered it by {entry.get('lowered_by', 0):.1%} "
                f"(from {_pct(entry.get('before_diagnostics', {}).get('robust_accuracy'))})."
            )
    certified = report.get("certified")
    cols[4].metric(
        f"Certified acc. r = {certified['reference_radius']:.3g}" if certified else "Certified accuracy",
        _pct(certified["certified_accuracy_at_reference"]) if certified else "—",
        help="Randomized smoothing (Cohen et al.), L2 radius in pixel units",
    )
    fragile = report.get("fragile", {})
    cols[5].metric(
        "Fragile samples",
        f"{fragile.get('count', 0):,}",
        help="Correct, but broken by a tiny attack or by the mildest corruptions; issue 'fragile'",
    )


def _corruptions(report: dict) -> None:
    table = data.artifact("robustness_corruptions")
    if table is None or table.empty:
        return
    st.subheader("Corruptions")
    left, right = st.columns([3, 2])
    grid = table.pivot(index="corruption", columns="severity", values="accuracy")
    grid = grid.reindex(list(dict.fromkeys(table["corruption"])))
    with left:
        figure = go.Figure(
            go.Heatmap(
                z=grid.to_numpy(),
                x=[str(s) for s in grid.columns],
                y=list(grid.index),
                zmin=0,
                zmax=1,
                colorscale="RdYlGn",
                text=np.round(grid.to_numpy() * 100, 1),
                texttemplate="%{text}",
                hovertemplate="%{y}, severity %{x}<br>accuracy %{z:.1%}<extra></extra>",
                colorbar={"title": "accuracy"},
            )
        )
        figure.update_layout(
            height=max(260, 28 * len(grid) + 80),
            margin=dict(l=10, r=10, t=30, b=10),
            xaxis_title="severity",
            yaxis={"autorange": "reversed"},
            title="Accuracy per corruption × severity",
        )
        st.plotly_chart(figure, width="stretch", key="rob.heatmap")
    with right:
        figure = go.Figure()
        clean = report.get("clean_accuracy")
        by_family = table.groupby(["family", "severity"])["accuracy"].mean().reset_index()
        for family, rows in by_family.groupby("family"):
            figure.add_scatter(x=rows["severity"], y=rows["accuracy"], mode="lines+markers", name=family)
        overall = table.groupby("severity")["accuracy"].mean()
        figure.add_scatter(
            x=overall.index,
            y=overall.to_numpy(),
            mode="lines+markers",
            name="all corruptions",
            line={"width": 4, "color": "black"},
        )
        if clean is not None:
            figure.add_hline(y=clean, line_dash="dot", annotation_text="clean")
        figure.update_layout(
            height=360,
            margin=dict(l=10, r=10, t=30, b=10),
            title="Accuracy vs severity",
            xaxis={"title": "severity", "dtick": 1},
            yaxis={"title": "accuracy", "range": [0, 1.02]},
        )
        st.plotly_chart(figure, width="stretch", key="rob.severity")


KIND_SUFFIX = {"preview": " (preview)", "diagnostic": " (diagnostic)", "headline": ""}


def _attacks(report: dict) -> None:
    curves = data.artifact("robustness_curves")
    if curves is None or curves.empty:
        return
    verified = data.artifact("robustness_verified")
    st.subheader("Adversarial attacks: robust accuracy vs ε")
    st.caption(
        "Robust accuracy = correct and not changed by the attack. The worst case (black, with its Wilson 95 % "
        "interval) counts a sample robust only if it survives every attack run on it, AutoAttack and the "
        "validity diagnostics included; an attack that broke a sample at ε also counts it broken at larger ε. "
        "Previews (FGSM, PGD, …) are fast checks, not the headline. Dashed: formally verified accuracy "
        "(IBP / CROWN) of the verified samples, a lower bound that holds for every perturbation."
    )
    norms = list(dict.fromkeys(curves["norm"]))
    for column, norm in zip(st.columns(len(norms)), norms, strict=True):
        rows = curves[curves["norm"] == norm]
        scale = 255 if norm == "linf" else 1
        figure = go.Figure()
        for attack, points in rows.groupby("attack", sort=False):
            worst = attack == "worst_case"
            kind = str(points["kind"].iloc[0]) if "kind" in points else "preview"
            x = points["eps"] * scale
            error = None
            if worst and "robust_accuracy_ci_low" in points:
                error = {
                    "type": "data",
                    "symmetric": False,
                    "array": (points["robust_accuracy_ci_high"] - points["robust_accuracy"]).to_numpy(),
                    "arrayminus": (points["robust_accuracy"] - points["robust_accuracy_ci_low"]).to_numpy(),
                }
            figure.add_scatter(
                x=x,
                y=points["robust_accuracy"],
                mode="lines+markers",
                name="worst case" if worst else plot_text(attack + KIND_SUFFIX.get(kind, "")),
                line={"width": 4, "color": "black"}
                if worst
                else ({"dash": "dot"} if kind == "preview" else {"width": 3}),
                error_y=error,
                customdata=points["success_rate"],
                hovertemplate="ε %{x:.3g}<br>robust accuracy %{y:.1%}<br>success rate %{customdata:.1%}<extra></extra>",
            )
        if verified is not None and not verified.empty:
            for method, points in verified[verified["norm"] == norm].groupby("method", sort=False):
                figure.add_scatter(
                    x=points["eps"] * scale,
                    y=points["verified_accuracy"],
                    mode="lines+markers",
                    name=f"verified ({plot_text(str(method).upper())})",
                    line={"dash": "dash"},
                    hovertemplate="ε %{x:.3g}<br>verified accuracy %{y:.1%}<extra></extra>",
                )
        figure.update_layout(
            height=360,
            margin=dict(l=10, r=10, t=30, b=10),
            title=f"Robust accuracy vs ε ({'L∞' if norm == 'linf' else 'L2'})",
            xaxis_title="ε (×1/255)" if norm == "linf" else "ε (L2, pixel units)",
            yaxis={"title": "robust accuracy", "range": [0, 1.02]},
        )
        with column:
            st.plotly_chart(figure, width="stretch", key=f"rob.curve.{norm}")
            entry = report.get("attacks", {}).get(norm, {})
            minimal = entry.get("min_perturbation") or {}
            if minimal.get("median") is not None:
                st.caption(
                    f"Median minimal perturbation {_eps_text(norm, minimal['median'])} "
                    f"({text(minimal.get('source', ''))}; found for {minimal.get('found')} of "
                    f"{minimal.get('of')} correct samples)."
                )


def _verification(report: dict) -> None:
    """Verified accuracy (IBP, CROWN) beside the empirical worst case, per norm and ε, or why it did not run."""
    verification = report.get("verification") or {}
    if not verification:
        return
    st.subheader("Formal verification")
    rows = []
    for norm, entry in verification.items():
        if not entry.get("supported"):
            st.info(
                f"Verification ({'L∞' if norm == 'linf' else 'L2'}): {text(entry.get('message', ''))}",
                icon=":material/info:",
            )
            continue
        for e, eps in enumerate(entry["eps"]):
            row = {
                "norm": norm,
                "ε": _eps_text(norm, eps),
                "samples": entry["n_samples"],
                "empirical robust accuracy": entry["empirical_robust_accuracy"][e],
            }
            for method, values in entry["methods"].items():
                row[f"verified ({method.upper()})"] = values["verified_accuracy"][e]
                row[f"{method.upper()} 95 % CI"] = _ci(values["ci_low"][e], values["ci_high"][e])
            rows.append(row)
    if rows:
        frame = pd.DataFrame(rows)
        config = {
            c: st.column_config.NumberColumn(c, format="percent")
            for c in frame.columns
            if c.startswith("verified (") or c == "empirical robust accuracy"
        }
        st.dataframe(frame, hide_index=True, width="stretch", column_config=config)
        st.caption(
            "A verified sample provably keeps its label for every perturbation within ε; verified accuracy "
            "can never exceed the empirical robust accuracy (a validity check fails if a verified sample "
            "was broken)."
        )


def _stability(report: dict) -> None:
    """ImageNet-P perturbation stability: flip probability and top-5 distance per perturbation and per class."""
    stability = report.get("stability")
    if not stability:
        return
    st.subheader("Perturbation stability (ImageNet-P)")
    st.caption(
        f"{stability['n_samples']} samples, each through every perturbation sequence: flip probability = "
        "how often the prediction changes between compared frames (noise: against frame 0; others: "
        f"consecutive frames); mean {stability['mean_flip_probability']:.2%}, mean top-5 distance "
        f"{stability['mean_top5_distance']:.3f}."
    )
    rows = [
        {
            "perturbation": name,
            "flip probability": value["flip_probability"],
            "top-5 distance": value["top5_distance"],
            "frames": value["frames"],
        }
        for name, value in stability.items()
        if isinstance(value, dict) and "flip_probability" in value
    ]
    left, right = st.columns(2)
    left.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        width="stretch",
        column_config={"flip probability": st.column_config.NumberColumn(format="percent")},
    )
    right.dataframe(
        pd.DataFrame(stability.get("by_class", [])),
        hide_index=True,
        width="stretch",
        column_config={
            "fp_mean": st.column_config.NumberColumn("flip probability", format="percent"),
            "t5d_mean": st.column_config.NumberColumn("top-5 distance"),
        },
    )


def _settings(report: dict) -> None:
    """Every attack's settings, time and model passes per sample."""
    rows = []
    for norm, entry in report.get("attacks", {}).items():
        for name, result in entry.get("attacks", {}).items():
            rows.append(
                {
                    "attack": name,
                    "norm": norm,
                    "kind": result.get("kind", "preview"),
                    "settings": ", ".join(
                        f"{k}={v}" for k, v in (result.get("params") or {}).items() if not isinstance(v, dict | list)
                    ),
                    "seconds": result.get("seconds"),
                    "forward passes / sample": result.get("forward_passes_per_sample"),
                    "backward passes / sample": result.get("backward_passes_per_sample"),
                }
            )
    if rows:
        with st.expander("Attack settings, time and model passes"):
            st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def _certified(report: dict) -> None:
    curve = data.artifact("robustness_certified")
    certified = report.get("certified")
    if curve is None or curve.empty or not certified:
        return
    st.subheader("Certified robustness (randomized smoothing)")
    st.caption(
        f"σ = {certified['sigma']}, n₀ = {certified['n0']}, n = {certified['n']}, α = {certified['alpha']}: "
        f"with probability ≥ 1 − α the smoothed classifier's prediction cannot change within the radius. "
        f"Abstains on {_pct(certified['abstention_rate'])} of the samples."
    )
    figure = go.Figure(
        go.Scatter(
            x=curve["radius"],
            y=curve["certified_accuracy"],
            mode="lines",
            line_shape="hv",
            hovertemplate="radius %{x:.3g}<br>certified accuracy %{y:.1%}<extra></extra>",
        )
    )
    figure.update_layout(
        height=300,
        margin=dict(l=10, r=10, t=10, b=10),
        xaxis_title="L2 radius (pixel units)",
        yaxis={"title": "certified accuracy", "range": [0, 1.02]},
    )
    st.plotly_chart(figure, width="stretch", key="rob.certified")


def _percent_columns(columns: pd.Index) -> list[str]:
    """Columns of ``robustness_slices`` shown as percentages, in the artifact's order.

    Accuracies, the flip probability and the robust accuracies' Wilson intervals of the artifact's columns
    (:data:`robustlens.analysis.robustness.tables.SLICE_COLUMNS`, read from the table: importing that module
    would load torch into the dashboard).
    """
    return [
        str(c) for c in columns if str(c).endswith(("accuracy", "probability")) or str(c).startswith("robust_accuracy")
    ]


def _slices() -> None:
    table = data.artifact("robustness_slices")
    if table is None or table.empty:
        return
    st.subheader("Robustness per slice")
    only_worst = st.toggle(
        "Least robust slices only",
        value=True,
        key="rob.only_worst",
        help="Ranked by robust accuracy at the reference ε (slices with enough attacked samples)",
    )
    shown = table[table["worst_rank"].notna()].sort_values("worst_rank") if only_worst else table
    if shown.empty:
        st.caption("No slice has enough attacked samples to be ranked; showing all.")
        shown = table
    few = table[table["rank_note"].astype(str).str.startswith("too few samples")] if "rank_note" in table else table[:0]
    if len(few):
        st.caption(
            f"{len(few)} slice(s) have too few attacked samples to be ranked (see the rank note in the full table)."
        )
    percent = _percent_columns(table.columns)
    columns = [
        "worst_rank",
        "rank_note",
        "description",
        "kind",
        "n_samples",
        "n_attacked",
        "n_certified",
        *percent,
    ]
    config = {name: st.column_config.NumberColumn(name.replace("_", " "), format="percent") for name in percent}
    config["worst_rank"] = st.column_config.NumberColumn("rank", format="%d")
    slice_table(shown, [c for c in columns if c in shown.columns], key="rob.slices", column_config=config)
    st.caption(
        'Intervals are Wilson 95 %; slices with too few attacked samples are listed (rank note "too few '
        'samples") but not ranked. Per-sample scores (`rob.*`) can be filtered and sorted in the explorer. '
        "A slice opened there shows all of its samples, "
        "attacked or not."
    )


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
    figure = go.Figure(
        go.Heatmap(
            z=summed,
            zmin=-bound,
            zmax=bound,
            colorscale="RdBu",
            showscale=False,
            hovertemplate="(%{x}, %{y}) change %{z:.4f}<extra></extra>",
        )
    )
    figure.update_layout(
        height=220,
        width=220,
        margin=dict(l=0, r=0, t=24, b=0),
        title=title,
        yaxis={"autorange": "reversed", "visible": False, "scaleanchor": "x"},
        xaxis={"visible": False},
    )
    return figure


def _example_label(arrays: dict, index: int, classes: list[str]) -> str:
    label = classes[int(arrays["labels"][index])]
    broken = arrays["adversarial_pred"][index] != arrays["clean_pred"][index]
    return f"{arrays['ids'][index]} · {label}" + (" · broken by attack" if broken else "")


def _example_viewer(report: dict) -> None:
    arrays = data.robustness_examples()
    if arrays is None or arrays["ids"].size == 0:
        return
    st.subheader("One sample: clean, corrupted, adversarial")
    classes = [str(c) for c in arrays["classes"]]
    index = st.selectbox(
        "Sample", range(arrays["ids"].size), key=SAMPLE_KEY, format_func=lambda i: _example_label(arrays, i, classes)
    )
    clean, corrupted, adversarial = (arrays[k][index].astype(np.float32) for k in ("clean", "corrupted", "adversarial"))
    label = classes[int(arrays["labels"][index])]
    eps = float(arrays["eps"][index])
    norm_text = (
        f"ε = {eps * 255:.3g}/255"
        if report.get("attacks", {}).get("linf") and arrays["attack"][index] in report["attacks"]["linf"]["attacks"]
        else f"ε = {eps:.3g} (L2)"
    )
    versions = [
        ("Clean", clean, arrays["clean_pred"][index], ""),
        (
            "Corrupted",
            corrupted,
            arrays["corrupted_pred"][index],
            f"{arrays['corruption'][index]}, severity {arrays['severity'][index]}",
        ),
        ("Adversarial", adversarial, arrays["adversarial_pred"][index], f"{arrays['attack'][index]}, {norm_text}"),
    ]
    st.markdown(f"**{text(arrays['ids'][index])}** — label **{text(label)}**")
    columns = st.columns(4)
    for column, (title, image, prediction, how) in zip(columns, versions, strict=False):
        predicted = classes[int(prediction)]
        verdict = "correct" if predicted == label else "wrong"
        caption = f"{title}: predicted {predicted} ({verdict})" + (f" — {how}" if how else "")
        column.image(_upscale(image), caption=text(caption), clamp=True, width=DISPLAY_PIXELS)
    delta = arrays["perturbation"][index].astype(np.float32) if "perturbation" in arrays else adversarial - clean
    l2, linf = float(np.sqrt((delta.astype(np.float64) ** 2).sum())), float(np.abs(delta).max())
    with columns[3]:
        st.plotly_chart(_perturbation_figure(delta, "Adversarial perturbation"), key="rob.delta")
        st.caption(f"L∞ {linf * 255:.2f}/255 · L2 {l2:.3f}")
    issues = data.artifact("robustness_samples")
    if issues is not None:
        row = issues[issues["id"] == str(arrays["ids"][index])]
        if not row.empty and bool(row["rob_fragile"].iloc[0]):
            st.warning(f"Fragile: {text(row['rob_fragile_reason'].iloc[0])}", icon=":material/warning:")


if __name__ == "__main__":
    run_page("robustness", render)
