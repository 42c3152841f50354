"""What every analysis stage shares: its context, config hashing, per-image caches and artifact writes.

Stages are idempotent and incremental. Per-image results (metrics, embeddings) are cached by the
image's content hash under ``artifacts/cache/<stage>-<config hash>/`` in chunk files written atomically
as work proceeds, so a run killed half-way (even by SIGKILL) resumes where it stopped and a re-run after
adding images computes only the new ones. Whole-dataset stages record the fingerprint of their inputs
in ``artifacts/index.json`` and are skipped when it is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from robustlens.analysis import storage
from robustlens.analysis.loader import PixelMemo
from robustlens.analysis.workspace import Workspace
from robustlens.errors import WorkspaceError


@dataclass
class StageContext:
    """Shared inputs of every stage.

    Attributes
    ----------
    workspace:
        The workspace being analysed.
    progress:
        Show progress bars.
    device:
        Torch device for model and tensor work (``"cpu"``, ``"cuda"``).
    random_state:
        Seed for every random choice a stage makes.
    workers:
        Decoding threads (``None``: one per core).
    pixels:
        Decoded images shared by the stages of one run (see :class:`~robustlens.analysis.loader.PixelMemo`).
    """

    workspace: Workspace
    progress: bool = True
    device: str = "cpu"
    random_state: int = 0
    workers: int | None = None
    log: list[str] = field(default_factory=list)
    pixels: PixelMemo = field(default_factory=PixelMemo, repr=False)


def config_hash(config) -> str:
    """Stable short hash of a stage config (a dataclass or a JSON-serialisable mapping)."""
    payload = asdict(config) if is_dataclass(config) else config
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(*parts) -> str:
    """Hash of stage inputs: arrays, frames, strings or JSON-serialisable values."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            digest.update(str(part.shape).encode() + str(part.dtype).encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, pd.DataFrame | pd.Series):
            digest.update(pd.util.hash_pandas_object(part, index=False).to_numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


#: Cache chunk files tolerated before :meth:`HashCache.compact` merges them.
COMPACT_CHUNKS = 64


class HashCache:
    """Per-image results keyed by content hash, stored as atomically written chunk files.

    Parameters
    ----------
    directory:
        ``artifacts/cache/<stage>-<config hash>``.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._written: dict[str, np.ndarray] = {}  # chunk file name → the hashes this object wrote there

    def _chunks(self) -> list[Path]:
        return sorted(self.directory.glob("chunk-*.parquet")) if self.directory.exists() else []

    def load(self) -> pd.DataFrame:
        """All cached rows (a ``content_hash`` column plus the stage's columns), one per hash."""
        chunks = self._chunks()
        if not chunks:
            return pd.DataFrame({"content_hash": pd.Series(dtype=str)})
        frame = pd.concat([pd.read_parquet(c) for c in chunks], ignore_index=True)
        return frame.drop_duplicates("content_hash", keep="last").reset_index(drop=True)

    def load_table(self, columns: list[str]) -> pa.Table | None:
        """``columns`` of every chunk as one Arrow table (rows may repeat a hash; later rows win), or
        ``None`` when the cache is empty or a chunk lacks one of the columns (an older cache layout).
        Binary columns stay Arrow buffers: no Python object per row."""
        chunks = self._chunks()
        if not chunks or not all(set(columns) <= set(pq.read_schema(c).names) for c in chunks):
            return None
        return pa.concat_tables([pq.read_table(chunk, columns=columns) for chunk in chunks])

    def hashes(self, column: str | None = None) -> np.ndarray:
        """Content hashes of every cached row (repeats included), in chunk order; only the hash column is
        read, and not even that for chunks this object wrote. With ``column``: none (an empty array)
        unless every chunk has that column."""
        chunks = self._chunks()
        if column is not None and not all(column in pq.read_schema(c).names for c in chunks):
            return np.array([], dtype=object)
        parts = [self._written[c.name] if c.name in self._written
                 else pq.read_table(c, columns=["content_hash"]).column("content_hash").to_numpy(zero_copy_only=False)
                 for c in chunks]
        return np.concatenate(parts) if parts else np.array([], dtype=object)

    def add(self, frame: pd.DataFrame) -> str | None:
        """Persist a chunk of results (must include ``content_hash``); returns the chunk's file name."""
        if frame.empty:
            return None
        name = f"chunk-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}.parquet"
        # Uncompressed: the bulky columns are float / pixel bytes that snappy barely shrinks, at twice
        # the write time.
        storage.write_parquet(self.directory / name, frame, compression=None)
        self._written[name] = frame["content_hash"].to_numpy()
        return name

    def compact(self, keep_hashes: set[str] | None = None, *, max_chunks: int = COMPACT_CHUNKS) -> None:
        """Merge the chunks into one when there are more than ``max_chunks`` of them, or when some hold
        rows that are stale (hashes outside ``keep_hashes``) or repeated; otherwise leave them.

        Rewriting every run cost a full read and write of the cache (~3 s for the 70,000-image
        embeddings cache); deciding needs only the hashes.
        """
        chunks = self._chunks()
        if len(chunks) <= 1 and keep_hashes is None:
            return
        if len(chunks) <= max_chunks:
            hashes = pd.Series(self.hashes())
            stale = keep_hashes is not None and not hashes.isin(keep_hashes).all()
            if not stale and not hashes.duplicated().any():
                return
        frame = self.load()
        if keep_hashes is not None:
            frame = frame[frame["content_hash"].isin(keep_hashes)]
        merged = self.add(frame)
        for chunk in chunks:
            if chunk.name != merged:
                chunk.unlink(missing_ok=True)
        # Temp files of writes killed mid-way (never read: readers only glob chunk-*.parquet).
        for leftover in self.directory.glob(".chunk-*.tmp"):
            leftover.unlink(missing_ok=True)


def cache_for(context: StageContext, stage: str, config) -> HashCache:
    return HashCache(context.workspace.artifact_path(f"cache/{stage}-{config_hash(config)}"))


def write_artifact(context: StageContext, name: str, frame: pd.DataFrame, *, stage: str, config, inputs: str,
                   extra: dict | None = None) -> Path:
    """Write ``artifacts/<name>.parquet`` atomically and record it in ``artifacts/index.json``."""
    path = storage.write_parquet(context.workspace.artifact_path(f"{name}.parquet"), frame)
    record_artifact(context, name, stage=stage, config=config, inputs=inputs, extra=extra)
    return path


def record_artifact(context: StageContext, name: str, *, stage: str, config, inputs: str,
                    extra: dict | None = None) -> None:
    index_path = context.workspace.artifact_path("index.json")
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    index[name] = {"stage": stage, "config": asdict(config) if is_dataclass(config) else config,
                   "config_hash": config_hash(config), "inputs": inputs,
                   "written_at": datetime.now(UTC).isoformat(timespec="seconds"), **(extra or {})}
    storage.write_json(index_path, index)


def artifact_entry(workspace: Workspace, name: str) -> dict:
    """What ``artifacts/index.json`` records about artifact ``name`` (config, inputs, summary, …); ``{}`` if none.

    Stages keep their summary there, so a run skipped because its artifacts are current can still report it.
    """
    index_path = workspace.artifact_path("index.json")
    if not index_path.exists():
        return {}
    return json.loads(index_path.read_text(encoding="utf-8")).get(name) or {}


def is_current(context: StageContext, name: str, *, config, inputs: str) -> bool:
    """Whether artifact ``name`` exists and was made from the same config and inputs."""
    entry = artifact_entry(context.workspace, name)
    return (entry.get("config_hash") == config_hash(config) and entry.get("inputs") == inputs
            and any(context.workspace.artifact_path(name + suffix).exists() for suffix in (".parquet", ".npy", ".json")))


def load_sample_array(context: StageContext, name: str, *, ndim: int, producer: str) -> np.ndarray:
    """``artifacts/<name>.npy``, one row per sample, written by stage ``producer``.

    Raises :class:`WorkspaceError` saying which stage to run when it is missing or does not match the
    samples (``ndim`` dimensions, first one = number of samples).
    """
    path = context.workspace.artifact_path(f"{name}.npy")
    if not path.exists():
        raise WorkspaceError(f"{path} does not exist; run the '{producer}' stage first")
    array = np.load(path, allow_pickle=False)
    count = len(context.workspace.samples)
    if array.ndim != ndim or array.shape[0] != count:
        raise WorkspaceError(f"{path} has shape {array.shape}, expected {ndim} dimensions with {count} rows; "
                             f"re-run the '{producer}' stage")
    return array


def read_artifact(workspace: Workspace, name: str) -> pd.DataFrame | None:
    """``artifacts/<name>.parquet`` or ``None`` when the stage has not run."""
    path = workspace.artifact_path(f"{name}.parquet")
    return pd.read_parquet(path) if path.exists() else None
