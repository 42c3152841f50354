"""Exports: a set of samples (a filter result, a collection, a tag) to a table or an ImageFolder copy,
and the review decisions to a relabel file.

The same functions serve the dashboard's download buttons and ``robustlens export``. Every file is
written atomically (temporary file + rename); an ImageFolder export is assembled in a temporary directory
next to the destination and renamed into place at the end, so a reader never sees half an export.

Nothing here destroys what robustlens did not write (see :mod:`robustlens.analysis.safety`): every export
is recorded in a ``.robustlens-export`` marker (the file's folder for a table, the folder itself for an
ImageFolder copy) and ``overwrite`` replaces only what a marker proves robustlens wrote, unchanged since. The
dashboard writes only through :func:`save_table_on_server` / :func:`save_imagefolder_on_server`: a validated
NAME under one export root, always into a new file or folder. Dataset files are copied only after their real
path is checked against the dataset root and their bytes against the content hash recorded at ingest.

CSV cells that a spreadsheet would run as a formula are neutralised (OWASP) unless ``raw_csv``.

A ``manifest`` export (the default columns) is a valid ``robustlens init --labels`` manifest: ``id``,
``path`` (relative to the dataset root), ``label``, ``split`` and the metadata columns under their
original names, so an export re-imports into a workspace with the same ids and labels.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from robustlens.analysis import storage
from robustlens.analysis.curation import CurationStore
from robustlens.analysis.images import FileRefused, ImageProblem, read_verified_bytes
from robustlens.analysis.safety import (
    DatasetGuard,
    check_replaceable_file,
    check_replaceable_folder,
    file_digest,
    marker_body,
    neutralise_formulas,
    record_written,
    validate_name,
    write_marker,
)
from robustlens.analysis.workspace import Workspace
from robustlens.errors import ValidationError, WorkspaceError
from robustlens.query.filters import CurationReader, FilterError, FilterSpec, apply_filter, filter_positions
from robustlens.query.slices import SliceMembership

TABLE_FORMATS = ("csv", "json", "parquet")
COLUMN_SETS = ("manifest", "all")
MIME_TYPES = {"csv": "text/csv", "json": "application/json", "parquet": "application/vnd.apache.parquet"}
MANIFEST_NAME = "manifest.csv"
RELABEL_COLUMNS = ("id", "path", "old_label", "new_label", "action", "reviewer", "decided_at", "note")


def select_positions(
    table: pd.DataFrame,
    curation: CurationReader | None,
    *,
    spec: FilterSpec | None = None,
    collections: Sequence[str] = (),
    tags: Sequence[str] = (),
    slices: SliceMembership | None = None,
) -> np.ndarray:
    """Row positions of the samples to export: ``spec`` AND (any of ``collections`` / ``tags``), in the spec's order.

    With neither a spec nor collections nor tags every sample is exported. ``slices``: the workspace's slice
    membership (:func:`~robustlens.query.slices.load_slice_membership`), needed for slice filters.
    """
    spec = spec or FilterSpec()
    mask = apply_filter(table, spec, curation, slices=slices)
    if collections:
        mask &= apply_filter(table, FilterSpec(collections=list(collections)), curation, slices=slices)
    if tags:
        mask &= apply_filter(table, FilterSpec(tags=list(tags)), curation)
    return filter_positions(table, spec, curation, mask=mask)


def export_frame(
    table: pd.DataFrame,
    positions: np.ndarray,
    *,
    columns: str = "manifest",
    curation: CurationStore | None = None,
    apply_decisions: bool = False,
) -> pd.DataFrame:
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


def relabel_frame(table: pd.DataFrame, curation: CurationStore, *, include_all: bool = False) -> pd.DataFrame:
    """The latest review decision per sample as a relabel file.

    Columns: ``id, path, old_label, new_label, action, reviewer, decided_at`` (ISO 8601, UTC), ``note``:
    ``reviewer`` and ``decided_at`` are the decision's ``created_by`` and ``created_at`` under the names this
    file has always had (scripts read them).
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
    frame = pd.DataFrame(
        {
            "id": decisions["sample_id"],
            "path": path,
            "old_label": old,
            "new_label": new,
            "action": decisions["action"],
            "reviewer": decisions["created_by"],  # the file's column keeps its published name
            "decided_at": pd.to_datetime(decisions["created_at"], utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "note": decisions["note"],
        }
    )
    return frame.reset_index(drop=True)


def frame_bytes(frame: pd.DataFrame, fmt: str, *, raw_csv: bool = False) -> bytes:
    """``frame`` encoded as ``csv``, ``json`` (a list of records) or ``parquet``.

    CSV text cells starting with ``= + - @``, tab or CR get a leading ``'`` so a spreadsheet shows them instead
    of running them (:func:`robustlens.analysis.safety.neutralise_formulas`); ``raw_csv`` keeps them as they
    are, for programs reading the file. JSON and Parquet are always raw.
    """
    if fmt == "csv":
        frame = frame if raw_csv else neutralise_formulas(frame)
        # The csv writer quotes a cell holding a line-terminator character, and only those: a CR inside a cell
        # would break the row in a "\n" file, so such a file is written with CRLF (RFC 4180) line ends.
        return frame.to_csv(index=False, lineterminator="\r\n" if _has_carriage_return(frame) else "\n").encode("utf-8")
    if fmt == "json":
        return frame.to_json(orient="records", indent=2, date_format="iso", force_ascii=False).encode("utf-8")
    if fmt == "parquet":
        import io

        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return buffer.getvalue()
    raise ValidationError(f"format must be one of {TABLE_FORMATS}, got '{fmt}'")


def _has_carriage_return(frame: pd.DataFrame) -> bool:
    for column in frame.columns:
        series = frame[column]
        textual = series.dtype == object or isinstance(series.dtype, pd.CategoricalDtype | pd.StringDtype)
        if textual and series.astype(object).map(lambda v: isinstance(v, str) and "\r" in v).any():
            return True
    return False


def write_frame(
    frame: pd.DataFrame,
    destination: str | Path,
    fmt: str | None = None,
    *,
    overwrite: bool = False,
    raw_csv: bool = False,
) -> Path:
    """Write ``frame`` atomically and record it in its folder's marker; ``fmt`` defaults to the suffix.

    An existing ``destination`` is replaced only with ``overwrite`` and only if the marker proves robustlens
    wrote it and nobody changed it since (:func:`robustlens.analysis.safety.check_replaceable_file`).
    """
    destination = Path(destination)
    fmt = fmt or format_from_suffix(destination)
    if os.path.lexists(destination):
        if not overwrite:
            raise ValidationError(
                "exists; pass --force to replace it (only a file robustlens wrote is replaced)", file=destination
            )
        check_replaceable_file(destination)
    data = frame_bytes(frame, fmt, raw_csv=raw_csv)
    storage.write_bytes(destination, data)
    record_written(destination)
    return destination


def format_from_suffix(path: Path) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in TABLE_FORMATS:
        raise ValidationError(
            f"cannot tell the format from the suffix '{path.suffix}'; use .csv, .json or .parquet or say --format",
            file=path,
        )
    return fmt


@dataclass
class ImageFolderExport:
    """What :func:`export_imagefolder` wrote.

    Attributes
    ----------
    path:
        The export folder.
    copied:
        Images copied (rows of its ``manifest.csv``).
    refused:
        Samples not copied: ``{"id", "path", "kind", "reason"}`` with ``kind`` ``outside_root`` (the file now
        resolves outside the dataset root; never read) or ``changed_since_init`` (its bytes no longer match
        the content hash recorded at ingest).
    """

    path: Path
    copied: int
    refused: list[dict] = field(default_factory=list)

    def refused_summary(self, limit: int = 10) -> str:
        """The refused samples in one line for a warning, or ``""``."""
        if not self.refused:
            return ""
        shown = "; ".join(f"{r['path']} ({r['reason']})" for r in self.refused[:limit])
        more = f"; … {len(self.refused) - limit} more" if len(self.refused) > limit else ""
        return f"{len(self.refused)} image(s) not copied: {shown}{more}"


def export_imagefolder(
    workspace: Workspace,
    frame: pd.DataFrame,
    destination: str | Path,
    *,
    overwrite: bool = False,
    raw_csv: bool = False,
) -> ImageFolderExport:
    """Copy the images of ``frame`` (an :func:`export_frame` ``manifest`` table) to ``DEST/<label>/<file>``.

    ``DEST/manifest.csv`` lists ``id, path, label, split`` + metadata, so
    ``robustlens init WS --data DEST --labels DEST/manifest.csv`` rebuilds the same ids and labels;
    ``DEST/.robustlens-export`` lists every file written (the proof that ``--force`` may replace the folder).
    The tree is built in a temporary directory beside ``destination`` and renamed into place at the end.
    Each image is resolved to its real path, checked against the dataset root and against its content hash;
    refused ones are left out and listed in the result (and in the marker).

    ``overwrite`` replaces an existing ``destination`` only if robustlens created it and it holds nothing else
    (:func:`robustlens.analysis.safety.check_replaceable_folder`).
    """
    destination = Path(destination)
    replacing = os.path.lexists(destination)
    if replacing:
        if not overwrite:
            raise ValidationError(
                "exists; pass --force to replace it (only a folder robustlens wrote is replaced)", file=destination
            )
        check_replaceable_folder(destination)
    staging, copied, refused = _build_imagefolder(workspace, frame, destination.parent, raw_csv=raw_csv)
    try:
        if replacing:
            _replace_own_directory(staging, destination)
        else:
            try:
                _move_into_new_directory(staging, destination)
            except FileExistsError as exc:
                raise ValidationError(
                    "appeared while the export was being written; nothing was replaced", file=destination
                ) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ImageFolderExport(path=destination, copied=copied, refused=refused)


# -- writing on the server (dashboard) -------------------------------------------------------------------------------
#: Default export root of a workspace (``robustlens serve --export-root`` chooses another).
EXPORT_DIR = "exports"
#: Most numbered variants tried for a name that is taken (``NAME-2`` … ``NAME-1000``).
MAX_NAME_VARIANTS = 1000


def default_export_root(workspace: Workspace) -> Path:
    """``WORKSPACE/exports``: where the dashboard writes unless ``serve --export-root`` says otherwise."""
    return workspace.root / EXPORT_DIR


def save_table_on_server(
    frame: pd.DataFrame, export_root: str | Path, name: str, fmt: str, *, raw_csv: bool = False
) -> Path:
    """Write ``frame`` as a NEW file ``EXPORT_ROOT/NAME.FMT`` (or ``NAME-2.FMT`` … if taken); never replaces a file.

    ``name`` must be a safe name (:func:`robustlens.analysis.safety.validate_name`; a trailing ``.FMT`` is
    dropped). The file is reserved with an exclusive create before it is written, so two sessions saving the
    same name at once get two files. Returns the path written (compare its name to see whether it was renamed).
    """
    if fmt not in TABLE_FORMATS:
        raise ValidationError(f"format must be one of {TABLE_FORMATS}, got '{fmt}'")
    stem = validate_name(str(name).removesuffix(f".{fmt}"), what="export name")
    root = _export_root_dir(export_root)
    data = frame_bytes(frame, fmt, raw_csv=raw_csv)
    for candidate in _name_variants(stem, f".{fmt}"):
        target = root / candidate
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644))
        except FileExistsError:
            continue
        storage.write_bytes(target, data)  # replaces the empty file this call just created, atomically
        record_written(target)
        return target
    raise ValidationError(
        f"export name '{stem}': {MAX_NAME_VARIANTS} numbered variants exist in {root}; choose another name"
    )


