"""The dashboard's one data-access layer: every page reads the workspace through these calls.

Artifacts are immutable files, so every cached reader is keyed on a *stamp* of the files it depends on
(modification times and sizes): a new analysis run changes the stamp and the next rerun reads the new
files; nothing is re-read otherwise. The sample table and embeddings are cached as resources (shared,
never copied: a 1M-row frame is not re-pickled on every rerun) — pages must treat them as read-only.
Curation state (tags, collections, decisions) changes under other reviewers' hands, so it is never cached.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from robustlens.query import filters, sample_table
from robustlens.analysis.curation import CurationStore
from robustlens.query.summary import class_balance, prediction_accuracy, summarize
from robustlens.analysis.safety import RefusedFiles
from robustlens.analysis.thumbnails import ensure_thumbnails
from robustlens.analysis.workspace import Workspace

WORKSPACE_ENV = "ROBUSTLENS_WORKSPACE"
#: Folder server-side exports go under (``robustlens serve --export-root``); default ``WORKSPACE/exports``.
EXPORT_ROOT_ENV = "ROBUSTLENS_EXPORT_ROOT"


# -- the workspace ----------------------------------------------------------------------------------
def workspace_path() -> Path:
    """The workspace this server shows (``robustlens serve`` sets :data:`WORKSPACE_ENV`)."""
    value = os.environ.get(WORKSPACE_ENV)
    if not value:
        st.error("No workspace selected. Start the dashboard with `robustlens serve WORKSPACE`.")
        st.stop()
    return Path(value)


def export_root() -> Path:
    """The one folder the Export page writes under: ``serve --export-root`` (:data:`EXPORT_ROOT_ENV`), else
    ``WORKSPACE/exports``. Pages only choose a new NAME inside it."""
    value = os.environ.get(EXPORT_ROOT_ENV)
    return Path(value) if value else workspace_path() / "exports"


@st.cache_resource(show_spinner=False, max_entries=4)
def _open(path: str, stamp: float) -> Workspace:
    return Workspace(path)


def workspace() -> Workspace:
    """The open workspace; reopened when ``workspace.json`` changes (e.g. after a new analysis)."""
    return _open(*cache_key())


def cache_key() -> tuple[str, float]:
    """Arguments that identify the current workspace manifest for the cached readers."""
    path = workspace_path()
    manifest = path / "workspace.json"
    return str(path), (manifest.stat().st_mtime if manifest.exists() else 0.0)


def artifacts_stamp() -> tuple:
    """Name, mtime and size of every file the sample table is built from (cheap: one directory listing each)."""
    root = workspace_path()
    entries = []
    for name in ("workspace.json", "samples.parquet"):
        if (root / name).exists():
            info = (root / name).stat()
            entries.append((name, info.st_mtime_ns, info.st_size))
    # Not the workspace root as a whole: the curation database lives there and changes with every tag.
    for folder in (root / "predictions", root / "artifacts", root / "artifacts" / "evaluation"):
        if not folder.is_dir():
            continue
        with os.scandir(folder) as listing:
            for entry in listing:
                if entry.is_file() and not entry.name.startswith("."):
                    info = entry.stat()
                    entries.append((f"{folder.name}/{entry.name}", info.st_mtime_ns, info.st_size))
    return tuple(sorted(entries))


# -- summaries (small, cached as data) ----------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=8)
def summary(path: str, stamp: float) -> dict:
    return summarize(_open(path, stamp))


@st.cache_data(show_spinner=False, max_entries=8)
def balance(path: str, stamp: float) -> pd.DataFrame:
    return class_balance(_open(path, stamp))


@st.cache_data(show_spinner=False, max_entries=8)
def accuracies(path: str, stamp: float) -> dict[str, float]:
    ws = _open(path, stamp)
    return {name: prediction_accuracy(ws, name) for name in ws.prediction_names}


# -- the sample table ---------------------------------------------------------------------------------
@st.cache_resource(show_spinner="Loading the sample table…", max_entries=2)
def _sample_table(path: str, stamp: tuple) -> pd.DataFrame:
    return sample_table.load_sample_table(Workspace(path))


def table() -> pd.DataFrame:
    """The sample table (see :mod:`robustlens.query.sample_table`); read-only."""
    return _sample_table(str(workspace_path()), artifacts_stamp())


def filtered_positions(table_: pd.DataFrame, spec: filters.FilterSpec) -> np.ndarray:
    """Row positions matching ``spec``, sorted; tags, collections and review states read live from the DB."""
    return filters.filter_positions(table_, spec, curation())


# -- other artifacts ----------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=2)
def _embeddings(path: str, stamp: tuple) -> np.ndarray | None:
    ws = Workspace(path)
    file = ws.artifact_path("embeddings.npy")
    array = np.load(file, allow_pickle=False) if file.exists() else ws.embeddings()
    if array is None:
        return None
    array = np.asarray(array, dtype=np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.where(norms > 0, norms, 1.0)


def embeddings() -> np.ndarray | None:
    """``(N, D)`` L2-normalised embeddings in sample order (computed or imported), or ``None``."""
    array = _embeddings(str(workspace_path()), artifacts_stamp())
    if array is not None and len(array) != len(table()):
        return None
    return array


def neighbours(position: int, k: int = 8) -> list[tuple[int, float]]:
    """The ``k`` nearest samples to the one at ``position`` by embedding cosine: ``(position, cosine)`` pairs."""
    array = embeddings()
    if array is None:
        return []
    similarity = array @ array[position]
    similarity[position] = -np.inf
    k = min(k, len(similarity) - 1)
    if k <= 0:
        return []
    best = np.argpartition(-similarity, k - 1)[:k]
    best = best[np.argsort(-similarity[best])]
    return [(int(i), float(similarity[i])) for i in best]


@st.cache_data(show_spinner=False, max_entries=32)
def _artifact(path: str, name: str, stamp: tuple) -> pd.DataFrame | None:
    file = Path(path) / "artifacts" / f"{name}.parquet"
    return pd.read_parquet(file) if file.exists() else None


def artifact(name: str) -> pd.DataFrame | None:
    """``artifacts/<name>.parquet`` (a copy), or ``None`` when its stage has not run."""
    return _artifact(str(workspace_path()), name, artifacts_stamp())


@st.cache_data(show_spinner=False, max_entries=16)
def _evaluation(path: str, name: str, stamp: tuple) -> dict | None:
    file = Path(path) / "artifacts" / "evaluation" / f"{name}.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.exists() else None


def evaluation(name: str) -> dict | None:
    """``artifacts/evaluation/<name>.json`` or ``None``."""
    return _evaluation(str(workspace_path()), name, artifacts_stamp())


def sample_issues(sample_id: str) -> pd.DataFrame:
    """Rows of ``issues.parquet`` for one sample (issue, severity, explanation, stage)."""
    issues = artifact("issues")
    if issues is None:
        return pd.DataFrame(columns=["issue", "severity", "explanation"])
    return issues[issues["id"] == sample_id].drop(columns="id")


def thumbnails(positions) -> list[str | None]:
    """Thumbnail file paths (made once, cached on disk) for the rows at ``positions``."""
    frame = table()
    rows = frame.iloc[list(positions)]
    refused = RefusedFiles()
    paths = ensure_thumbnails(workspace(), zip(rows["path"], rows["content_hash"], strict=True), refused=refused)
    if len(refused):  # a file swapped for an outside symlink or changed since init: not shown, and said so
        from robustlens.dashboard.widgets import text  # widgets imports this module

        st.warning(f"Not shown: {text(refused.summary())}")
    return [str(p) if p is not None else None for p in paths]


def probabilities(name: str, position: int) -> np.ndarray:
    """Class probabilities of one sample under prediction set ``name``."""
    return _predictions(str(workspace_path()), name, artifacts_stamp())[position]


@st.cache_resource(show_spinner=False, max_entries=4)
def _predictions(path: str, name: str, stamp: tuple) -> np.ndarray:
    return Workspace(path).predictions(name)


# -- curation -------------------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def _store(url: str) -> CurationStore:
    return CurationStore(url)


def curation() -> CurationStore:
    """The workspace's curation store (one connection pool per server; reads are never cached)."""
    return _store(workspace().db_url)


