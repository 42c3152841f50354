"""Time the dashboard at scale: sample-table load, filter latency, first render and page switches.

Usage: .venv/bin/python benchmarks/bench_dashboard.py [--sizes 70000 1000000] [--repeats 5] [--no-apptest]

For each size a synthetic workspace is built from arrays (images cycle over 64 real sample images; every
artifact the dashboard reads is present), then:

* ``table load``: :func:`load_sample_table` (what the dashboard caches once per artifact change);
* ``filter ...``: :func:`filter_positions` for representative filters (median of ``--repeats`` runs);
* ``AppTest ...``: the real app in Streamlit's AppTest — first render of the explorer with an empty cache
  (table load included; imports done), a filter change, and switches between pages (warm cache).

Targets: first render ≤ 3 s and filter ≤ 0.5 s at 70k samples; filter ≤ 1 s at 1M.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from robustlens.analysis.workspace import Workspace  # noqa: E402
from robustlens.query.filters import FilterSpec, filter_positions  # noqa: E402
from robustlens.query.sample_table import load_sample_table  # noqa: E402
from tests.dashboard_fixtures import synthetic_workspace  # noqa: E402

APP = REPO / "robustlens" / "dashboard" / "app.py"
FILTERS = {
    "label": FilterSpec(labels=["class_1", "class_2"]),
    "range + issue": FilterSpec(ranges={"metric.brightness": [0.1, 0.4]}, issues=["dark", "blurry"]),
    "wrong + confident": FilterSpec(correctness="incorrect", ranges={"pred.model.confidence": [0.5, None]}),
    "text search": FilterSpec(text="s12"),
    "map lasso": FilterSpec(region=[[-1.0, -1.0], [3.0, -1.5], [4.0, 1.0], [1.0, 2.0], [-1.5, 0.5]]),
    "5 conditions + sort": FilterSpec(
        labels=["class_1", "class_3", "class_5"],
        splits=["train"],
        ranges={"metric.contrast": [0.2, 0.9]},
        metadata={"camera": ["a", "b"]},
        issues=["dark", "outlier"],
        sort_by="metric.sharpness",
        descending=True,
    ),
    "sort only": FilterSpec(sort_by="label_issue.label_quality"),
}


def timed(function, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_engine(workspace: Workspace, repeats: int) -> list[tuple[str, float, str]]:
    rows = []
    load, table = timed(lambda: load_sample_table(workspace), 1)
    rows.append(("table load (once per analysis run)", load, f"{table.shape[1]} columns"))
    for name, spec in FILTERS.items():
        seconds, positions = timed(lambda spec=spec: filter_positions(table, spec), repeats)
        rows.append((f"filter: {name}", seconds, f"{len(positions):,} rows match"))
    return rows


def bench_apptest(root: Path) -> list[tuple[str, float, str]]:
    from streamlit.testing.v1 import AppTest

    os.environ["ROBUSTLENS_WORKSPACE"] = str(root)
    rows = []
    app = AppTest.from_file(str(APP), default_timeout=600)
    app.query_params["label"] = "class_1"
    start = time.perf_counter()
    app.run()
    app.switch_page("views/explorer.py")  # a shared link opens the explorer directly in a browser
    app.run()
    _check(app)
    rows.append(("AppTest first render: overview + explorer, cold cache", time.perf_counter() - start, ""))
    steps = [
        ("AppTest enter reviewer name", lambda: app.text_input(key="rl.user_input").set_value("bench")),
        ("AppTest filter change (label)", lambda: app.multiselect(key="flt.labels").set_value(["class_2", "class_3"])),
        ("AppTest filter change (issue)", lambda: app.multiselect(key="flt.issues").set_value(["dark"])),
        (
            "AppTest filter change (sort by a metric)",
            lambda: app.selectbox(key="flt.sort").set_value("metric.sharpness"),
        ),
        ("AppTest next grid page", lambda: app.get("pagination")[0].set_value(2)),
        ("AppTest clear all filters", lambda: _clear(app)),
        ("AppTest page switch: embedding map (all samples)", lambda: app.switch_page("views/embedding_map.py")),
        ("AppTest page switch: explorer", lambda: app.switch_page("views/explorer.py")),
        ("AppTest page switch: overview", lambda: app.switch_page("views/overview.py")),
        ("AppTest page switch: label review", lambda: app.switch_page("views/review.py")),
        ("AppTest page switch: duplicates", lambda: app.switch_page("views/duplicates.py")),
        ("AppTest page switch: performance", lambda: app.switch_page("views/performance.py")),
        ("AppTest page switch: export", lambda: app.switch_page("views/export.py")),
    ]
    for name, action in steps:
        action()
        start = time.perf_counter()
        app.run()
        rows.append((name, time.perf_counter() - start, ""))
        _check(app)
    return rows


def _clear(app) -> None:
    next(button for button in app.button if button.label == "Clear all filters").click()


def _check(app) -> None:
    if app.exception:
        raise RuntimeError(f"the app failed: {app.exception[0].value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[70_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-apptest", action="store_true", help="only the sample table and filter engine")
    args = parser.parse_args()
    import plotly.graph_objects  # noqa: F401
    import streamlit.testing.v1  # noqa: F401  (imports are not what we measure)

    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            start = time.perf_counter()
            root = Path(tmp) / f"ws{size}"
            workspace = synthetic_workspace(root, size, image_source=REPO / "sample_data" / "images")
            print(f"\n== {size:,} samples (synthetic workspace built in {time.perf_counter() - start:.1f} s)")
            rows = bench_engine(workspace, args.repeats)
            if not args.no_apptest:
                rows += bench_apptest(root)
            width = max(len(name) for name, _, _ in rows)
            for name, seconds, note in rows:
                print(f"  {name:<{width}}  {seconds * 1000:8.0f} ms  {note}")


if __name__ == "__main__":
    main()
