"""Exports: a set of samples (a filter result, a collection, a tag) to a table or an ImageFolder copy,
and the review decisions to a relabel file.

The same functions serve the dashboard's download buttons and ``robustlens export``. Every file is
written atomically (temporary file + rename); an ImageFolder export is assembled in a temporary directory
next to the destination and renamed into place at the end, so a reader never sees half an export.

A ``manifest`` export (the default columns) is a valid ``robustlens init --labels`` manifest: ``id``,
``path`` (relative to the dataset root), ``label``, ``split`` and the metadata columns under their
original names, so an export re-imports into a workspace with the same ids and labels.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

import numpy as np
import pandas as pd

from robustlens.analysis import storage
from robustlens.analysis.filters import FilterError, FilterSpec, apply_filter, filter_positions
from robustlens.analysis.workspace import Workspace
from robustlens.errors import ValidationError, WorkspaceError

TABLE_FORMATS = ("csv", "json", "parquet")
COLUMN_SETS = ("manifest", "all")
MIME_TYPES = {"csv": "text/csv", "json": "application/json", "parquet": "application/vnd.apache.parquet"}
MANIFEST_NAME = "manifest.csv"
RELABEL_COLUMNS = ("id", "path", "old_label", "new_label", "action", "reviewer", "decided_at", "note")


def select_positions(table: pd.DataFrame, curation, *, spec: FilterSpec | None = None,
                     collections: Sequence[str] = (), tags: Sequence[str] = ()) -> np.ndarray:
    """Row positions of the samples to export: ``spec`` AND (any of ``collections`` / ``tags``), in the spec's order.

    With neither a spec nor collections nor tags every sample is exported.
    """
    spec = spec or FilterSpec()
    mask = apply_filter(table, spec, curation)
    if collections:
        mask &= apply_filter(table, FilterSpec(collections=list(collections)), curation)
    if tags:
        mask &= apply_filter(table, FilterSpec(tags=list(tags)), curation)
    return filter_positions(table, spec, curation, mask=mask)


def export_frame(table: pd.DataFrame, positions: np.ndarray, *, columns: str = "manifest", curation=None,
                 apply_decisions: bool = False) -> pd.DataFrame:
    """The rows at ``positions`` as an export table.

    Parameters
    ----------
    columns:
        ``manifest`` (``id, path, label, split`` + metadata under its own names: re-importable with
        ``robustlens init``) or ``all`` (every column of the sample table, plus ``tags``).
    curation:
        The curation store; needed for ``apply_decisions`` and for the ``tags`` column.
    apply_decisions:
        Apply the latest review decisions: ``relabel`` replaces the label, ``exclude`` drops the sample.
    """
    if columns not in COLUMN_SETS:
        raise ValidationError(f"columns must be one of {COLUMN_SETS}, got '{columns}'")
    rows = table.iloc[np.asarray(positions, dtype=int)].reset_index(drop=True)
    if columns == "manifest":
        meta = [c for c in rows.columns if c.startswith("meta.")]
        frame = rows[["id", "path", "label", "split", *meta]].rename(columns={c: c.removeprefix("meta.") for c in meta})
    else:
        frame = rows.copy()
        if curation is not None:
            frame["tags"] = _tags_column(frame["id"], curation)
    for column in frame.columns:
        if isinstance(frame[column].dtype, pd.CategoricalDtype):
            frame[column] = frame[column].astype(str).where(frame[column].notna(), None)
    if apply_decisions:
        if curation is None:
            raise ValidationError("applying review decisions needs the curation database")
        frame = _apply_decisions(frame, curation)
    return frame


def relabel_frame(table: pd.DataFrame, curation, *, include_all: bool = False) -> pd.DataFrame:
    """The latest review decision per sample as a relabel file.

    Columns: ``id, path, old_label, new_label, action, reviewer, decided_at`` (ISO 8601, UTC), ``note``.
    Only ``relabel`` decisions unless ``include_all`` (then ``keep`` / ``ambiguous`` rows carry the old label
    as new label and ``exclude`` rows an empty one).
    """
    decisions = pd.DataFrame(curation.decisions(latest_only=True))
    if decisions.empty:
        return pd.DataFrame({c: pd.Series(dtype=str) for c in RELABEL_COLUMNS})
    if not include_all:
        decisions = decisions[decisions["action"] == "relabel"]
    lookup = table.set_index("id")[["path", "label"]]
    known = decisions["sample_id"].isin(lookup.index)
    path = decisions["sample_id"].map(lookup["path"]).where(known, "")
    old = decisions["sample_id"].map(lookup["label"].astype(str)).where(known, "")
    unchanged = old.where(decisions["action"] != "exclude", "")
    new = decisions["new_label"].where(decisions["action"] == "relabel", unchanged)
    frame = pd.DataFrame({
        "id": decisions["sample_id"], "path": path, "old_label": old, "new_label": new, "action": decisions["action"],
        "reviewer": decisions["reviewer"],
        "decided_at": pd.to_datetime(decisions["created_at"], utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "note": decisions["note"]})
    return frame.reset_index(drop=True)


def frame_bytes(frame: pd.DataFrame, fmt: str) -> bytes:
    """``frame`` encoded as ``csv``, ``json`` (a list of records) or ``parquet``."""
    if fmt == "csv":
        return frame.to_csv(index=False).encode("utf-8")
    if fmt == "json":
        return frame.to_json(orient="records", indent=2, date_format="iso", force_ascii=False).encode("utf-8")
    if fmt == "parquet":
        import io

        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return buffer.getvalue()
    raise ValidationError(f"format must be one of {TABLE_FORMATS}, got '{fmt}'")


def write_frame(frame: pd.DataFrame, destination: str | Path, fmt: str | None = None, *,
                overwrite: bool = False) -> Path:
    """Write ``frame`` atomically; ``fmt`` defaults to the destination's suffix."""
    destination = Path(destination)
    fmt = fmt or format_from_suffix(destination)
    if destination.exists() and not overwrite:
        raise ValidationError("exists; pass --force to replace it", file=destination)
    data = frame_bytes(frame, fmt)
    return storage.write_bytes(destination, data)


