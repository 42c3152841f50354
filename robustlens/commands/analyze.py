"""``robustlens analyze WORKSPACE``: run the analysis stages (:func:`robustlens.analysis.analyze.analyze`) —
quality metrics, embeddings and their 2-D map, duplicates and leakage, outliers, label issues, issue flags,
model evaluation and slices; the on-request robustness stage with ``--stages robustness`` or ``--stages all``.
Incremental: a re-run computes only what changed, and a killed run resumes. ``--only NAME`` runs one stage alone;
``--list-stages`` prints the stage graph (what each stage reads and writes) and whether each stage is current.

Exit status: 0 done, 1 failure, 2 usage or validation error (an unknown stage, a plugin that does not import,
a device this machine does not have).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from robustlens.commands.common import EXIT_OK, add_shared_options, resolve_device
from robustlens.errors import ValidationError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``analyze`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "analyze",
        help="run the analysis stages on a workspace",
        description="Compute quality metrics, embeddings and their 2-D map, duplicates and leakage, outliers, "
        "label issues, issue flags, model evaluation and slices. Incremental: a re-run computes only "
        "what changed, and a killed run resumes.",
    )
    parser.add_argument(
        "workspace", type=Path, nargs="?", help="the workspace (optional with --list-stages: then no status is shown)"
    )
    parser.add_argument(
        "--stages",
        metavar="LIST",
        help="comma-separated stages to run, with the stages they need that are not current "
        "(default: every analysis stage; 'all' adds the on-request robustness stage)",
    )
    parser.add_argument(
        "--only",
        metavar="NAME",
        help="run just this stage (comma-separated for several): nothing it needs is run first, "
        "and it fails when an input is missing",
    )
    parser.add_argument(
        "--list-stages",
        action="store_true",
        help="print every stage, what it reads and writes, and whether it is current for WORKSPACE",
    )
    parser.add_argument(
        "--plugins", default="", help="comma-separated modules to import first (they register custom metrics)"
    )
    add_shared_options(parser, device=True)
    parser.add_argument("--seed", type=int, default=0, help="random_state of every stage (default 0)")
    add_shared_options(parser, workers=True, quiet=True)
    parser.set_defaults(handler=run)
    return parser


def _names(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def run(args: argparse.Namespace) -> int:
    """Handler of ``robustlens analyze``; prints per-stage seconds (stderr) and the analysis summary (stdout)."""
    import dataclasses
    import importlib

    from robustlens.analysis.analyze import analyze, format_stage_list, list_stages, resolve_stage_names, stage_module
    from robustlens.analysis.workspace import Workspace

    if args.list_stages:
        workspace = Workspace(args.workspace) if args.workspace is not None else None
        print(format_stage_list(list_stages(workspace)))
        return EXIT_OK
    if args.workspace is None:
        raise ValidationError("analyze: the WORKSPACE argument is required (except with --list-stages)")
    if args.stages and args.only:
        raise ValidationError(
            "--stages and --only cannot be combined: --only NAME runs just NAME, --stages runs "
            "the stages and what they need"
        )
    workspace = Workspace(args.workspace)
    stages = _names(args.only) if args.only else _names(args.stages)
    try:
        resolve_stage_names(stages)
    except ValueError as exc:
        raise ValidationError(f"--{'only' if args.only else 'stages'}: {exc}") from exc
    plugins = tuple(p.strip() for p in args.plugins.split(",") if p.strip())
    if plugins and str(Path.cwd()) not in sys.path:
        # The console script does not put the working directory on sys.path; plugins usually live there.
        sys.path.insert(0, str(Path.cwd()))
    for plugin in plugins:
        try:
            importlib.import_module(plugin)
        except ImportError as exc:
            raise ValidationError(f"--plugins: cannot import '{plugin}': {exc}") from exc
    configs = {}
    metrics_config = stage_module("metrics").Config
    if plugins and "plugins" in {f.name for f in dataclasses.fields(metrics_config)}:
        configs["metrics"] = metrics_config(plugins=plugins)
    device = resolve_device(args.device)
    report = analyze(
        workspace,
        stages=stages,
        only=bool(args.only),
        configs=configs,
        progress=not args.quiet,
        device=device,
        random_state=args.seed,
        workers=args.workers,
    )
    for name, seconds in report.seconds.items():
        print(f"  {name:<14} {seconds:7.1f} s", file=sys.stderr)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(analysis_summary(workspace))
    return EXIT_OK


def analysis_summary(workspace: Any) -> str:
    """What the analysis found, in lines: issue counts, accuracy per prediction set, the worst slices."""
    from robustlens.query.summary import analysis_overview

    overview = analysis_overview(workspace)
    lines = [f"Analysis of {overview['num_samples']:,} samples"]
    if overview["issue_counts"]:
        lines.append("  issues:")
        for issue, count in overview["issue_counts"].items():
            lines.append(f"    {issue:<20} {count:6,}  ({count / max(overview['num_samples'], 1):.1%})")
    else:
        lines.append("  issues: none flagged")
    for name, accuracy in overview["accuracy"].items():
        lines.append(f"  accuracy {name}: {accuracy:.2%}")
    if overview.get("label_issue_source"):
        lines.append(f"  label issues from {overview['label_issue_source']} probabilities")
    if overview["worst_slices"]:
        lines.append("  worst slices:")
        for entry in overview["worst_slices"][:5]:
            lines.append(f"    {entry['description']}: {entry['size']:,} samples, accuracy {entry['accuracy']:.1%}")
    return "\n".join(lines)
