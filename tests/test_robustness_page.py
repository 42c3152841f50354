"""Streamlit AppTest of the Robustness page (``robustlens.dashboard.views.robustness``) on real artifacts of a tiny
robustness run on the shipped sample workspace: charts render, the sample selector changes the sample shown,
a failed self-check is a warning, and a workspace without results says what to run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from robustlens.analysis.robustness.run import RobustnessConfig, run_robustness
from robustlens.analysis.workspace import Workspace
from tests.test_robustness_run import build_workspace

TINY = RobustnessConfig(max_samples=30, attack_samples=30, smoothing_samples=6, smoothing_n0=20, smoothing_n=100,
                        corruptions=("gaussian_noise", "contrast"), severities=(1, 5),
                        attacks=("fgsm", "pgd_linf", "deepfool"), selfcheck_samples=12, masking_samples=12,
                        num_examples=6)


def page_script() -> None:
    """What the dashboard runs for the page (AppTest executes this function's body as the script)."""
    from robustlens.dashboard.views import robustness

    robustness.render()


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("page") / "ws")


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
    assert not app.error, [e.value for e in app.error]


def shown_sample(app: AppTest) -> str:
    """The id in the bold heading of the sample viewer."""
    headings = [m.value for m in app.markdown if m.value.startswith("**") and "label" in m.value]
    assert len(headings) == 1, headings
    return headings[0].split("**")[1]


def image_captions(app: AppTest) -> list[str]:
    return [caption for image in app.get("image") for caption in image.captions]


def test_page_renders_charts_tables_and_status(analysed, monkeypatch):
    app = open_page(analysed, monkeypatch)
    assert_clean(app)
    assert app.title[0].value == "Robustness"
    charts = app.get("plotly_chart")
    # heat map, accuracy vs severity, L∞ and L2 curves, certified curve, perturbation map
    assert len(charts) == 6
    assert [s.value for s in app.success] and "Self-checks passed" in app.success[0].value
    assert not app.warning or all("Fragile" in w.value for w in app.warning)
    assert len(app.dataframe) >= 2          # self-check details + slice table
    slices = app.dataframe[-1].value
    assert "robust_accuracy_linf" in slices.columns and len(slices) >= 1
    labels = [m.label for m in app.metric]
    assert "Clean accuracy" in labels and "Fragile samples" in labels


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
    weak = RobustnessConfig(max_samples=12, attack_samples=12, smoothing_samples=0, corruptions=(),
                            attacks=("pgd_linf",), selfcheck_samples=12, masking_samples=6, num_examples=2,
                            attack_params={"pgd_linf": {"steps": 1, "step_size": 1e-4}})
    run_robustness(Workspace(root), weak, progress=False, threads=1)
    app = open_page(root, monkeypatch)
    assert_clean(app)
    assert any("self-check FAILED for pgd_linf" in w.value for w in app.warning)
    assert not app.success
    assert len(app.get("plotly_chart")) == 2        # L∞ curve + perturbation map; no corruption / certified charts


def test_without_results_the_page_says_what_to_run(template, monkeypatch):
    app = open_page(template, monkeypatch)
    assert_clean(app)
    assert any("robustlens robustness" in i.value for i in app.info)
    assert not app.get("plotly_chart")