# -- column summaries for the filter widgets --------------------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=2)
def _column_summary(path: str, stamp: tuple) -> dict:
    frame = _sample_table(path, stamp)
    bounds = {}
    for column in sample_table.numeric_columns(frame):
        if pd.api.types.is_bool_dtype(frame[column]):
            continue
        values = frame[column].to_numpy(dtype=float, na_value=np.nan)
        if np.isnan(values).all():
            continue
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        if high > low:
            bounds[column] = (low, high, pd.api.types.is_integer_dtype(frame[column]))
    categories = {}
    for column in ("split", *sample_table.metadata_columns(frame)):
        unique = frame[column].dropna().unique()
        if 0 < len(unique) <= 200:
            categories[column] = sorted(str(v) for v in unique)
    return {"bounds": bounds, "categories": categories}


def column_bounds() -> dict[str, tuple[float, float, bool]]:
    """Numeric, non-constant columns → ``(min, max, is_integer)``: what a range filter can act on."""
    return _column_summary(str(workspace_path()), artifacts_stamp())["bounds"]


def category_values() -> dict[str, list[str]]:
    """``split`` and metadata columns with at most 200 distinct values → their values as text."""
    return _column_summary(str(workspace_path()), artifacts_stamp())["categories"]


@st.cache_resource(show_spinner=False, max_entries=2)
def _id_index(path: str, stamp: tuple) -> pd.Index:
    return pd.Index(_sample_table(path, stamp)["id"])


def position_of(sample_id: str | None) -> int | None:
    """Row position of ``sample_id`` in the sample table, or ``None`` if there is no such sample."""
    if not sample_id:
        return None
    index = _id_index(str(workspace_path()), artifacts_stamp())
    found = index.get_indexer([sample_id])[0]
    return None if found < 0 else int(found)
