"""A workspace: one directory holding everything robustlens knows about a dataset.

Layout::

    WORKSPACE/
      workspace.json           format version, dataset root, classes, prediction sets, model, embeddings
      samples.parquet          one row per sample: id, path, label, label_index, split, image record, meta.*
      ingest_report.json       skipped images and warnings from ingestion
      predictions/<name>.npy   (N, K) float32 probabilities, rows in samples.parquet order
      embeddings/imported.npy  (N, D) float32, when the user supplied embeddings
      model/                   the model file (TorchScript) and its config, copied at init
      artifacts/               analysis stage outputs (later stages)
      curation.db              tags, collections, review decisions (SQLite, unless a --db URL was given)

Artifacts are immutable and written atomically; the curation database is the only mutable state.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from robustlens.analysis import storage
from robustlens.analysis.curation import CurationStore
from robustlens.errors import NotAWorkspaceError, WorkspaceError

if TYPE_CHECKING:
    from robustlens.analysis.ingest.model import NormalizedModel

#: Version of the workspace layout; :func:`upgrade_manifest` migrates older ones.
FORMAT_VERSION = 1
MANIFEST_NAME = "workspace.json"
# Format version → function upgrading a manifest dict of that version to the next one.
MANIFEST_UPGRADES: dict[int, Callable[[dict], dict]] = {}


def upgrade_manifest(manifest: dict, *, source: Path) -> dict:
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise WorkspaceError(f"{source}: missing or invalid 'format_version'")
    if version > FORMAT_VERSION:
        raise WorkspaceError(
            f"{source}: workspace format {version} is newer than this robustlens supports "
            f"({FORMAT_VERSION}); upgrade robustlens"
        )
    while version < FORMAT_VERSION:
        manifest = MANIFEST_UPGRADES[version](manifest)
        version = manifest["format_version"]
    return manifest


class Workspace:
    """Read access to a workspace and atomic writers for its artifacts.

    Parameters
    ----------
    root:
        Workspace directory (must contain ``workspace.json``).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST_NAME
        if not path.exists():
            raise NotAWorkspaceError(
                f"{self.root} is not a robustlens workspace (no {MANIFEST_NAME}); create one with 'robustlens init'"
            )
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WorkspaceError(f"{path} is damaged: {exc}") from exc
        self.manifest = upgrade_manifest(manifest, source=path)

    # -- description ----------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def dataset_root(self) -> Path:
        return Path(self.manifest["dataset"]["root"])

    @property
    def prediction_names(self) -> list[str]:
        return list(self.manifest.get("prediction_sets", {}))

    @property
    def has_model(self) -> bool:
        return self.manifest.get("model") is not None

    # -- artifacts -------------------------------------------------------------------------------
    @cached_property
    def samples(self) -> pd.DataFrame:
        """One row per sample (see the module docstring); row order is the order of every array."""
        return pd.read_parquet(self.root / "samples.parquet")

    def image_path(self, relative: str) -> Path:
        """Absolute path of a sample image given its dataset-relative path."""
        return self.dataset_root / relative

    def predictions(self, name: str) -> np.ndarray:
        """``(N, K)`` probabilities of prediction set ``name``."""
        if name not in self.manifest.get("prediction_sets", {}):
            raise WorkspaceError(f"no prediction set '{name}' in {self.root} (have: {self.prediction_names})")
        return np.load(self.root / self.manifest["prediction_sets"][name]["file"], allow_pickle=False)

    def embeddings(self) -> np.ndarray | None:
        """Imported embeddings ``(N, D)``, or ``None``."""
        entry = self.manifest.get("embeddings")
        return None if entry is None else np.load(self.root / entry["file"], allow_pickle=False)

    def ingest_report(self) -> dict:
        path = self.root / "ingest_report.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def load_model(self, device: str = "cpu") -> NormalizedModel:
        """The workspace model wrapped with its preprocessing (see :mod:`robustlens.analysis.ingest.model`)."""
        from robustlens.analysis.ingest.model import config_from_dict, load_model

        entry = self.manifest.get("model")
        if entry is None:
            raise WorkspaceError(f"{self.root} has no model; pass --model to 'robustlens init'")
        config = config_from_dict(entry["config"], source=self.root / MANIFEST_NAME)
        spec = entry["file"] if entry["kind"] == "torchscript" else entry["factory"]
        base = self.root if entry["kind"] == "torchscript" else entry.get("base_dir")
        return load_model(spec, config, self.classes, base_dir=base, device=device)

    def artifact_path(self, name: str) -> Path:
        return self.root / "artifacts" / name

    def write_manifest(self, manifest: dict) -> None:
        storage.write_json(self.root / MANIFEST_NAME, manifest)
        self.manifest = manifest

    # -- curation state ----------------------------------------------------------------------------
    @property
    def db_url(self) -> str:
        return self.manifest.get("db_url") or f"sqlite:///{(self.root / 'curation.db').resolve()}"

    def curation(self) -> CurationStore:
        """Open the curation database (created / migrated on first use).

        Raises :class:`WorkspaceError` (the store's ``CurationDatabaseError``) when it cannot be opened; when
        the disk holding the workspace is full, the message says so (SQLite only says "disk I/O error").
        """
        try:
            return CurationStore(self.db_url)
        except WorkspaceError as exc:
            free = _free_bytes(self.root)
            if free is not None and free < FULL_DISK_BYTES:
                raise type(exc)(
                    f"{exc} — the disk holding {self.root} is full ({free:,} bytes free): free some "
                    "space and try again; nothing saved so far is lost"
                ) from exc
            raise


#: Free space below which a failure to open the curation database is blamed on a full disk.
FULL_DISK_BYTES = 1 << 20


def _free_bytes(folder: Path) -> int | None:
    import shutil

    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None
