"""Streamlit AppTest of the Robustness page (``robustlens.dashboard.views.robustness``) on real artifacts of a tiny
robustness run on the shipped sample workspace: the validity section comes before the headline, the headline shows
its interval, charts render, the sample selector changes the sample shown, a failed self-check is a warning and makes
the headline an upper bound, and a workspace without results says what to run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from robustlens.analysis.robustness.run import RobustnessConfig, run_robustness
from robustlens.analysis.workspace import Workspace
from tests.test_robustness_run import TINY as RUN_TINY
from tests.workspaces import build_sample_workspace

pytestmark = pytest.mark.slow  # every test runs the robustness pipeline on a workspace

#: The run tests' tiny configuration on fewer samples (the page only needs some of each).
TINY = dataclasses.replace(
    RUN_TINY,
    max_samples=30,
    attack_samples=30,
    smoothing_samples=6,
    selfcheck_samples=12,
    masking_samples=12,
    verify_samples=8,
    stability_samples=10,
)


def page_script() -> None:
    """What the dashboard runs for the page (AppTest executes this function's body as the script)."""
    from robustlens.dashboard.components.frame import run_page
    from robustlens.dashboard.views import robustness

    run_page("robustness", robustness.render)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return build_sample_workspace(tmp_path_factory.mktemp("page") / "ws")


@pytest.fixture(scope="module")
def analysed(template, tmp_path_factory) -> Path:
    root = shutil.copytree(template, tmp_path_factory.mktemp("page_run") / "ws")
    run_robustness(Workspace(root), TINY, progress=False, threads=1)
    return root


def open_page(root: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("ROBUSTLENS_WORKSPACE", str(root))
    app = AppTest.from_function(page_script, default_timeout=60)
    return app.run()


def assert_clean(app: AppTest) -> None:
    assert not app.exception, [e.value for e in app.exception]
    # a failed validity status is shown as an error box on purpose (the tiny runs here may fail a check)
    errors = [e.value for e in app.error if not e.value.startswith("Validity checks")]
    assert not errors, errors


def shown_sample(app: AppTest) -> str:
    """The id in the bold heading of the sample viewer."""
    headings = [m.value for m in app.markdown if m.value.startswith("**") and "label" in m.value]
    assert len(headings) == 1, headings
    return headings[0].split("**")[1]


def walk(block):
    """Every element under an AppTest block, in page order."""
    for child in getattr(block, "children", {}).values():
        if getattr(child, "children", None):
            yield from walk(child)
        else:
            yield child


def image_captions(app: AppTest) -> list[str]:
    return [caption for image in app.get("image") for caption in image.captions]


def test_page_renders_charts_tables_and_status(analysed, monkeypatch):
    app = open_page(analysed, monkeypatch)
    assert_clean(app)
    assert app.title[0].value == "Robustness"
    charts = app.get("plotly_chart")
    # heat map, accuracy vs severity, L∞ and L2 curves (verified accuracy drawn in them), certified curve,
    # perturbation map
    assert len(charts) == 6
    assert any("Self-checks passed" in s.value for s in app.success)
    report = json.loads((analysed / "artifacts" / "robustness_summary.json").read_text())
    status = report["validity"]["status"]
    boxes = {"pass": app.success, "warn": app.warning, "fail": app.error}[status]
    assert any(b.value.startswith("Validity checks") for b in boxes)
    # the validity box comes before the headline metrics in the page's element order
    order = [type(e).__name__ for e in walk(app.main)]
    assert order.index(type(boxes[0]).__name__) < order.index("Metric")
    assert len(app.dataframe) >= 3  # validity checks + self-check details + slice table
    slices = app.dataframe[-1].value
    assert {"robust_accuracy_linf", "robust_accuracy_linf_ci_low", "rank_note"} <= set(slices.columns)
    labels = [m.label for m in app.metric]
    assert "Clean accuracy" in labels and "Fragile samples" in labels
    robust = [m for m in app.metric if m.label.startswith("Robust acc. L∞")]
    assert len(robust) == 1 and robust[0].label.endswith("(upper bound)") == (status != "pass")
    head = report["headline"]["linf"]
    assert robust[0].value == f"{head['robust_accuracy']:.1%}"
    captions = [c.value for c in app.caption]
    assert any(f"95 % CI {head['ci_low']:.1%}–{head['ci_high']:.1%}" in c for c in captions)


def test_sample_selector_changes_the_shown_sample(analysed, monkeypatch):
    app = open_page(analysed, monkeypatch)
    selector = app.selectbox(key="rob.sample")
    assert len(selector.options) == 6
    first = shown_sample(app)
    before = image_captions(app)
    assert len(before) == 3 and before[0].startswith("Clean: predicted")
    selector.set_value(3).run()
    assert_clean(app)
    second = shown_sample(app)
    assert second != first and second in selector.options[3]
    after = image_captions(app)
    assert after[1].startswith("Corrupted: predicted") and after[2].startswith("Adversarial: predicted")


def test_failed_self_check_is_a_warning(template, tmp_path, monkeypatch):
    root = shutil.copytree(template, tmp_path / "ws")
    weak = RobustnessConfig(
        max_samples=12,
        attack_samples=12,
        smoothing_samples=0,
        corruptions=(),
        attacks=("pgd_linf",),
        selfcheck_samples=12,
        masking_samples=6,
        num_examples=2,
        headline="preview",
        validity=False,
        verification=(),
        attack_params={"pgd_linf": {"steps": 1, "step_size": 1e-4}},
    )
    run_robustness(Workspace(root), weak, progress=False, threads=1)
    app = open_page(root, monkeypatch)
    assert_clean(app)
    assert any("self-check FAILED for pgd_linf" in w.value for w in app.warning)
    assert not any("Self-checks passed" in s.value for s in app.success)
    assert any(w.value.startswith("Validity checks") and "UPPER BOUND" in w.value for w in [*app.warning, *app.error])
    assert any(m.label.endswith("(upper bound)") for m in app.metric)
    assert len(app.get("plotly_chart")) == 2  # L∞ curve + perturbation map; no corruption / certified charts


def test_without_results_the_page_says_what_to_run(template, monkeypatch):
    app = open_page(template, monkeypatch)
    assert_clean(app)
    assert any("robustlens robustness" in i.value for i in app.info)
    assert not app.get("plotly_chart")


def test_percent_columns_are_the_accuracies_of_the_slice_artifact():
    """The slice table's percent columns come from the artifact's columns (SLICE_COLUMNS), in its order."""
    import pandas as pd

    from robustlens.analysis.robustness.tables import SLICE_COLUMNS
    from robustlens.dashboard.views.robustness import _percent_columns

    assert _percent_columns(pd.Index(SLICE_COLUMNS)) == [
        "clean_accuracy",
        "corruption_accuracy",
        "robust_accuracy_linf",
        "robust_accuracy_linf_ci_low",
        "robust_accuracy_linf_ci_high",
        "robust_accuracy_l2",
        "robust_accuracy_l2_ci_low",
        "robust_accuracy_l2_ci_high",
        "certified_accuracy",
        "flip_probability",
    ]
    assert _percent_columns(pd.Index(["worst_rank", "n_samples", "clean_accuracy_ci_low"])) == []
