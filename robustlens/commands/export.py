"""``robustlens export``: write a filter result, collection or tag to CSV / JSON / Parquet / an ImageFolder
copy, or the review decisions to a relabel file — the dashboard's Export page, headless.

Exit status: 0 written, 1 failure (e.g. a missing image), 2 usage or validation error — including an --out
inside or containing the dataset root or an input file's folder, and an existing --out that robustlens did not
write (``--force`` replaces only exports a ``.robustlens-export`` marker proves are robustlens's own).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robustlens.commands.common import EXIT_OK
from robustlens.errors import ValidationError

FORMATS = ("csv", "json", "parquet", "imagefolder")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "export",
        help="export samples (filter, collection, tag) or review decisions",
        description="Export a set of samples to CSV, JSON, Parquet or an ImageFolder copy, or the review "
        "decisions to a relabel file. Samples: all, or those matching --filter / --query AND any "
        "--collection / --tag. Files are written atomically. A manifest export (the default "
        "columns) re-imports with 'robustlens init --data DATASET --labels FILE'.",
    )
    parser.add_argument("workspace", type=Path)
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output file (.csv, .json, .parquet) or directory (--format imagefolder)",
    )
    parser.add_argument("--format", choices=FORMATS, help="output format (default: from the --out suffix)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--filter",
        dest="filter_json",
        metavar="JSON",
        help="filter as JSON (the dashboard's 'copy filter as JSON'), or @FILE to read it from a file",
    )
    source.add_argument(
        "--query", metavar="URL_OR_QUERY", help="a dashboard URL or its query string, e.g. 'label=coat&issue=dark'"
    )
    parser.add_argument(
        "--collection",
        action="append",
        default=[],
        metavar="NAME",
        help="only samples in this collection (repeat: any of them)",
    )
    parser.add_argument(
        "--tag", action="append", default=[], metavar="NAME", help="only samples with this tag (repeat: any of them)"
    )
    parser.add_argument(
        "--columns",
        choices=("manifest", "all"),
        default="manifest",
        help="manifest: id, path, label, split, metadata (default; re-importable); "
        "all: every per-sample column and tags",
    )
    parser.add_argument(
        "--apply-decisions",
        action="store_true",
        help="apply the latest review decisions (relabel changes the label, exclude drops the sample)",
    )
    parser.add_argument(
        "--relabels",
        action="store_true",
        help="write the relabel file (id, path, old_label, new_label, reviewer, time) instead of samples",
    )
    parser.add_argument(
        "--all-decisions", action="store_true", help="with --relabels: include keep / ambiguous / exclude decisions too"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it exists and robustlens wrote it (its .robustlens-export marker "
        "proves it; anything else is never replaced)",
    )
    parser.add_argument(
        "--raw-csv",
        action="store_true",
        help="write CSV cells as they are; by default text starting with = + - @, tab or CR gets a "
        "leading ' so spreadsheets do not run it as a formula (OWASP)",
    )
    parser.set_defaults(handler=run)
    return parser


def run(args) -> int:
    """Handler of ``robustlens export``; returns the exit status (errors are raised for the CLI to map)."""
    from robustlens.analysis.safety import check_output_location, workspace_inputs
    from robustlens.analysis.workspace import Workspace
    from robustlens.query import export
    from robustlens.query.filters import FilterError
    from robustlens.query.sample_table import load_sample_table
    from robustlens.query.slices import load_slice_membership

    workspace = Workspace(args.workspace)
    fmt = args.format or export.format_from_suffix(args.out)
    if args.relabels and fmt == "imagefolder":
        raise ValidationError("--relabels writes a table: use a .csv, .json or .parquet --out")
    dataset_root, inputs = workspace_inputs(workspace.manifest)
    check_output_location(args.out, option="--out", dataset_root=dataset_root, inputs=inputs)
    table = load_sample_table(workspace)
    store = workspace.curation()
    try:
        if args.relabels:
            frame = export.relabel_frame(table, store, include_all=args.all_decisions)
            export.write_frame(frame, args.out, fmt, overwrite=args.force, raw_csv=args.raw_csv)
            print(f"wrote {len(frame):,} decision(s) to {args.out}")
            return EXIT_OK
        spec = export.resolve_filter(_read_filter(args.filter_json), args.query)
        try:
            positions = export.select_positions(
                table,
                store,
                spec=spec,
                collections=args.collection,
                tags=args.tag,
                slices=load_slice_membership(workspace),
            )
        except FilterError as exc:
            raise ValidationError(str(exc)) from exc
        if fmt == "imagefolder":
            frame = export.export_frame(
                table, positions, columns="manifest", curation=store, apply_decisions=args.apply_decisions
            )
            result = export.export_imagefolder(workspace, frame, args.out, overwrite=args.force, raw_csv=args.raw_csv)
            if result.refused:
                print(f"warning: {result.refused_summary()}", file=sys.stderr)
            count = result.copied
        else:
            frame = export.export_frame(
                table, positions, columns=args.columns, curation=store, apply_decisions=args.apply_decisions
            )
            export.write_frame(frame, args.out, fmt, overwrite=args.force, raw_csv=args.raw_csv)
            count = len(frame)
    finally:
        store.close()
    print(f"wrote {count:,} sample(s) to {args.out}")
    if not count:
        print("warning: the selection is empty", file=sys.stderr)
    return EXIT_OK


def _read_filter(value: str | None) -> str | None:
    if value and value.startswith("@"):
        path = Path(value[1:])
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValidationError(f"cannot read the filter file: {exc.strerror or exc}", file=path) from exc
    return value