def format_from_suffix(path: Path) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in TABLE_FORMATS:
        raise ValidationError(f"cannot tell the format from the suffix '{path.suffix}'; use .csv, .json or .parquet "
                              "or say --format", file=path)
    return fmt


def export_imagefolder(workspace: Workspace, frame: pd.DataFrame, destination: str | Path, *,
                       overwrite: bool = False) -> Path:
    """Copy the images of ``frame`` (an :func:`export_frame` ``manifest`` table) to ``DEST/<label>/<file>``.

    ``DEST/manifest.csv`` lists ``id, path, label, split`` + metadata, so
    ``robustlens init WS --data DEST --labels DEST/manifest.csv`` rebuilds the same ids and labels.
    The tree is built in a temporary directory beside ``destination`` and renamed into place at the end.
    """
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise ValidationError("exists; pass --force to replace it", file=destination)
    for required in ("id", "path", "label"):
        if required not in frame.columns:
            raise ValidationError(f"an ImageFolder export needs an '{required}' column")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        relative = _copy_images(workspace, frame, staging)
        manifest = frame.assign(path=relative)
        manifest.to_csv(staging / MANIFEST_NAME, index=False)
        _replace_directory(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


def resolve_filter(spec_text: str | None = None, query: str | None = None) -> FilterSpec:
    """A filter from JSON text (``--filter``) or a dashboard URL / query string (``--query``)."""
    from urllib.parse import parse_qs, urlsplit

    from robustlens.analysis.filters import from_query_params

    if spec_text and query:
        raise ValidationError("give either a JSON filter or a query string, not both")
    try:
        if spec_text:
            return FilterSpec.from_json(spec_text)
        if query:
            text = urlsplit(query).query if "://" in query or query.startswith("/") else query.lstrip("?")
            return from_query_params(parse_qs(text))
    except FilterError as exc:
        raise ValidationError(str(exc)) from exc
    return FilterSpec()


# -- helpers ------------------------------------------------------------------------------------------
def _tags_column(ids: pd.Series, curation) -> pd.Series:
    pairs = pd.DataFrame(curation.tag_assignments(), columns=["id", "tag"])
    if pairs.empty:
        return pd.Series("", index=ids.index)
    joined = pairs.groupby("id")["tag"].agg(";".join)
    return ids.map(joined).fillna("")


def _apply_decisions(frame: pd.DataFrame, curation) -> pd.DataFrame:
    latest = pd.DataFrame(curation.decisions(latest_only=True))
    if latest.empty:
        return frame
    latest = latest.set_index("sample_id")
    action = frame["id"].map(latest["action"])
    relabel = action == "relabel"
    frame = frame.copy()
    frame.loc[relabel, "label"] = frame.loc[relabel, "id"].map(latest["new_label"])
    return frame[(action != "exclude").to_numpy()].reset_index(drop=True)


_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def _safe_name(text: str) -> str:
    cleaned = _UNSAFE.sub("_", str(text)).strip(" .")
    return cleaned or "_"


def _copy_images(workspace: Workspace, frame: pd.DataFrame, staging: Path) -> list[str]:
    """Copy every image into ``staging/<label>/``; returns the new relative paths (names kept unique)."""
    used: set[str] = set()
    relative = []
    for sample_id, path, label in zip(frame["id"], frame["path"], frame["label"], strict=True):
        source = workspace.image_path(path)
        if not source.is_file():
            raise WorkspaceError(f"image of sample '{sample_id}' is missing: {source}")
        name = _safe_name(Path(path).name)
        target = f"{_safe_name(label)}/{name}"
        if target in used:
            digest = hashlib.sha256(str(sample_id).encode()).hexdigest()[:10]
            target = f"{_safe_name(label)}/{Path(name).stem}__{digest}{Path(name).suffix}"
        used.add(target)
        (staging / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, staging / target)
        relative.append(target)
    return relative


def _replace_directory(staging: Path, destination: Path) -> None:
    """Rename ``staging`` onto ``destination``; an existing destination is moved aside first, then removed."""
    previous = None
    if destination.exists():
        previous = destination.parent / f".{destination.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(destination, previous)
    try:
        os.replace(staging, destination)
    except OSError:
        if previous is not None:
            os.replace(previous, destination)
        raise
    if previous is not None:
        with suppress(FileNotFoundError):
            shutil.rmtree(previous)