def save_imagefolder_on_server(
    workspace: Workspace, frame: pd.DataFrame, export_root: str | Path, name: str, *, raw_csv: bool = False
) -> ImageFolderExport:
    """:func:`export_imagefolder` into a NEW folder ``EXPORT_ROOT/NAME`` (or ``NAME-2`` … if taken).

    The folder is reserved with an exclusive ``mkdir`` (so it is one this call created) and the finished
    staging tree renamed onto it; nothing that existed before is replaced or deleted.
    """
    stem = validate_name(name, what="export folder name")
    root = _export_root_dir(export_root)
    staging, copied, refused = _build_imagefolder(workspace, frame, root, raw_csv=raw_csv)
    try:
        for candidate in _name_variants(stem, ""):
            target = root / candidate
            try:
                _move_into_new_directory(staging, target)
            except FileExistsError:
                continue
            return ImageFolderExport(path=target, copied=copied, refused=refused)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    raise ValidationError(
        f"export folder name '{stem}': {MAX_NAME_VARIANTS} numbered variants exist in {root}; choose another name"
    )


def _export_root_dir(export_root: str | Path) -> Path:
    root = Path(export_root)
    if root.is_symlink() and not root.is_dir():
        raise ValidationError("the export root is a dangling symlink", file=root)
    root.mkdir(parents=True, exist_ok=True)
    return root


