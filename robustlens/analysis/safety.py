"""Where robustlens may write, what it may read, and how it proves a file is its own.

Three promises, one module:

* **Writes that cannot destroy.** :func:`check_output_location` refuses an output (an export, a
  SQLite curation DB, a workspace) that is equal to or inside the dataset root, contains the dataset
  root, is an input file, or is / contains an input file's folder. A file or folder robustlens wrote
  carries a *marker*: the export folder's ``.robustlens-export`` JSON lists every file robustlens wrote
  there with its SHA-256 and size (:func:`record_written`); ``--force`` replaces only what a marker proves
  to be robustlens's own and unchanged (:func:`check_replaceable_file`, :func:`check_replaceable_folder`).
  A workspace's marker is its ``workspace.json``.
* **Reads that stay inside.** :class:`DatasetGuard` resolves every dataset file to its real path
  (symlinks followed) and refuses one that now lies outside the dataset root — e.g. an image replaced by
  a symlink to ``/etc/shadow`` after ``init`` — before a byte of it is read.
* **Names that are only names.** :func:`validate_name` accepts ``[A-Za-z0-9][A-Za-z0-9._-]*`` (no
  separators, no ``..``), for anything a user names that becomes a path.

Plus :func:`neutralise_formulas`, the OWASP guard for CSV cells a spreadsheet would run as a formula.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pandas as pd

from robustlens import __version__
from robustlens.analysis.images import FileRefused
from robustlens.errors import ValidationError

if TYPE_CHECKING:
    from robustlens.analysis.workspace import Workspace

#: Marker file robustlens keeps in every folder it writes exports into.
EXPORT_MARKER = ".robustlens-export"
MARKER_FORMAT = "robustlens-export"
MARKER_VERSION = 1
#: Names a user gives to things that become files or folders.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


# -- names ------------------------------------------------------------------------------------------------------
def validate_name(name: str, *, what: str = "name") -> str:
    """``name`` itself if it is a safe file / folder name, else a :class:`ValidationError` naming ``what``.

    Safe: 1-100 characters of letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit, and
    no ``..`` (so no separators, no traversal, no hidden files, nothing a shell or a browser reinterprets).
    """
    text = str(name)
    if not SAFE_NAME.fullmatch(text) or ".." in text:
        raise ValidationError(
            f"{what} '{text}' is not a safe name: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', '\\' or '..')"
        )
    return text


# -- where outputs may go ------------------------------------------------------------------------------------------
def real(path: str | Path) -> Path:
    """``os.path.realpath`` of ``path`` as a :class:`Path` (symlinks resolved; missing tails kept)."""
    return Path(os.path.realpath(os.fspath(path)))


def is_within(path: str | Path, root: str | Path) -> bool:
    """Whether real ``path`` equals real ``root`` or lies below it."""
    path, root = real(path), real(root)
    return path == root or root in path.parents


def check_output_location(
    path: str | Path, *, option: str, dataset_root: str | Path | None = None, inputs: Iterable[str | Path | None] = ()
) -> None:
    """Refuse an output path that could overwrite or delete the user's data.

    Parameters
    ----------
    path:
        The output (file or folder) about to be written.
    option:
        The option that named it (``--out``, ``--db``, ``workspace``), for the message.
    dataset_root:
        The dataset root: the output may be neither equal to it, nor inside it, nor contain it.
    inputs:
        The input files (labels manifest, prediction files, model, model config, embeddings): the output may
        not be one of them, nor equal to or contain the folder holding one. (A new file *beside* an input is
        allowed: prediction files often sit in the project folder where workspaces and exports go.)

    Raises
    ------
    ValidationError
        Naming ``option``, the output and the protected path.
    """
    target = real(path)
    if dataset_root is not None:
        root = real(dataset_root)
        if target == root or root in target.parents:
            where = (
                f"is the dataset root {dataset_root}"
                if target == root
                else f"is inside the dataset folder (the dataset root {dataset_root})"
            )
            raise ValidationError(
                f"{option} {path} {where}; robustlens never writes into the user's data: choose a path outside it"
            )
        if target in root.parents:
            raise ValidationError(
                f"{option} {path} contains the dataset root {dataset_root}; replacing it would "
                "delete the dataset: choose a path outside it"
            )
    for source in inputs:
        if source is None:
            continue
        file = real(source)
        folder = file.parent if not file.is_dir() else file
        if target == file:
            raise ValidationError(f"{option} {path} is the input file {source}; choose another path")
        if target == folder or target in folder.parents:
            raise ValidationError(
                f"{option} {path} is or contains the folder of the input file {source} ({folder}); choose another path"
            )


def check_init_outputs(
    workspace: str | Path, *, data: str | Path, db_url: str | None = None, inputs: Iterable[str | Path | None] = ()
) -> None:
    """``robustlens init``'s outputs checked before anything is read or written: the workspace folder and a
    ``sqlite://`` ``--db`` file, against the dataset root (``--data``) and the input files (those of ``inputs``
    that exist as files: a ``module:function`` model factory is not a path)."""
    files = [Path(p) for p in inputs if p is not None and Path(p).is_file()]
    check_output_location(workspace, option="workspace", dataset_root=data, inputs=files)
    database = sqlite_path(db_url)
    if database is not None:
        check_output_location(database, option="--db", dataset_root=data, inputs=files)


def check_export_root(export_root: str | Path, workspace: Workspace) -> Path:
    """Validate ``serve --export-root``: an existing folder (or one that can be made), outside the dataset root and
    the workspace's input folders. Returns its absolute real path."""
    root, files = workspace_inputs(workspace.manifest)
    path = Path(export_root)
    if os.path.lexists(path) and not path.is_dir():
        raise ValidationError(f"--export-root {export_root} exists and is not a folder")
    check_output_location(path, option="--export-root", dataset_root=root, inputs=files)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValidationError(f"--export-root {export_root}: cannot create it: {exc.strerror or exc}") from exc
    return real(path)


