"""What every analysis stage shares: its context, config hashing, per-image caches and artifact writes.

Stages are idempotent and incremental. Per-image results (metrics, embeddings) are cached by the
image's content hash under ``artifacts/cache/<stage>-<config hash>/`` in chunk files written atomically
as work proceeds, so a run killed half-way (even by SIGKILL) resumes where it stopped and a re-run after
adding images computes only the new ones. Whole-dataset stages record the fingerprint of their inputs
in ``artifacts/index.json`` and are skipped when it is unchanged.

The stage protocol lives here too (:class:`StageSpec`, :class:`StageResult`, :func:`config_error`): every stage
module declares ``SPEC = StageSpec(...)`` — its name, its ``Config`` dataclass (validated at construction), the
artifacts it reads and writes — and ``run(context, config) -> StageResult``. The orchestrator
(:mod:`robustlens.analysis.analyze`) derives the dependency graph from those declarations.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from robustlens.analysis import artifacts, storage
from robustlens.analysis.loader import PixelMemo, iter_decoded
from robustlens.analysis.safety import RefusedFiles
from robustlens.analysis.workspace import Workspace
from robustlens.errors import ConfigError, ValidationError


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
    refused:
        Dataset files refused while this run read them (outside the dataset root, changed since init): one
        collection per run, shared by every stage that reads images (see :func:`decode_distinct`).
    """

    workspace: Workspace
    progress: bool = True
    device: str = "cpu"
    random_state: int = 0
    workers: int | None = None
    #: Torch intra-op threads for stages that set them (robustness); ``None`` leaves torch's setting.
    threads: int | None = None
    log: list[str] = field(default_factory=list)
    pixels: PixelMemo = field(default_factory=PixelMemo, repr=False)
    refused: RefusedFiles = field(default_factory=RefusedFiles, repr=False)


def config_hash(config: Any) -> str:
    """Stable short hash of a stage config (a dataclass or a JSON-serialisable mapping)."""
    payload = asdict(config) if is_dataclass(config) and not isinstance(config, type) else config
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(*parts: Any) -> str:
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
        # chunk file name → its hashes, for the chunks this object wrote or already read (a chunk never changes)
        self._hashes: dict[str, np.ndarray] = {}

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
        read, and only once per chunk (not at all for chunks this object wrote). With ``column``: none (an
        empty array) unless every chunk has that column."""
        chunks = self._chunks()
        if column is not None and not all(column in pq.read_schema(c).names for c in chunks):
            return np.array([], dtype=object)
        for c in chunks:
            if c.name not in self._hashes:
                table = pq.read_table(c, columns=["content_hash"])
                self._hashes[c.name] = table.column("content_hash").to_numpy(zero_copy_only=False)
        parts = [self._hashes[c.name] for c in chunks]
        return np.concatenate(parts) if parts else np.array([], dtype=object)

    def add(self, frame: pd.DataFrame) -> str | None:
        """Persist a chunk of results (must include ``content_hash``); returns the chunk's file name."""
        if frame.empty:
            return None
        name = f"chunk-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}.parquet"
        # Uncompressed: the bulky columns are float / pixel bytes that snappy barely shrinks, at twice
        # the write time.
        storage.write_parquet(self.directory / name, frame, compression=None)
        self._hashes[name] = frame["content_hash"].to_numpy()
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


def cache_for(context: StageContext, stage: str, config: Any) -> HashCache:
    return HashCache(context.workspace.artifact_path(f"cache/{stage}-{config_hash(config)}"))


def write_artifact(
    context: StageContext,
    name: str,
    frame: pd.DataFrame,
    *,
    stage: str,
    config: Any,
    inputs: str,
    extra: dict | None = None,
) -> Path:
    """Write ``artifacts/<name>.parquet`` atomically and record it in ``artifacts/index.json``."""
    path = storage.write_parquet(context.workspace.artifact_path(f"{name}.parquet"), frame)
    record_artifact(context, name, stage=stage, config=config, inputs=inputs, extra=extra)
    return path


