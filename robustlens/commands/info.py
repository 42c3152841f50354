"""``robustlens info WORKSPACE [--json]``: what a workspace holds — samples, classes, splits, prediction sets
with accuracy, model, embeddings, skipped images and curation state (:func:`robustlens.query.summary.summarize`).

Exit status: 0, 2 when the path is not a workspace.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from robustlens.commands.common import EXIT_OK


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``info`` on the CLI's subparsers."""
    parser = subparsers.add_parser("info", help="show what a workspace holds",
                                   description="Print a summary of a workspace: samples, classes, splits, "
                                               "prediction sets with accuracy, model, skipped images and curation "
                                               "state.")
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Handler of ``robustlens info``: the summary of :func:`workspace_summary` as text or JSON."""
    info = workspace_summary(args.workspace)
    if args.json:
        import json

        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_info(info))
    return EXIT_OK


def describe(workspace: Any) -> str:
    """The human-readable summary of a :class:`~robustlens.analysis.workspace.Workspace` (several lines)."""
    from robustlens.query.summary import summarize

    return format_info(summarize(workspace))


#: Workspace format versions :func:`quick_summary` reads; any other goes through the engine (which upgrades it).
QUICK_FORMAT_VERSIONS = frozenset({1})
#: Curation-database schema versions whose row counts :func:`quick_summary` reads directly (the tables it counts
#: have these names in each); any other goes through :class:`~robustlens.analysis.curation.CurationStore`.
QUICK_SCHEMA_VERSIONS = frozenset({1, 2})


def workspace_summary(root: Path) -> dict[str, Any]:
    """What :func:`robustlens.query.summary.summarize` returns for the workspace at ``root``, read quickly.

    :func:`quick_summary` when it can (no pandas: ``robustlens info`` starts in a fraction of a second);
    otherwise — no or a damaged ``workspace.json``, an older format, a curation database that does not open —
    the engine's :class:`~robustlens.analysis.workspace.Workspace` and ``summarize``, which raise the error
    that names the problem (or upgrade the workspace).
    """
    quick = quick_summary(root)
    if quick is not None:
        return quick
    from robustlens.analysis.workspace import Workspace
    from robustlens.query.summary import summarize

    return summarize(Workspace(root))


def quick_summary(root: Path) -> dict[str, Any] | None:
    """:func:`robustlens.query.summary.summarize` of the workspace at ``root`` without importing pandas, or
    ``None`` when this reader cannot be sure of the answer (then the caller uses the engine).

    Reads ``workspace.json`` and ``ingest_report.json`` as JSON, the ``label``, ``label_index`` and ``split``
    columns of ``samples.parquet`` with pyarrow, the prediction sets with numpy and the curation counts from the
    curation store. Same keys, values and key order as ``summarize`` (tests compare the two).
    """
    import json

    manifest_path = Path(root) / "workspace.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format_version") not in QUICK_FORMAT_VERSIONS:
        return None

    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    root = Path(root)
    try:  # ParquetFile.read, not read_table (whose dataset layer imports pandas)
        samples = pq.ParquetFile(root / "samples.parquet").read(columns=["label", "label_index", "split"])
    except (OSError, ValueError, KeyError):  # missing or damaged (pyarrow's errors are these): the engine says so
        return None
    report_path = root / "ingest_report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else {}
    model = manifest.get("model")
    with_model = None
    if model is not None:
        config = model["config"]
        with_model = (f"{model.get('file') or model.get('factory')} (input {config['input_size'][0]}×"
                      f"{config['input_size'][1]}×{config['channels']})")
    embeddings = manifest.get("embeddings")
    labels = _integers(samples.column("label_index"))
    if labels is None:
        return None

    def accuracy(entry: dict[str, Any]) -> float:
        probabilities = np.load(root / entry["file"], allow_pickle=False)
        return float((probabilities.argmax(axis=1) == labels).mean())

    curation: dict[str, int] | None
    if manifest.get("db_url"):
        from robustlens.analysis.curation import CurationStore
        from robustlens.errors import WorkspaceError

        try:
            store = CurationStore(manifest["db_url"])
        except WorkspaceError:
            return None  # the engine's path says why
        try:
            curation = store.counts()
        finally:
            store.close()
    else:
        curation = _sqlite_counts(root / "curation.db")
        if curation is None:
            return None
    return {
        "workspace": str(root),
        "dataset_root": str(Path(manifest["dataset"]["root"])),
        "dataset_kind": manifest["dataset"]["kind"],
        "num_samples": samples.num_rows,
        "num_skipped": len(report.get("skipped", [])),
        "classes": list(manifest["classes"]),
        "class_counts": _value_counts(pc.value_counts(samples.column("label"))),
        "split_counts": dict(sorted(_value_counts(pc.value_counts(samples.column("split"))).items())),
        "metadata_columns": [c.removeprefix("meta.") for c in manifest.get("metadata_columns", [])],
        "prediction_sets": {
            name: {"accuracy": accuracy(entry), "score_kind": entry["score_kind"], "source": entry["source"]}
            for name, entry in manifest.get("prediction_sets", {}).items()},
        "model": with_model,
        "embeddings": f"imported, {embeddings['dim']} dimensions" if embeddings else None,
        "curation": curation,
    }


def _sqlite_counts(path: Path) -> dict[str, int] | None:
    """``CurationStore.counts()`` of the workspace's default SQLite curation database, read with the standard
    library (SQLAlchemy alone costs more CPU than the rest of ``robustlens info``), read-only: nothing is
    created or migrated. ``None`` when the file's schema is not one of :data:`QUICK_SCHEMA_VERSIONS` or it
    cannot be read (the caller then opens it through the engine, which says why)."""
    import sqlite3

    zero = {"tags": 0, "tag_assignments": 0, "collections": 0, "review_decisions": 0}
    if not path.exists():
        return zero  # the store creates an empty database on first use: nothing curated yet
    tables = {"tags": "tags", "tag_assignments": "sample_tags", "collections": "collections",
              "review_decisions": "review_decisions"}
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = connection.execute("SELECT value FROM schema_info WHERE key = 'schema_version'").fetchone()
            if row is None or not str(row[0]).isdigit() or int(row[0]) not in QUICK_SCHEMA_VERSIONS:
                return None
            return {key: int(connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                    for key, table in tables.items()}
        finally:
            connection.close()
    except sqlite3.Error:
        return None


def _integers(column: Any) -> Any:
    """A pyarrow integer column without nulls as a numpy array (``None`` for any other column).

    Read from the column's data buffer: pyarrow's own ``to_numpy`` imports pandas.
    """
    import numpy as np
    import pyarrow as pa

    array = column.combine_chunks()
    if not pa.types.is_integer(array.type) or array.null_count:
        return None
    kind = "i" if pa.types.is_signed_integer(array.type) else "u"
    dtype = np.dtype(f"<{kind}{array.type.bit_width // 8}")
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _value_counts(counts: Any) -> dict[str, int]:
    """``{str(value): count}`` of a pyarrow ``value_counts`` result, most frequent first (ties: first seen) and
    without nulls — the order of pandas' ``Series.value_counts()``."""
    pairs = [(value, int(count)) for value, count in zip(counts.field("values").to_pylist(),
                                                          counts.field("counts").to_pylist(), strict=True)
             if value is not None]
    return {str(value): count for value, count in sorted(pairs, key=lambda pair: -pair[1])}