def _name_variants(stem: str, suffix: str) -> Iterator[str]:
    yield f"{stem}{suffix}"
    for number in range(2, MAX_NAME_VARIANTS + 1):
        yield f"{stem}-{number}{suffix}"


def resolve_filter(spec_text: str | None = None, query: str | None = None) -> FilterSpec:
    """A filter from JSON text (``--filter``) or a dashboard URL / query string (``--query``)."""
    from urllib.parse import parse_qs, urlsplit

    from robustlens.query.filters import from_query_params

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
def _tags_column(ids: pd.Series, curation: CurationStore) -> pd.Series:
    pairs = pd.DataFrame(curation.tag_assignments(), columns=["id", "tag"])
    if pairs.empty:
        return pd.Series("", index=ids.index)
    joined = pairs.groupby("id")["tag"].agg(";".join)
    return ids.map(joined).fillna("")


def _apply_decisions(frame: pd.DataFrame, curation: CurationStore) -> pd.DataFrame:
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


def _build_imagefolder(
    workspace: Workspace, frame: pd.DataFrame, parent: Path, *, raw_csv: bool
) -> tuple[Path, int, list[dict]]:
    """A finished ImageFolder tree (images, ``manifest.csv``, marker) in a new staging folder under ``parent``;
    returns the folder, the number of images copied and the refused rows (see :class:`ImageFolderExport`)."""
    for required in ("id", "path", "label"):
        if required not in frame.columns:
            raise ValidationError(f"an ImageFolder export needs an '{required}' column")
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".robustlens-export.", suffix=".tmp", dir=parent))
    try:
        copied, refused = _copy_images(workspace, frame, staging)
        keep = [position for position in range(len(frame)) if position in copied]
        manifest = frame.iloc[keep].assign(path=[copied[position][0] for position in keep])
        (staging / MANIFEST_NAME).write_bytes(frame_bytes(manifest, "csv", raw_csv=raw_csv))
        files = {relative: {"sha256": digest, "size": size} for relative, digest, size in copied.values()}
        manifest_file = staging / MANIFEST_NAME
        files[MANIFEST_NAME] = {"sha256": file_digest(manifest_file), "size": manifest_file.stat().st_size}
        write_marker(staging, marker_body(files, folder_kind="imagefolder", extra={"refused": refused}))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, len(copied), refused