def workspace_inputs(manifest: dict) -> tuple[Path | None, list[Path]]:
    """The dataset root and the input files a workspace was made from (from its ``workspace.json``)."""
    dataset = manifest.get("dataset") or {}
    root = Path(dataset["root"]) if dataset.get("root") else None
    files = [dataset.get("manifest")]
    files += [entry.get("source") for entry in (manifest.get("prediction_sets") or {}).values()]
    files += [(manifest.get("embeddings") or {}).get("source"), (manifest.get("model") or {}).get("source")]
    return root, [Path(f) for f in files if f]


def sqlite_path(url: str | None) -> Path | None:
    """The database file of a ``sqlite://`` SQLAlchemy URL, or ``None`` (another backend, in-memory, no URL)."""
    if not url or not url.lower().startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(url).database
    except ArgumentError as exc:
        raise ValidationError(f"--db '{url}' is not a database URL: {exc}") from exc
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


# -- markers: proof that robustlens wrote a file ----------------------------------------------------------------------
def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_marker(folder: str | Path) -> dict | None:
    """The ``.robustlens-export`` marker of ``folder``, or ``None`` (missing, not a regular file, or not ours)."""
    path = Path(folder) / EXPORT_MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if (
        not isinstance(marker, dict)
        or marker.get("format") != MARKER_FORMAT
        or not isinstance(marker.get("files"), dict)
    ):
        return None
    return marker


def marker_body(files: dict[str, dict], *, folder_kind: str | None = None, extra: dict | None = None) -> dict:
    """A marker document: ``files`` maps a path relative to the folder to ``{"sha256", "size"}``.

    ``folder_kind`` (e.g. ``"imagefolder"``) says robustlens created the folder itself and may replace it whole.
    """
    body = {
        "format": MARKER_FORMAT,
        "version": MARKER_VERSION,
        "written_with": f"robustlens {__version__}",
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "folder_kind": folder_kind,
        "files": files,
    }
    return body | (extra or {})


def write_marker(folder: str | Path, body: dict) -> Path:
    """Write ``body`` as ``folder/.robustlens-export`` atomically."""
    from robustlens.analysis import storage

    return storage.write_json(Path(folder) / EXPORT_MARKER, body)


