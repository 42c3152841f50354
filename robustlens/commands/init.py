"""``robustlens init WORKSPACE --data DIR ...``: validate a dataset, prediction sets and optionally a model and
embeddings, then write a new workspace (:func:`robustlens.analysis.ingest.pipeline.init_workspace`).

Exit status: 0 written, 1 failure, 2 usage or validation error (a bad input file, row or column is named; nothing
was written, the input files are only read).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robustlens.argtypes import positive_int, unit_fraction
from robustlens.commands.common import EXIT_OK, add_quiet_option, add_workers_option


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``init`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "init",
        help="create a workspace from a dataset, predictions and an optional model",
        description="Validate a dataset (ImageFolder tree or manifest table), prediction sets, and optionally a "
        "model and embeddings, then write a new workspace. The input files are only read.",
    )
    parser.add_argument("workspace", type=Path, help="workspace directory to create")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="dataset root: <class>/<image> folders, or the folder manifest paths are relative to",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        help="manifest CSV/Parquet with path, label, optional split and id; other columns are kept as metadata",
    )
    parser.add_argument(
        "--predictions",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="prediction set: CSV/Parquet with id or path + one column per class, or .npy N×K in "
        "manifest order (needs --classes); repeat for several models",
    )
    parser.add_argument(
        "--in-sample",
        action="append",
        default=[],
        metavar="NAME",
        help="prediction set NAME comes from a model trained on these images (label issues then use "
        "cross-validated probabilities); repeatable",
    )
    parser.add_argument(
        "--classes",
        help="comma-separated class order (column order of .npy predictions); "
        "default: the model config's classes, else sorted labels",
    )
    parser.add_argument(
        "--scores",
        choices=("auto", "probabilities", "logits"),
        default="auto",
        help="what prediction files hold (default: detect)",
    )
    parser.add_argument(
        "--sum-tolerance",
        type=unit_fraction,
        default=0.05,
        help="probability rows off from 1 by at most this are renormalised (default 0.05)",
    )
    parser.add_argument("--model", help="TorchScript file or module:function factory returning an nn.Module")
    parser.add_argument(
        "--model-config", type=Path, help="JSON with input_size, channels, mean, std (and optionally classes)"
    )
    parser.add_argument("--embeddings", type=Path, help=".npy N×D in manifest order, or Parquet with id")
    parser.add_argument("--db", help="SQLAlchemy URL of the curation database (default: SQLite file in the workspace)")
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=89_478_485,
        help="skip images with more pixels than this (decompression-bomb guard)",
    )
    add_workers_option(parser)
    parser.add_argument(
        "--force", action="store_true", help="rebuild an existing workspace's artifacts (curation data is kept)"
    )
    add_quiet_option(parser)
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Handler of ``robustlens init``; prints the new workspace's summary and returns the exit status."""
    from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace, parse_prediction_arg
    from robustlens.analysis.safety import check_init_outputs
    from robustlens.commands.info import describe

    options = InitOptions(
        data=args.data,
        labels=args.labels,
        predictions=[parse_prediction_arg(p) for p in args.predictions],
        in_sample=args.in_sample,
        classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
        model=args.model,
        model_config=args.model_config,
        embeddings=args.embeddings,
        db_url=args.db,
        scores=args.scores,
        sum_tolerance=args.sum_tolerance,
        max_pixels=args.max_pixels,
        workers=args.workers,
        force=args.force,
        progress=not args.quiet,
    )
    check_init_outputs(
        args.workspace,
        data=args.data,
        db_url=args.db,
        inputs=[
            args.labels,
            *(path for _, path in options.predictions),
            args.model,
            args.model_config,
            args.embeddings,
        ],
    )
    workspace, warnings = init_workspace(args.workspace, options)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(describe(workspace))
    return EXIT_OK
