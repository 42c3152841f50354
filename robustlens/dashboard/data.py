"""The dashboard's one data-access layer: every page reads the workspace through these calls.

Artifacts are immutable files, so every cached reader is keyed on a *stamp* of the files it depends on
(modification times and sizes): a new analysis run changes the stamp and the next rerun reads the new
files; nothing is re-read otherwise. The sample table and embeddings are cached as resources (shared,
never copied: a 1M-row frame is not re-pickled on every rerun) — pages must treat them as read-only.
Curation state (tags, collections, decisions) changes under other reviewers' hands, so it is never cached.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from robustlens.analysis import artifacts
from robustlens.analysis.curation import CurationStore
from robustlens.analysis.safety import RefusedFiles
from robustlens.analysis.thumbnails import ensure_thumbnails
from robustlens.analysis.workspace import Workspace
from robustlens.dashboard.components.markup import text
from robustlens.query import filters, sample_table
from robustlens.query.neighbours import nearest_samples
from robustlens.query.slices import SliceMembership, load_slice_membership
from robustlens.query.summary import class_balance, summarize

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


STAMP = "rl.artifacts_stamp"


def refresh_artifacts_stamp() -> tuple:
    """Take the stamp of the workspace's artifacts for this script run (the page frame calls it first).

    Every cached reader keys on :func:`artifacts_stamp`; taking it once per run lists the artifact folders
    once, and every read of one run sees the same files. Callbacks (``on_click``), which run before the
    frame, see the stamp of the run whose page the user acted on.
    """
    stamp = _scan_artifacts(workspace_path())
    st.session_state[STAMP] = (str(workspace_path()), stamp)
    return stamp


def artifacts_stamp() -> tuple:
    """Name, mtime and size of every file the sample table is built from, as taken by this run's page frame
    (taken now when no frame ran, e.g. a page body run on its own)."""
    taken = st.session_state.get(STAMP)
    if taken is None or taken[0] != str(workspace_path()):
        return refresh_artifacts_stamp()
    return taken[1]


def _scan_artifacts(root: Path) -> tuple:
    """Name, mtime and size of every file the sample table is built from (cheap: one directory listing each)."""
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
def _summary(path: str, stamp: float) -> dict:
    return summarize(_open(path, stamp))


def summary() -> dict:
    """The workspace summary (:func:`robustlens.query.summary.summarize`): counts, classes, splits, models."""
    return _summary(*cache_key())


@st.cache_data(show_spinner=False, max_entries=8)
def _balance(path: str, stamp: float) -> pd.DataFrame:
    return class_balance(_open(path, stamp))


def balance() -> pd.DataFrame:
    """Samples per class and split (:func:`robustlens.query.summary.class_balance`)."""
    return _balance(*cache_key())


# -- the sample table ---------------------------------------------------------------------------------
@st.cache_resource(show_spinner="Loading the sample table…", max_entries=2)
def _sample_table(path: str, stamp: tuple) -> pd.DataFrame:
    return sample_table.load_sample_table(Workspace(path))


def table() -> pd.DataFrame:
    """The sample table (see :mod:`robustlens.query.sample_table`); read-only."""
    return _sample_table(str(workspace_path()), artifacts_stamp())


def filtered_positions(table_: pd.DataFrame, spec: filters.FilterSpec) -> np.ndarray:
    """Row positions matching ``spec``, sorted; tags, collections and review states read live from the DB."""
    return filters.filter_positions(table_, spec, curation(), slices=slice_membership())


@st.cache_resource(show_spinner=False, max_entries=2)
def _slice_membership(path: str, stamp: tuple) -> SliceMembership:
    return load_slice_membership(Workspace(path))


def slice_membership() -> SliceMembership:
    """The slice membership the slices stage recorded (see :mod:`robustlens.query.slices`); read-only."""
    return _slice_membership(str(workspace_path()), artifacts_stamp())


# -- other artifacts ----------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=2)
def _embeddings(path: str, stamp: tuple) -> np.ndarray | None:
    try:
        found = artifacts.read_embeddings(Workspace(path))
    except artifacts.ArtifactError:  # stale (another sample count): no "similar samples" until analyze re-runs
        return None
    return None if found is None else found.normalized()


def embeddings() -> np.ndarray | None:
    """``(N, D)`` L2-normalised embeddings in sample order (computed or imported), or ``None``."""
    array = _embeddings(str(workspace_path()), artifacts_stamp())
    if array is not None and len(array) != len(table()):
        return None
    return array


def neighbours(position: int, k: int = 8) -> list[tuple[int, float]]:
    """The ``k`` nearest samples to the one at ``position`` by embedding cosine: ``(position, cosine)`` pairs."""
    array = embeddings()
    return [] if array is None else nearest_samples(array, position, k)


@st.cache_data(show_spinner=False, max_entries=32)
def _artifact(path: str, name: str, stamp: tuple) -> pd.DataFrame | None:
    return artifacts.read_table(Workspace(path), name)


def artifact(name: str) -> pd.DataFrame | None:
    """``artifacts/<name>.parquet`` (a copy), or ``None`` when its stage has not run."""
    return _artifact(str(workspace_path()), name, artifacts_stamp())


@st.cache_data(show_spinner=False, max_entries=16)
def _json_artifact(path: str, name: str, stamp: tuple) -> dict | None:
    return artifacts.read_json(Workspace(path), name)


def evaluation(name: str) -> dict | None:
    """``artifacts/evaluation/<name>.json`` (the evaluation stage's report of prediction set ``name``) or ``None``."""
    return _json_artifact(str(workspace_path()), f"evaluation/{name}", artifacts_stamp())


def robustness_summary() -> dict | None:
    """``artifacts/robustness_summary.json`` (the robustness run's report), or ``None`` before that run."""
    return _json_artifact(str(workspace_path()), "robustness_summary", artifacts_stamp())


@st.cache_data(show_spinner=False, max_entries=4)
def _robustness_examples(path: str, stamp: tuple) -> dict[str, np.ndarray] | None:
    return artifacts.read_robustness_examples(Workspace(path))


def robustness_examples() -> dict[str, np.ndarray] | None:
    """The arrays of ``artifacts/robustness_examples.npz`` (clean / corrupted / adversarial example images, see
    ``example_images`` in :mod:`robustlens.analysis.robustness.run`), or ``None``."""
    return _robustness_examples(str(workspace_path()), artifacts_stamp())


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
    return {"bounds": sample_table.column_bounds(frame), "categories": sample_table.category_values(frame)}


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