def record_written(path: str | Path) -> None:
    """Add the file robustlens just wrote at ``path`` (SHA-256, size) to its folder's marker."""
    path = Path(path)
    marker = read_marker(path.parent)
    if marker is None:
        if os.path.lexists(path.parent / EXPORT_MARKER):
            return  # a file of that name robustlens cannot read as its own: left alone (no --force for this export)
        marker = marker_body({})
    marker["files"][path.name] = {
        "sha256": file_digest(path),
        "size": path.stat().st_size,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    marker["updated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    write_marker(path.parent, marker)


def check_replaceable_file(path: str | Path, *, option: str = "--out") -> None:
    """Refuse to replace ``path`` unless its folder's marker lists it with the SHA-256 it has now.

    So ``--force`` replaces an export robustlens wrote and nobody changed since, and nothing else.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise ValidationError(
            f"{option} {path} exists and is not a regular file robustlens wrote; "
            "robustlens replaces only its own exports: choose a new path"
        )
    marker = read_marker(path.parent)
    entry = (marker or {}).get("files", {}).get(path.name)
    if entry is None:
        raise ValidationError(
            f"{option} {path} exists and robustlens did not write it (no entry in "
            f"{path.parent / EXPORT_MARKER}); --force replaces only robustlens's own exports: "
            "choose a new path or remove the file yourself"
        )
    if entry.get("sha256") != file_digest(path):
        raise ValidationError(
            f"{option} {path} was changed since robustlens wrote it; --force replaces only "
            "unchanged robustlens exports: choose a new path or remove the file yourself"
        )


def check_replaceable_folder(path: str | Path, *, option: str = "--out", kind: str = "imagefolder") -> None:
    """Refuse to replace folder ``path`` unless robustlens created it (its marker says ``kind``) and every file
    in it is one the marker lists, with the size it was written with."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        raise ValidationError(f"{option} {path} exists and is not a folder robustlens created; choose a new path")
    marker = read_marker(path)
    if marker is None or marker.get("folder_kind") != kind:
        raise ValidationError(
            f"{option} {path} exists and robustlens did not create it (no {EXPORT_MARKER} "
            "marker); --force replaces only robustlens's own exports: choose a new path"
        )
    listed = marker["files"]
    foreign = []
    for current, folders, names in os.walk(path):
        for name in folders + names:
            full = Path(current) / name
            relative = full.relative_to(path).as_posix()
            if relative == EXPORT_MARKER:
                continue
            if full.is_symlink():
                foreign.append(relative)
            elif full.is_file():
                entry = listed.get(relative)
                if entry is None or entry.get("size") != full.stat().st_size:
                    foreign.append(relative)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" … {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValidationError(
            f"{option} {path} holds {len(foreign)} file(s) robustlens did not write or that "
            f"changed since ({shown}); --force replaces only robustlens's own exports"
        )


# -- reads that stay inside the dataset root ------------------------------------------------------------------------
class DatasetGuard:
    """Reads dataset files by their dataset-relative path, refusing any that resolves outside the dataset root.

    :meth:`read` opens ``<real folder>/<name>`` with ``O_NOFOLLOW``: each folder's ``realpath`` is computed once
    (cached for the guard's lifetime: make a guard per run or per request, not per process) and checked against
    the root, so the common case costs no extra system call per file. Only when the file itself is a symlink
    (the open fails with ``ELOOP``) is its ``realpath`` taken and checked, and the real file opened instead; a
    symlink leading outside the root — e.g. an image replaced by a link to ``/etc/shadow`` after ``init`` —
    is refused without being opened. Thread-safe (the folder cache only ever gains equal values).

    Parameters
    ----------
    root:
        The dataset root recorded at ``init``.
    """

    def __init__(self, root: str | Path):
        self.root = os.fspath(root)
        self.real_root = os.path.realpath(self.root)
        self._prefix = self.real_root.rstrip(os.sep) + os.sep
        self._folders: dict[str, str | None] = {}  # folder → its real path, None when outside the root

    def _inside(self, real_path: str) -> bool:
        return real_path == self.real_root or real_path.startswith(self._prefix)

    def _refuse(self, real_path: str) -> FileRefused:
        return FileRefused(
            f"now resolves to {real_path}, outside the dataset root {self.real_root} (a symlink "
            "swapped in after init?); refused, not read",
            kind="outside_root",
        )

    def candidate(self, relative: str) -> str:
        """``<real folder>/<name>`` of ``relative`` (the folder checked to be inside the root; the file itself may
        still be a symlink, so open it with ``O_NOFOLLOW``). Raises :class:`FileRefused` for a folder outside."""
        full = os.path.join(self.root, relative)
        folder, name = os.path.split(full)
        if folder not in self._folders:
            resolved = os.path.realpath(folder)
            self._folders[folder] = resolved if self._inside(resolved) else None
        real_folder = self._folders[folder]
        if real_folder is None:
            raise self._refuse(os.path.join(os.path.realpath(folder), name))
        return os.path.join(real_folder, name)

    def resolve(self, relative: str) -> str:
        """Real path of ``relative`` (symlinks followed); :class:`FileRefused` if it is outside the root."""
        candidate = self.candidate(relative)
        if os.path.islink(candidate):
            candidate = os.path.realpath(candidate)
            if not self._inside(candidate):
                raise self._refuse(candidate)
        return candidate

    def read(self, relative: str, reader: Callable[[str], T]) -> T:
        """``reader(path)`` on the real file of ``relative``; ``reader`` must open ``path`` without following a
        symlink (the ``no_follow=True`` readers of :mod:`robustlens.analysis.images`), which raise
        :class:`FileRefused` of kind ``"symlink"`` when it is one."""
        if not _HAS_NOFOLLOW:
            return reader(self.resolve(relative))
        try:
            return reader(self.candidate(relative))
        except FileRefused as problem:
            if problem.kind != "symlink":
                raise
        try:
            return reader(self.resolve(relative))
        except FileRefused as problem:
            if problem.kind != "symlink":
                raise
            raise FileRefused(
                "was swapped for another symlink while being read; refused", kind="outside_root"
            ) from problem


_HAS_NOFOLLOW = hasattr(os, "O_NOFOLLOW")
T = TypeVar("T")


@dataclass(frozen=True)
class RefusedFile:
    """One dataset file refused at read time: sample ``index`` (row of ``samples.parquet``), its dataset-relative
    ``path``, ``kind`` (``outside_root`` / ``changed_since_init``) and the ``reason`` in words."""

    index: int
    path: str
    kind: str
    reason: str


class RefusedFiles:
    """Collects :class:`RefusedFile` entries from several threads; :meth:`summary` lists them for a report."""

    def __init__(self) -> None:
        self._entries: list[RefusedFile] = []
        self._lock = threading.Lock()

    def add(self, index: int, path: str, problem: FileRefused) -> None:
        with self._lock:
            self._entries.append(RefusedFile(int(index), str(path), problem.kind, problem.reason))

    @property
    def entries(self) -> list[RefusedFile]:
        with self._lock:
            return sorted(self._entries, key=lambda e: e.index)

    def __len__(self) -> int:
        return len(self._entries)

    def summary(self, limit: int = 10) -> str:
        """``"N dataset file(s) refused: path (reason); …"``, or ``""`` when none were."""
        entries = self.entries
        if not entries:
            return ""
        shown = "; ".join(f"{e.path} ({e.reason})" for e in entries[:limit])
        more = f"; … {len(entries) - limit} more" if len(entries) > limit else ""
        return f"{len(entries)} dataset file(s) refused: {shown}{more}"


# -- CSV formula injection (OWASP) ---------------------------------------------------------------------------------
#: First characters that make a spreadsheet treat a cell as a formula (OWASP "CSV Injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` whose text cells starting with ``= + - @``, tab or CR are prefixed with ``'``.

    Only text (object / string / categorical) columns are touched and, in them, only cells a spreadsheet would
    run: a plain number written as text (``-3``, ``+1.5e3``) is a number to a spreadsheet too and stays as it
    is; numeric columns are never changed, so negative numbers stay numbers.
    """
    out = frame.copy()
    for column in out.columns:
        series = out[column]
        if (
            pd.api.types.is_numeric_dtype(series)
            or pd.api.types.is_bool_dtype(series)
            or pd.api.types.is_datetime64_any_dtype(series)
        ):
            continue
        values = series.astype(object)
        risky = values.map(_is_formula)
        if risky.any():
            out[column] = values.where(~risky, "'" + values[risky].astype(str))
    return out


def _is_formula(value: object) -> bool:
    return isinstance(value, str) and value.startswith(FORMULA_PREFIXES) and not _NUMBER.fullmatch(value)