def format_info(info: dict[str, Any]) -> str:
    """Lines of ``robustlens info`` from the dict :func:`robustlens.query.summary.summarize` returns."""
    lines = [f"Workspace {info['workspace']}",
             f"  dataset     {info['dataset_root']} ({info['dataset_kind']})",
             f"  samples     {info['num_samples']:,} ingested, {info['num_skipped']:,} skipped",
             f"  classes     {len(info['classes'])}: {', '.join(info['classes'][:12])}"
             + (" …" if len(info['classes']) > 12 else ""),
             "  splits      " + ", ".join(f"{k} {v:,}" for k, v in info["split_counts"].items())]
    if info["metadata_columns"]:
        lines.append(f"  metadata    {', '.join(info['metadata_columns'])}")
    for name, entry in info["prediction_sets"].items():
        lines.append(f"  predictions {name}: accuracy {entry['accuracy']:.2%} ({entry['score_kind']})")
    if not info["prediction_sets"]:
        lines.append("  predictions none")
    lines.append(f"  model       {info['model'] or 'none'}")
    lines.append(f"  embeddings  {info['embeddings'] or 'none (computed by analyze)'}")
    curation = info["curation"]
    lines.append(f"  curation    {curation['tags']} tags, {curation['collections']} collections, "
                 f"{curation['review_decisions']} review decisions")
    return "\n".join(lines)
