"""The dashboard's one data-access layer: every page reads the workspace through these cached calls."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from robustlens.analysis.summary import class_balance, prediction_accuracy, summarize
from robustlens.analysis.workspace import Workspace

WORKSPACE_ENV = "ROBUSTLENS_WORKSPACE"


def workspace_path() -> Path:
    """The workspace this server shows (``robustlens serve`` sets :data:`WORKSPACE_ENV`)."""
    value = os.environ.get(WORKSPACE_ENV)
    if not value:
        st.error("No workspace selected. Start the dashboard with `robustlens serve WORKSPACE`.")
        st.stop()
    return Path(value)


@st.cache_resource(show_spinner=False)
def _open(path: str, stamp: float) -> Workspace:
    return Workspace(path)


def workspace() -> Workspace:
    """The open workspace; reopened when ``workspace.json`` changes (e.g. after a new analysis)."""
    path = workspace_path()
    manifest = path / "workspace.json"
    stamp = manifest.stat().st_mtime if manifest.exists() else 0.0
    return _open(str(path), stamp)


@st.cache_data(show_spinner=False)
def summary(path: str, stamp: float) -> dict:
    return summarize(_open(path, stamp))


@st.cache_data(show_spinner=False)
def balance(path: str, stamp: float):
    return class_balance(_open(path, stamp))


@st.cache_data(show_spinner=False)
def accuracies(path: str, stamp: float) -> dict[str, float]:
    ws = _open(path, stamp)
    return {name: prediction_accuracy(ws, name) for name in ws.prediction_names}


@st.cache_data(show_spinner=False)
def predicted_labels(path: str, stamp: float, name: str) -> list[str]:
    ws = _open(path, stamp)
    classes = ws.classes
    return [classes[i] for i in ws.predictions(name).argmax(axis=1)]


def cache_key() -> tuple[str, float]:
    """Arguments that identify the current workspace state for the cached readers above."""
    path = workspace_path()
    manifest = path / "workspace.json"
    return str(path), (manifest.stat().st_mtime if manifest.exists() else 0.0)
