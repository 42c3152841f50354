"""One reader per kind of artifact a workspace holds: the only code that opens ``artifacts/`` for reading.

Stages read the artifacts of the stages they depend on through these functions, and so does the query layer
(:mod:`robustlens.query`) above them; nothing else parses these files. Every reader checks what it read
against ``samples.parquet`` (row count, ``id`` column, widths) and raises :class:`ArtifactError` — a
:class:`~robustlens.errors.WorkspaceError` naming the file and the stage to (re-)run — when it does not fit.
A reader returns ``None`` for an artifact whose stage has not run, unless ``required=True``.

=================================  =========================  ===========================================
artifact                           written by stage           reader
=================================  =========================  ===========================================
``embeddings.npy`` (or the         ``embeddings`` (``init``)  :func:`read_embeddings`
imported ``embeddings/*.npy``)
``visual_features.npy``,           ``embeddings``             :func:`read_sample_array`
``thumbnails.npy``
``knn_indices.npy`` …              ``embeddings``             (the stage's own cache, read by it alone)
``metrics.parquet``                ``metrics``                :func:`read_per_sample` (``"metrics"``)
``projection.parquet``             ``projection``             :func:`read_projection`
``duplicates.parquet``             ``duplicates``             :func:`read_per_sample` (``"duplicates"``)
``duplicate_pairs.parquet``        ``duplicates``             :func:`read_table` (``"duplicate_pairs"``)
``outliers.parquet``               ``outliers``               :func:`read_per_sample` (``"outliers"``)
``label_issues.parquet``           ``label_issues``           :func:`read_per_sample` (``"label_issues"``)
``flags_<stage>.parquet``          each flagging stage        :func:`read_flag_tables`
``issues.parquet``,                ``issues``                 :func:`read_table` / :func:`read_per_sample`
``issue_matrix.parquet``
``evaluation/<set>.json``          ``evaluation``             :func:`read_evaluation`
``eval_samples_<set>.parquet``     ``evaluation``             :func:`read_per_sample`
``slices.parquet`` …               ``slices``                 :func:`read_table`, :func:`read_slice_masks`
``robustness_*.parquet`` / json    ``robustness``             :func:`read_table`, :func:`read_json`,
                                                              :func:`read_robustness_examples`
``refused_files.json``             image-reading stages       :func:`read_refused`
``index.json``                     every stage                :func:`index_entry`
=================================  =========================  ===========================================

Why ``robustlens.analysis.ingest.embeddings.load_embeddings`` is not one of these: it reads a *user's* file
(``.npy`` / Parquet / CSV in the dataset's manifest order, ids to align) once at ``init`` and reports
problems as :class:`~robustlens.errors.ValidationError` with file/row/column for the user to fix. The readers
here read files robustlens wrote itself, in samples order; a mismatch means a stage must run again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import pandas as pd

from robustlens.analysis.workspace import Workspace
from robustlens.errors import WorkspaceError

#: Artifact name (file stem under ``artifacts/``) → the stage that writes it. Names not listed are matched by
#: :data:`STAGE_PREFIXES`.
STAGE_OF: dict[str, str] = {
    "embeddings": "embeddings",
    "visual_features": "embeddings",
    "thumbnails": "embeddings",
    "metrics": "metrics",
    "fingerprints": "metrics",
    "flags_quality": "quality_flags",
    "projection": "projection",
    "duplicates": "duplicates",
    "duplicate_pairs": "duplicates",
    "flags_duplicates": "duplicates",
    "outliers": "outliers",
    "flags_outliers": "outliers",
    "label_issues": "label_issues",
    "flags_label_issues": "label_issues",
    "issues": "issues",
    "issue_matrix": "issues",
    "slices": "slices",
    "worst_slices": "slices",
    "slice_predicates": "slices",
    "slice_clusters": "slices",
    "slice_predicate_masks": "slices",
}
#: Artifact name prefix → the stage that writes those artifacts.
STAGE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("eval_samples_", "evaluation"),
    ("evaluation/", "evaluation"),
    ("metric_importance_", "evaluation"),
    ("metric_curves_", "evaluation"),
    ("robustness", "robustness"),
    ("flags_robustness", "robustness"),
)
IMPORTED_ORIGIN = "imported"
COMPUTED_ORIGIN = "artifacts/embeddings.npy"
SLICE_MASKS = "slice_predicate_masks"
REFUSED = "refused_files.json"
_FINITE_CHECK_ROWS = 65_536


class ArtifactError(WorkspaceError):
    """An artifact that is missing or does not fit the workspace's samples.

    Attributes
    ----------
    file:
        The artifact's path.
    stage:
        The stage that writes it (the one to run again).
    """

    def __init__(self, file: str | Path, problem: str, *, stage: str):
        self.file, self.stage, self.problem = str(file), stage, problem
        super().__init__(f"{file}: {problem}; re-run the '{stage}' stage ('robustlens analyze WS --stages {stage}')")


def stage_of(name: str) -> str:
    """The stage that writes artifact ``name`` (file stem, e.g. ``"duplicates"``, ``"eval_samples_cnn"``)."""
    if name in STAGE_OF:
        return STAGE_OF[name]
    for prefix, stage in STAGE_PREFIXES:
        if name.startswith(prefix):
            return stage
    return name.removeprefix("per_sample_")


def _missing(path: Path, stage: str) -> WorkspaceError:
    # Worded as the stages always said it ("run the 'metrics' stage first"): tests and users know it.
    return WorkspaceError(
        f"{path} does not exist; run the '{stage}' stage first ('robustlens analyze WS --stages {stage}')"
    )


# -- tables ------------------------------------------------------------------------------------------------------
def read_table(workspace: Workspace, name: str, *, required: bool = False) -> pd.DataFrame | None:
    """``artifacts/<name>.parquet`` as written (any shape: pairs, slices, curves …), or ``None`` if absent.

    Raises
    ------
    WorkspaceError
        ``required`` and the file is missing (names the stage to run), or it cannot be read.
    """
    path = workspace.artifact_path(f"{name}.parquet")
    if not path.exists():
        if required:
            raise _missing(path, stage_of(name))
        return None
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise ArtifactError(path, f"cannot be read as Parquet ({exc})", stage=stage_of(name)) from exc


def read_per_sample(workspace: Workspace, name: str, *, required: bool = False) -> pd.DataFrame | None:
    """A per-sample artifact (``artifacts/<name>.parquet`` with an ``id`` column, one row per sample at most).

    Parameters
    ----------
    name:
        File stem, e.g. ``"metrics"``, ``"duplicates"``, ``"label_issues"``, ``"eval_samples_<set>"``,
        ``"robustness_samples"``, ``"per_sample_<name>"``.

    Returns
    -------
    pandas.DataFrame or None
        The table as stored (rows in its own order; :func:`aligned` puts them in samples order).

    Raises
    ------
    ArtifactError
        No ``id`` column, or an id repeated.
    """
    frame = read_table(workspace, name, required=required)
    if frame is None:
        return None
    path = workspace.artifact_path(f"{name}.parquet")
    if "id" not in frame.columns:
        raise ArtifactError(
            path, f"artifact '{name}' has no 'id' column (columns: {list(frame.columns)})", stage=stage_of(name)
        )
    repeated = frame["id"].duplicated()
    if repeated.any():
        raise ArtifactError(
            path, f"artifact '{name}' has repeated ids, e.g. '{frame['id'][repeated].iloc[0]}'", stage=stage_of(name)
        )
    return frame


def per_sample_names(workspace: Workspace) -> list[str]:
    """Stems of the ``artifacts/per_sample_<name>.parquet`` files (per-sample columns a later stage adds), sorted."""
    return sorted(path.stem for path in workspace.artifact_path("").glob("per_sample_*.parquet"))


def read_flag_tables(workspace: Workspace) -> dict[str, pd.DataFrame]:
    """Every ``artifacts/flags_<stage>.parquet`` (the per-stage issue flags the issues stage gathers), by file
    stem (``"flags_quality"`` …), sorted by name. Their columns are checked by the issues stage."""
    tables = {}
    for path in sorted(workspace.artifact_path("").glob("flags_*.parquet")):
        frame = read_table(workspace, path.stem)
        if frame is not None:
            tables[path.stem] = frame
    return tables


def aligned(frame: pd.DataFrame, ids: pd.Series) -> pd.DataFrame:
    """``frame``'s rows (a per-sample artifact) in the order of ``ids``, without ``id``; a ``RangeIndex``.

    Ids the artifact does not cover get a row of missing values (dtypes widened as needed); ids it holds
    that are not in ``ids`` are left out.
    """
    values = frame.drop(columns=["id"])
    same_order = len(frame) == len(ids) and bool((frame["id"].to_numpy() == ids.to_numpy()).all())
    values = values.reset_index(drop=True)
    if same_order:
        return values
    positions = pd.Index(frame["id"]).get_indexer(ids)
    if (positions >= 0).all():
        return values.iloc[positions].reset_index(drop=True)
    padded = values.reindex(range(len(values) + 1))
    return padded.iloc[np.where(positions >= 0, positions, len(values))].reset_index(drop=True)


def read_projection(workspace: Workspace, *, required: bool = False) -> pd.DataFrame | None:
    """``artifacts/projection.parquet``: ``id``, ``x``, ``y`` (the 2-D embedding map), or ``None``."""
    frame = read_per_sample(workspace, "projection", required=required)
    if frame is not None:
        missing = [c for c in ("x", "y") if c not in frame.columns]
        if missing:
            raise ArtifactError(
                workspace.artifact_path("projection.parquet"),
                f"has no column(s) {missing} (columns: {list(frame.columns)})",
                stage="projection",
            )
    return frame


def read_issues(workspace: Workspace) -> pd.DataFrame | None:
    """``artifacts/issues.parquet``: one row per (sample, issue): ``id``, ``issue``, ``severity``,
    ``explanation``, ``stage``; ``None`` before the issues stage ran."""
    return read_table(workspace, "issues")


# -- arrays ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Embeddings:
    """One vector per sample, in ``samples.parquet`` order.

    Attributes
    ----------
    matrix:
        ``(N, D)`` float array, finite (as stored: the embeddings stage stores rows L2-normalised,
        imported ones are the user's values).
    origin:
        ``"artifacts/embeddings.npy"`` (the embeddings stage's output) or ``"imported"`` (given to
        ``robustlens init --embeddings``); recorded as-is in stage summaries.
    file:
        The file read.
    """

    matrix: np.ndarray
    origin: str
    file: Path

    @property
    def dim(self) -> int:
        """``D``, the number of dimensions."""
        return int(self.matrix.shape[1])

    def normalized(self) -> np.ndarray:
        """``(N, D)`` float32 with rows scaled to unit L2 norm (all-zero rows stay zero)."""
        array = np.asarray(self.matrix, dtype=np.float32)
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        return array / np.where(norms > 0, norms, 1.0)


@overload
def read_embeddings(workspace: Workspace, *, imported: bool = ..., required: Literal[True]) -> Embeddings: ...


@overload
def read_embeddings(workspace: Workspace, *, imported: bool = ..., required: bool = ...) -> Embeddings | None: ...


def read_embeddings(workspace: Workspace, *, imported: bool = True, required: bool = False) -> Embeddings | None:
    """The workspace's embeddings: the embeddings stage's ``artifacts/embeddings.npy``, else (with ``imported``)
    the ones given to ``robustlens init --embeddings``.

    Parameters
    ----------
    imported:
        Fall back to the imported embeddings when the embeddings stage has not run.
    required:
        Raise instead of returning ``None`` when there are none.

    Raises
    ------
    ArtifactError
        The array is not ``(N, D)`` with ``N`` = the number of samples, or holds NaN / infinite values.
    WorkspaceError
        ``required`` and there are none (says to run the embeddings stage).
    """
    path = workspace.artifact_path("embeddings.npy")
    if path.exists():
        origin = COMPUTED_ORIGIN
    elif imported and workspace.manifest.get("embeddings") is not None:
        path, origin = workspace.root / workspace.manifest["embeddings"]["file"], IMPORTED_ORIGIN
    elif required:
        raise _missing(path, "embeddings")
    else:
        return None
    stage = "embeddings" if origin == COMPUTED_ORIGIN else "init"
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ArtifactError(path, f"cannot be read as a .npy array ({exc})", stage=stage) from exc
    count = len(workspace.samples)
    if matrix.ndim != 2 or matrix.shape[0] != count:
        raise ArtifactError(
            path, f"{origin} embeddings have shape {matrix.shape}, expected ({count}, D) in samples order", stage=stage
        )
    if not _all_finite(matrix):
        raise ArtifactError(path, f"{origin} embeddings contain NaN or infinite values", stage=stage)
    return Embeddings(matrix, origin, path)


def _all_finite(matrix: np.ndarray) -> bool:
    """Checked in row blocks: no ``(N, D)`` boolean temporary for a large matrix."""
    if not np.issubdtype(matrix.dtype, np.floating):
        return np.issubdtype(matrix.dtype, np.number)
    return all(
        np.isfinite(matrix[start : start + _FINITE_CHECK_ROWS]).all()
        for start in range(0, len(matrix), _FINITE_CHECK_ROWS)
    )


def read_sample_array(workspace: Workspace, name: str, *, ndim: int, stage: str | None = None) -> np.ndarray:
    """``artifacts/<name>.npy`` with one row per sample (``visual_features``, ``thumbnails``).

    Parameters
    ----------
    stage:
        The stage that writes it (default: :func:`stage_of`), named in errors.

    Raises
    ------
    WorkspaceError
        Missing, or not ``ndim`` dimensions with ``N`` rows (names the stage to run).
    """
    path = workspace.artifact_path(f"{name}.npy")
    stage = stage or stage_of(name)
    if not path.exists():
        raise _missing(path, stage)
    array = np.load(path, allow_pickle=False)
    count = len(workspace.samples)
    if array.ndim != ndim or array.shape[0] != count:
        raise ArtifactError(path, f"has shape {array.shape}, expected {ndim} dimensions with {count} rows", stage=stage)
    return array


# -- slices --------------------------------------------------------------------------------------------------------
def read_slice_masks(workspace: Workspace) -> np.ndarray:
    """``artifacts/slice_predicate_masks.npy``: ``(P, ceil(N / 8))`` uint8, one bit-packed row per predicate of
    ``slice_predicates.parquet`` (``numpy.packbits``, little bit order, samples order). Memory-mapped.

    Raises
    ------
    WorkspaceError
        Missing, or its width does not fit the number of samples (the slices are stale).
    """
    path = workspace.artifact_path(f"{SLICE_MASKS}.npy")
    if not path.exists():
        raise _missing(path, "slices")
    packed = np.load(path, mmap_mode="r")
    count = len(workspace.samples)
    if packed.ndim != 2 or packed.shape[1] != (count + 7) // 8:
        raise ArtifactError(
            path,
            f"holds {packed.shape[1] if packed.ndim == 2 else '?'} bytes per predicate, a "
            f"workspace of {count} samples needs {(count + 7) // 8}: the slices are stale",
            stage="slices",
        )
    return packed


def slice_membership(packed: np.ndarray, predicate_ids: Any, num_samples: int) -> np.ndarray:
    """``(N,)`` bool membership of the slice made of ``predicate_ids``: the AND of their packed mask rows.

    The one definition of slice membership, used by the slices stage (which counts ``size`` with the same
    rows), robustness and the query layer's slice filter.

    Parameters
    ----------
    packed:
        ``(P, ceil(N / 8))`` uint8 predicate masks (:func:`read_slice_masks`).
    predicate_ids:
        Indices of the slice's predicates (empty: every sample).
    num_samples:
        ``N``.

    Raises
    ------
    IndexError
        A predicate id outside ``[0, P)``.
    """
    ids = np.asarray(predicate_ids, dtype=np.int64).reshape(-1)
    if len(ids) == 0:
        return np.ones(num_samples, dtype=bool)
    if ids.min() < 0 or ids.max() >= packed.shape[0]:
        raise IndexError(f"predicate ids {ids.tolist()} out of range [0, {packed.shape[0]})")
    rows = np.unpackbits(np.asarray(packed[ids]), axis=1, count=num_samples, bitorder="little").astype(bool)
    return np.asarray(rows.all(axis=0))


# -- JSON and other files ------------------------------------------------------------------------------------------
def read_json(workspace: Workspace, name: str) -> dict | None:
    """``artifacts/<name>.json`` (e.g. ``robustness_summary``, ``evaluation/<set>``), or ``None`` if absent."""
    path = workspace.artifact_path(f"{name}.json")
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(path, f"is damaged ({exc})", stage=stage_of(name)) from exc


def read_evaluation(workspace: Workspace, prediction_set: str) -> dict | None:
    """``artifacts/evaluation/<set>.json`` (accuracy, per-class table, calibration …) or ``None``."""
    return read_json(workspace, f"evaluation/{prediction_set}")


def read_robustness_examples(workspace: Workspace) -> dict[str, np.ndarray] | None:
    """Arrays of ``artifacts/robustness_examples.npz`` (clean / perturbed example images), or ``None``."""
    path = workspace.artifact_path("robustness_examples.npz")
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise ArtifactError(path, f"cannot be read ({exc})", stage="robustness") from exc


def read_refused(workspace: Workspace) -> dict:
    """``artifacts/refused_files.json`` (``count``, ``files``, ``stages``), or an empty report."""
    path = workspace.artifact_path(REFUSED)
    if not path.exists():
        return {"count": 0, "files": [], "stages": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def read_index(workspace: Workspace) -> dict:
    """``artifacts/index.json``: artifact name → what its stage recorded (``stage``, ``config_hash``, ``inputs``,
    ``written_at``, summary …); ``{}`` before any stage wrote."""
    path = workspace.artifact_path("index.json")
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def index_entry(workspace: Workspace, name: str) -> dict:
    """What ``artifacts/index.json`` records about artifact ``name`` (config, inputs, summary …); ``{}`` if none."""
    return read_index(workspace).get(name) or {}