def record_artifact(
    context: StageContext, name: str, *, stage: str, config: Any, inputs: str, extra: dict | None = None
) -> None:
    index_path = context.workspace.artifact_path("index.json")
    index = artifacts.read_index(context.workspace)
    index[name] = {
        "stage": stage,
        "config": asdict(config) if is_dataclass(config) and not isinstance(config, type) else config,
        "config_hash": config_hash(config),
        "inputs": inputs,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    storage.write_json(index_path, index)


def artifact_entry(workspace: Workspace, name: str) -> dict:
    """What ``artifacts/index.json`` records about artifact ``name`` (config, inputs, summary, …); ``{}`` if none.

    Stages keep their summary there, so a run skipped because its artifacts are current can still report it.
    """
    return artifacts.index_entry(workspace, name)


def is_current(context: StageContext, name: str, *, config: Any, inputs: str) -> bool:
    """Whether artifact ``name`` exists and was made from the same config and inputs."""
    entry = artifact_entry(context.workspace, name)
    return (
        entry.get("config_hash") == config_hash(config)
        and entry.get("inputs") == inputs
        and any(context.workspace.artifact_path(name + suffix).exists() for suffix in (".parquet", ".npy", ".json"))
    )


def load_sample_array(context: StageContext, name: str, *, ndim: int, producer: str) -> np.ndarray:
    """``artifacts/<name>.npy``, one row per sample, written by stage ``producer``.

    Raises :class:`WorkspaceError` saying which stage to run when it is missing or does not match the
    samples (``ndim`` dimensions, first one = number of samples).
    """
    return artifacts.read_sample_array(context.workspace, name, ndim=ndim, stage=producer)


def read_artifact(workspace: Workspace, name: str) -> pd.DataFrame | None:
    """``artifacts/<name>.parquet`` or ``None`` when the stage has not run."""
    return artifacts.read_table(workspace, name)


# -- dataset files refused at read time ------------------------------------------------------------------------
#: ``artifacts/refused_files.json``: the dataset files the image-reading stages refused on their last run.
REFUSED_ARTIFACT = "refused_files.json"


def decode_distinct(
    context: StageContext, rows: np.ndarray, *, batch_size: int, workers: int, desc: str
) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Decode the samples ``rows`` (one per content hash still to compute), skipping refused files.

    Every file is read through :func:`~robustlens.analysis.loader.iter_decoded` with the content hashes of
    ``samples.parquet``: a file that now resolves outside the dataset root is never opened, and one whose bytes
    no longer have the hash recorded at ``init`` is not used (the hash is taken on the bytes already read for
    decoding: no second read). Both are recorded in ``context.refused`` and left out of the batches. Rows
    refused earlier in the same run (by another stage) are not read again. When a refused row shares its
    content hash with other samples, the next of them is decoded instead (its bytes have that hash, so its
    results are the hash's), until one succeeds or none is left.

    Yields
    ------
    ``(indices, pixels)`` batches as :func:`~robustlens.analysis.loader.iter_decoded` does (never empty).
    """
    samples = context.workspace.samples
    hashes = samples["content_hash"].to_numpy()
    paths = samples["path"].tolist()
    done_before = {entry.index for entry in context.refused.entries}
    rows = np.asarray(rows, dtype=np.int64).tolist()
    queue = [row for row in rows if row not in done_before]
    stand_in_for = [row for row in rows if row in done_before]
    tried = set(rows) | done_before
    by_hash: dict[str, list[int]] | None = None
    while True:
        retry = []
        if stand_in_for:
            if by_hash is None:
                by_hash = pd.Series(np.arange(len(hashes))).groupby(hashes).apply(list).to_dict()
            # Another file with the same recorded content hash stands in for each refused one.
            for index in stand_in_for:
                for other in by_hash.get(hashes[index], []):
                    if other not in tried:
                        retry.append(other)
                        tried.add(other)
                        break
        pending = np.asarray(sorted(queue + retry), dtype=np.int64)
        queue = []
        if not len(pending):
            return
        before = {entry.index for entry in context.refused.entries}
        for indices, pixels in iter_decoded(
            context.workspace.dataset_root,
            paths,
            cast("Sequence[int]", pending),
            batch_size=batch_size,
            workers=workers,
            progress=context.progress,
            memo=context.pixels,
            desc=desc,
            expected_hashes=hashes,
            refused=context.refused,
        ):
            if len(indices):
                yield indices, pixels
        stand_in_for = sorted({entry.index for entry in context.refused.entries} - before)


def refused_rows(context: StageContext) -> np.ndarray:
    """``(N,)`` bool: samples whose file was refused during this run."""
    mask = np.zeros(len(context.workspace.samples), dtype=bool)
    for entry in context.refused.entries:
        mask[entry.index] = True
    return mask


def record_refused(context: StageContext, stage: str, rows: np.ndarray | None = None) -> list[dict]:
    """Write what ``stage`` refused this run into ``artifacts/refused_files.json``; returns its entries.

    The file keeps, per stage, the refused files of that stage's last run (a stage that refused nothing this run
    clears its list), and ``files``: every refused sample once, with the stages that skipped it.
    ``rows`` (optional ``(N,)`` bool) limits the entries to the samples the stage left without results.
    """
    samples = context.workspace.samples
    ids = samples["id"].to_numpy()
    entries, seen = [], set()
    for entry in context.refused.entries:
        if entry.index in seen or (rows is not None and not rows[entry.index]):
            continue
        seen.add(entry.index)
        entries.append(
            {
                "index": int(entry.index),
                "id": str(ids[entry.index]),
                "path": entry.path,
                "kind": entry.kind,
                "reason": entry.reason,
            }
        )
    path = context.workspace.artifact_path(REFUSED_ARTIFACT)
    report = read_refused(context.workspace)
    report.setdefault("stages", {})[stage] = entries
    merged: dict[int, dict] = {}
    for name, listed in report["stages"].items():
        for entry in listed:
            merged.setdefault(entry["index"], {**entry, "stages": []})["stages"].append(name)
    report["files"] = [merged[index] for index in sorted(merged)]
    report["count"] = len(report["files"])
    report["updated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    storage.write_json(path, report)
    return entries


def read_refused(workspace: Workspace) -> dict:
    """``artifacts/refused_files.json`` (``count``, ``files``, ``stages``), or an empty report."""
    return artifacts.read_refused(workspace)


def describe_refused(entries: list[dict], *, limit: int = 10) -> str:
    """``"N dataset file(s) refused, their samples skipped: path (changed since init); …"`` for a report line;
    ``""`` for none."""
    if not entries:
        return ""
    words = {"changed_since_init": "changed since init", "outside_root": "resolves outside the dataset root"}
    shown = "; ".join(f"{e['path']} ({words.get(e['kind'], e['kind'])})" for e in entries[:limit])
    more = f"; … {len(entries) - limit} more" if len(entries) > limit else ""
    return (
        f"{len(entries)} dataset file(s) refused, their samples skipped (no metrics, left out of "
        f"the embedding-based stages): {shown}{more}"
    )


def excluded_rows(workspace: Workspace) -> np.ndarray:
    """``(N,)`` bool: samples the embeddings stage had no image for (their file was refused and nothing was
    cached for its content hash). Their rows of ``embeddings.npy``, ``visual_features.npy`` and
    ``thumbnails.npy`` are zeros standing for "no value"; the stages that read those artifacts leave these
    samples out and give them NaN / no flag."""
    mask = np.zeros(len(workspace.samples), dtype=bool)
    listed = artifact_entry(workspace, "embeddings").get("excluded_rows") or []
    listed = [row for row in listed if 0 <= int(row) < len(mask)]
    mask[np.asarray(listed, dtype=np.int64)] = True
    return mask


# -- the stage protocol ----------------------------------------------------------------------------------------
#: Columns of every ``artifacts/flags_<stage>.parquet`` table (long: one row per sample and issue) that the
#: ``issues`` stage gathers: the sample ``id``, the ``issue`` name, its ``severity`` in [0, 1] and a
#: human-readable ``explanation``.
FLAG_COLUMNS: tuple[str, ...] = ("id", "issue", "severity", "explanation")

#: Inputs a stage may read that come from ``robustlens init``, not from another stage: ``samples``
#: (``samples.parquet``, and embeddings imported at init), ``predictions`` (``predictions/*.npy``) and ``model``
#: (``model/``).
WORKSPACE_INPUTS: tuple[str, ...] = ("samples", "predictions", "model")


class StageInputError(ValidationError, ValueError):
    """Input a stage cannot use (an unknown prediction set, a malformed flags table, too few classes).

    A :class:`~robustlens.errors.ValidationError` (exit status 2 in the CLI) and, as before, a ``ValueError``.
    """


def config_error(stage: str, field_name: str, expected: str, got: object) -> ConfigError:
    """The :class:`~robustlens.errors.ConfigError` of stage ``stage``'s config field ``field_name``."""
    return ConfigError(f"stage '{stage}'", field_name, expected, got)


def check_number(
    stage: str,
    config: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
    expected: str | None = None,
) -> None:
    """Raise :func:`config_error` unless ``config.<name>`` is a (finite) number in the given range.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``; ``integer`` requires an int (a bool is
    neither); ``optional`` also accepts ``None``. ``expected`` overrides the generated description.
    """
    value = getattr(config, name)
    if optional and value is None:
        return
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    if expected is None:
        word = "an integer" if integer else "a number"
        if low is not None and high is not None:
            expected = f"{word} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            expected = f"{word} {'>' if low_open else '>='} {low}"
        elif high is not None:
            expected = f"{word} {'<' if high_open else '<='} {high}"
        else:
            expected = word
        if optional:
            expected += " or None"
    raise config_error(stage, name, expected, value)


def check_choice(stage: str, config: object, name: str, choices: Iterable[str]) -> None:
    """Raise :func:`config_error` unless ``config.<name>`` is one of ``choices``."""
    choices = tuple(choices)
    if getattr(config, name) not in choices:
        raise config_error(stage, name, f"one of {choices}", getattr(config, name))


class StageResult(dict[str, Any]):
    """What one run of a stage did.

    The object *is* the stage's summary (a JSON-serialisable ``dict`` whose keys each stage documents, e.g.
    ``skipped``, counts, thresholds), so ``result["skipped"]`` and ``json.dumps(result)`` work as they did when
    stages returned plain dicts; the typed part is in attributes.

    Attributes
    ----------
    stage:
        The stage's name.
    artifacts:
        Names of the artifacts written by this run (``artifacts/<name>.*``); empty when nothing was written.
    current:
        ``True`` when the stage found its artifacts current (same config and inputs) and wrote nothing.
    summary:
        The summary as a plain ``dict``.
    """

    def __init__(self, stage: str, summary: dict[str, Any], *, artifacts: Iterable[str] = (), current: bool = False):
        super().__init__(summary)
        self.stage = stage
        self.artifacts: tuple[str, ...] = tuple(artifacts)
        self.current = bool(current)

    @property
    def summary(self) -> dict[str, Any]:
        return dict(self)

    def __repr__(self) -> str:
        return (
            f"StageResult(stage={self.stage!r}, artifacts={self.artifacts!r}, current={self.current!r}, "
            f"summary={dict(self)!r})"
        )


@dataclass(frozen=True)
class StageSpec:
    """The declaration of one stage: what the orchestrator needs to place it in the dependency graph.

    Attributes
    ----------
    name:
        Stage name (``robustlens analyze --stages NAME``).
    config:
        Its config class: a dataclass whose every field has a default, validated at construction
        (``__post_init__`` raises :class:`~robustlens.errors.ConfigError` naming stage, field, expected, got).
    run:
        ``run(context, config) -> StageResult``: writes the stage's artifacts (or finds them current).
    reads:
        What the stage needs: artifact names (``artifacts/<name>.*``) and :data:`WORKSPACE_INPUTS`. The stages
        writing them run first, and are pulled into a run when they are not current.
    writes:
        Artifacts every run writes.
    may_write:
        Artifacts written only in some runs (a per-prediction-set name as a glob pattern, an optional table, a
        cache another stage fills on demand).
    uses:
        Read when present, not required: ordered after their writers, never pulled in.
    reads_late:
        Read when present, without ordering the stage after their writer: the stage reconciles a later change
        of them itself on its next run (robustness re-ranks its slice table when ``slices.parquet`` changed,
        without attacking again). This is how a genuine data cycle (robustness → fragile flags → slices →
        robustness's slice table) stays out of the graph; the orchestrator re-runs such a stage once at the end
        when one of these was rewritten after it in the same run.
    on_request:
        Not part of a plain ``robustlens analyze`` (``--stages NAME`` or ``--stages all`` runs it).
    precondition:
        ``(context, config) -> reason or None``: a reason skips the stage with a warning (the data cannot
        support it) and the other stages still run.
    description:
        One line for ``--list-stages``.
    """

    name: str
    config: type
    run: Callable[[StageContext, Any], StageResult]
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    may_write: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    reads_late: tuple[str, ...] = ()
    on_request: bool = False
    precondition: Callable[[StageContext, Any], str | None] | None = None
    description: str = ""

    def result(
        self, summary: dict[str, Any], *, current: bool | None = None, artifacts: Iterable[str] | None = None
    ) -> StageResult:
        """Wrap ``summary`` as this stage's :class:`StageResult`.

        ``current`` defaults to ``summary.get("skipped") is True``; ``artifacts`` to nothing when current and
        to :attr:`writes` otherwise.
        """
        if current is None:
            current = summary.get("skipped") is True
        if artifacts is None:
            artifacts = () if current else self.writes
        return StageResult(self.name, summary, artifacts=artifacts, current=current)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Everything the stage reads, required or not."""
        return self.reads + self.uses + self.reads_late
