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
    parser = subparsers.add_parser(
        "info",
        help="show what a workspace holds",
        description="Print a summary of a workspace: samples, classes, splits, "
        "prediction sets with accuracy, model, skipped images and curation "
        "state.",
    )
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


def workspace_summary(root: Path) -> dict[str, Any]:
    """What :func:`robustlens.query.summary.summarize` returns for the workspace at ``root``, read quickly.

    :func:`robustlens.query.summary.read_summary` when it can (no pandas: ``robustlens info`` starts in a
    fraction of a second);
    otherwise — no or a damaged ``workspace.json``, an older format, a curation database that does not open —
    the engine's :class:`~robustlens.analysis.workspace.Workspace` and ``summarize``, which raise the error
    that names the problem (or upgrade the workspace).
    """
    from robustlens.query.summary import read_summary

    quick = read_summary(root)
    if quick is not None:
        return quick
    from robustlens.analysis.workspace import Workspace
    from robustlens.query.summary import summarize

    return summarize(Workspace(root))


def format_info(info: dict[str, Any]) -> str:
    """Lines of ``robustlens info`` from the dict :func:`robustlens.query.summary.summarize` returns."""
    lines = [
        f"Workspace {info['workspace']}",
        f"  dataset     {info['dataset_root']} ({info['dataset_kind']})",
        f"  samples     {info['num_samples']:,} ingested, {info['num_skipped']:,} skipped",
        f"  classes     {len(info['classes'])}: {', '.join(info['classes'][:12])}"
        + (" …" if len(info["classes"]) > 12 else ""),
        "  splits      " + ", ".join(f"{k} {v:,}" for k, v in info["split_counts"].items()),
    ]
    if info["metadata_columns"]:
        lines.append(f"  metadata    {', '.join(info['metadata_columns'])}")
    for name, entry in info["prediction_sets"].items():
        lines.append(f"  predictions {name}: accuracy {entry['accuracy']:.2%} ({entry['score_kind']})")
    if not info["prediction_sets"]:
        lines.append("  predictions none")
    lines.append(f"  model       {info['model'] or 'none'}")
    lines.append(f"  embeddings  {info['embeddings'] or 'none (computed by analyze)'}")
    curation = info["curation"]
    lines.append(
        f"  curation    {curation['tags']} tags, {curation['collections']} collections, "
        f"{curation['review_decisions']} review decisions"
    )
    return "\n".join(lines)
