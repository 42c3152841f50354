"""Streamlit AppTest: every page renders on the sample workspace and its controls work."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "robustlens" / "dashboard" / "app.py")


@pytest.fixture
def app(sample_workspace, monkeypatch):
    monkeypatch.setenv("ROBUSTLENS_WORKSPACE", str(sample_workspace))
    return AppTest.from_file(APP, default_timeout=120)


def test_overview_shows_counts_accuracy_and_thumbnails(app):
    app.run()
    assert not app.exception
    assert app.title[0].value == "Overview"
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Samples"] == "2,000"
    assert metrics["Classes"] == "10"
    assert metrics["Skipped at ingest"] == "0"
    assert metrics["Accuracy (cnn)"] == "91.8%"
    captions = [caption for image in app.get("image") for caption in image.captions]
    assert captions == _expected_captions(app, page=1)
    assert any("→" in caption for caption in captions)  # misclassified samples show label → prediction


def test_thumbnail_paging_changes_the_page(app):
    app.run()
    first = [caption for image in app.get("image") for caption in image.captions]
    app.number_input(key="overview_page").set_value(2).run()
    assert not app.exception
    second = [caption for image in app.get("image") for caption in image.captions]
    assert second == _expected_captions(app, page=2) and second != first


def _expected_captions(app, page: int) -> list[str]:
    import os

    from robustlens.analysis.workspace import Workspace

    workspace = Workspace(os.environ["ROBUSTLENS_WORKSPACE"])
    rows = slice((page - 1) * 48, page * 48)
    labels = workspace.samples["label"].tolist()[rows]
    predicted = [workspace.classes[i] for i in workspace.predictions("cnn").argmax(axis=1)[rows]]
    return [label if label == guess else f"{label} → {guess}" for label, guess in zip(labels, predicted, strict=True)]


def test_without_a_workspace_the_app_says_how_to_start(monkeypatch):
    monkeypatch.delenv("ROBUSTLENS_WORKSPACE", raising=False)
    app = AppTest.from_file(APP, default_timeout=60).run()
    assert "robustlens serve WORKSPACE" in app.error[0].value