def _copy_images(
    workspace: Workspace, frame: pd.DataFrame, staging: Path
) -> tuple[dict[int, tuple[str, str, int]], list[dict]]:
    """Copy every image into ``staging/<label>/`` (names kept unique).

    Returns ``{row position: (relative path, sha256, size)}`` of the copied images and the refused rows
    (outside the dataset root: not read; changed since init: not written). A missing or unreadable image
    raises :class:`WorkspaceError`.
    """
    guard = DatasetGuard(workspace.dataset_root)
    expected = _content_hashes(workspace, frame)
    used: set[str] = set()
    copied: dict[int, tuple[str, str, int]] = {}
    refused: list[dict] = []
    for position, (sample_id, path, label) in enumerate(zip(frame["id"], frame["path"], frame["label"], strict=True)):
        try:
            data = guard.read(
                path, functools.partial(read_verified_bytes, expected_hash=expected.get(sample_id), no_follow=True)
            )
        except FileRefused as problem:
            refused.append({"id": str(sample_id), "path": str(path), "kind": problem.kind, "reason": problem.reason})
            continue
        except ImageProblem as problem:
            raise WorkspaceError(
                f"image of sample '{sample_id}' is missing or unreadable: "
                f"{workspace.image_path(path)} ({problem.reason})"
            ) from problem
        name = _safe_name(Path(path).name)
        target = f"{_safe_name(label)}/{name}"
        if target in used:
            digest = hashlib.sha256(str(sample_id).encode()).hexdigest()[:10]
            target = f"{_safe_name(label)}/{Path(name).stem}__{digest}{Path(name).suffix}"
        used.add(target)
        (staging / target).parent.mkdir(parents=True, exist_ok=True)
        (staging / target).write_bytes(data)
        copied[position] = (target, hashlib.sha256(data).hexdigest(), len(data))
    return copied, refused


def _content_hashes(workspace: Workspace, frame: pd.DataFrame) -> dict:
    """Sample id → content hash recorded at ingest, for the ids of ``frame``."""
    samples = workspace.samples
    if "content_hash" not in samples.columns:
        return {}
    wanted = samples[samples["id"].isin(set(frame["id"]))]
    return dict(zip(wanted["id"], wanted["content_hash"], strict=True))


def _move_into_new_directory(staging: Path, destination: Path) -> None:
    """Rename ``staging`` onto ``destination``, which must not exist: it is created with an exclusive ``mkdir``
    first (:class:`FileExistsError` if anything is there), so the rename only ever replaces this empty folder."""
    os.mkdir(destination)
    try:
        os.replace(staging, destination)
    except OSError:
        if os.name != "nt":
            with suppress(OSError):
                os.rmdir(destination)
            raise
        os.rmdir(destination)  # Windows cannot rename onto a folder; it was ours and empty
        os.replace(staging, destination)


def _replace_own_directory(staging: Path, destination: Path) -> None:
    """Rename ``staging`` onto ``destination``, an export folder robustlens wrote (checked by the caller with
    :func:`check_replaceable_folder`): the old one is moved aside, re-checked, then removed."""
    previous = destination.parent / f".{destination.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(destination, previous)
    try:
        check_replaceable_folder(previous)  # what was moved is what was checked
        os.replace(staging, destination)
    except BaseException:
        if not os.path.lexists(destination):
            os.replace(previous, destination)
        raise
    with suppress(FileNotFoundError):
        shutil.rmtree(previous)
