"""The ``robustlens`` command line.

Exit status: 0 success, 1 failure, 2 usage or validation error (bad input, named in the message).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from robustlens import __version__
from robustlens.argtypes import positive_int, unit_fraction
from robustlens.commands import export as export_command
from robustlens.commands import robustness as robustness_command
from robustlens.errors import NotAWorkspaceError, RobustlensError, ValidationError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _add_init(sub) -> None:
    parser = sub.add_parser(
        "init", help="create a workspace from a dataset, predictions and an optional model",
        description="Validate a dataset (ImageFolder tree or manifest table), prediction sets, and optionally a "
                    "model and embeddings, then write a new workspace. The input files are only read.")
    parser.add_argument("workspace", type=Path, help="workspace directory to create")
    parser.add_argument("--data", type=Path, required=True,
                        help="dataset root: <class>/<image> folders, or the folder manifest paths are relative to")
    parser.add_argument("--labels", type=Path,
                        help="manifest CSV/Parquet with path, label, optional split and id; other columns are "
                             "kept as metadata")
    parser.add_argument("--predictions", action="append", default=[], metavar="[NAME=]FILE",
                        help="prediction set: CSV/Parquet with id or path + one column per class, or .npy N×K in "
                             "manifest order (needs --classes); repeat for several models")
    parser.add_argument("--in-sample", action="append", default=[], metavar="NAME",
                        help="prediction set NAME comes from a model trained on these images (label issues then use "
                             "cross-validated probabilities); repeatable")
    parser.add_argument("--classes", help="comma-separated class order (column order of .npy predictions); "
                                          "default: the model config's classes, else sorted labels")
    parser.add_argument("--scores", choices=("auto", "probabilities", "logits"), default="auto",
                        help="what prediction files hold (default: detect)")
    parser.add_argument("--sum-tolerance", type=unit_fraction, default=0.05,
                        help="probability rows off from 1 by at most this are renormalised (default 0.05)")
    parser.add_argument("--model", help="TorchScript file or module:function factory returning an nn.Module")
    parser.add_argument("--model-config", type=Path,
                        help="JSON with input_size, channels, mean, std (and optionally classes)")
    parser.add_argument("--embeddings", type=Path, help=".npy N×D in manifest order, or Parquet with id")
    parser.add_argument("--db", help="SQLAlchemy URL of the curation database (default: SQLite file in the "
                                     "workspace)")
    parser.add_argument("--max-pixels", type=positive_int, default=89_478_485,
                        help="skip images with more pixels than this (decompression-bomb guard)")
    parser.add_argument("--workers", type=positive_int, help="image-decoding threads (default: CPU cores)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild an existing workspace's artifacts (curation data is kept)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_cmd_init)


def _cmd_init(args) -> int:
    from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace, parse_prediction_arg
    from robustlens.analysis.safety import check_init_outputs

    options = InitOptions(
        data=args.data, labels=args.labels, predictions=[parse_prediction_arg(p) for p in args.predictions],
        in_sample=args.in_sample,
        classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
        model=args.model, model_config=args.model_config, embeddings=args.embeddings, db_url=args.db,
        scores=args.scores, sum_tolerance=args.sum_tolerance, max_pixels=args.max_pixels, workers=args.workers,
        force=args.force, progress=not args.quiet)
    check_init_outputs(args.workspace, data=args.data, db_url=args.db,
                       inputs=[args.labels, *(path for _, path in options.predictions), args.model,
                               args.model_config, args.embeddings])
    workspace, warnings = init_workspace(args.workspace, options)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(_describe(workspace))
    return EXIT_OK


def _add_info(sub) -> None:
    parser = sub.add_parser("info", help="show what a workspace holds",
                            description="Print a summary of a workspace: samples, classes, splits, prediction "
                                        "sets with accuracy, model, skipped images and curation state.")
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=_cmd_info)


def _cmd_info(args) -> int:
    from robustlens.query.summary import summarize
    from robustlens.analysis.workspace import Workspace

    workspace = Workspace(args.workspace)
    if args.json:
        import json

        print(json.dumps(summarize(workspace), indent=2, default=str))
    else:
        print(_describe(workspace))
    return EXIT_OK


def _describe(workspace) -> str:
    from robustlens.query.summary import summarize

    info = summarize(workspace)
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


def _add_analyze(sub) -> None:
    parser = sub.add_parser(
        "analyze", help="run the analysis stages on a workspace",
        description="Compute quality metrics, embeddings and their 2-D map, duplicates and leakage, outliers, "
                    "label issues, issue flags, model evaluation and slices. Incremental: a re-run computes only "
                    "what changed, and a killed run resumes.")
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--stages", help="comma-separated subset of stages (default: all)")
    parser.add_argument("--plugins", default="",
                        help="comma-separated modules to import first (they register custom metrics)")
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0, help="random_state of every stage (default 0)")
    parser.add_argument("--workers", type=positive_int, help="image-decoding threads (default: CPU cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_cmd_analyze)


def _cmd_analyze(args) -> int:
    import dataclasses
    import importlib

    from robustlens.analysis.analyze import STAGES, analyze, stage_module
    from robustlens.analysis.workspace import Workspace

    workspace = Workspace(args.workspace)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    unknown = sorted(set(stages or []) - set(STAGES))
    if unknown:
        raise ValidationError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
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
    device = _resolve_device(args.device)
    report = analyze(workspace, stages=stages, configs=configs, progress=not args.quiet, device=device,
                     random_state=args.seed, workers=args.workers)
    for name, seconds in report.seconds.items():
        print(f"  {name:<14} {seconds:7.1f} s", file=sys.stderr)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(_analysis_summary(workspace))
    return EXIT_OK


def _resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValidationError(f"--device {requested}: CUDA is not available on this machine")
    return requested


def _analysis_summary(workspace) -> str:
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


def _add_serve(sub) -> None:
    parser = sub.add_parser("serve", help="start the dashboard on a workspace",
                            description="Start the Streamlit dashboard for a workspace.")
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    parser.add_argument("--export-root", type=Path, metavar="DIR",
                        help="folder the Export page saves under (default: WORKSPACE/exports); the page only "
                             "creates new files and folders there, never replaces one")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="another host name the dashboard may be reached by (repeatable; e.g. this machine's "
                             "DNS name). Requests naming any other host are refused (DNS-rebinding guard); "
                             "127.0.0.1, localhost, ::1 and --host are always allowed")
    parser.set_defaults(handler=_cmd_serve)


def _cmd_serve(args) -> int:
    from robustlens.analysis.workspace import Workspace
    from robustlens.dashboard.host_guard import HostPolicy

    workspace = Workspace(args.workspace)  # fail now, with a clear message, rather than in the browser
    export_root = None
    if args.export_root is not None:
        from robustlens.analysis.safety import check_export_root

        export_root = check_export_root(args.export_root, workspace)
    policy = HostPolicy(args.host, args.allowed_host)  # a bad --allowed-host fails here (exit 2)
    # server_app.py is app.py behind the DNS-rebinding guard (robustlens/dashboard/host_guard.py).
    app = Path(__file__).parent / "dashboard" / "server_app.py"
    env = dict(os.environ, ROBUSTLENS_WORKSPACE=str(args.workspace.resolve()), **policy.to_environ())
    if export_root is not None:
        env["ROBUSTLENS_EXPORT_ROOT"] = str(export_root)
    command = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.host,
               "--server.port", str(args.port), "--server.headless", "true",
               "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
               "--server.fileWatcherType", "none"]
    print(f"robustlens dashboard on http://{args.host}:{args.port} (Ctrl+C to stop)", flush=True)
    if os.name == "posix":
        # Become the server process, so a signal sent to `robustlens serve` (Ctrl+C, a supervisor's
        # SIGTERM) reaches Streamlit itself instead of orphaning it.
        os.execve(sys.executable, command, env)
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustlens",
        description="Inspect an image-classification dataset and its model: quality, duplicates, label errors, "
                    "slices and robustness.")
    parser.add_argument("--version", action="version", version=f"robustlens {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_init(sub)
    _add_info(sub)
    _add_analyze(sub)
    robustness_command.add_parser(sub)
    export_command.add_parser(sub)
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValidationError, NotAWorkspaceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.debug:
            raise
        return EXIT_USAGE
    except RobustlensError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.debug:
            raise
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        # Disk full, I/O error, permission denied: say what and where, never a traceback. Every artifact is
        # written atomically, so the workspace stays readable and a re-run resumes where this one stopped.
        workspace = getattr(args, "workspace", None)
        context = f"'robustlens {args.command}' on {workspace}" if workspace is not None else ""
        print(f"error: {describe_os_error(exc, context=context)}", file=sys.stderr)
        if args.debug:
            raise
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback reaches a user
        database_error = _database_error(exc)
        if database_error is not None:
            print(f"error: {database_error}", file=sys.stderr)
        else:
            print(f"error: unexpected {type(exc).__name__}: {exc}\n(this is a bug in robustlens; rerun with "
                  "--debug for the traceback and report it)", file=sys.stderr)
        if args.debug:
            raise
        return EXIT_FAILURE


#: errno values that mean "the storage failed", with the advice for each.
_STORAGE_ERRORS = {
    "ENOSPC": "the disk is full",
    "EDQUOT": "the disk quota is exhausted",
    "EIO": "an input/output error occurred (failing disk or network file system)",
    "EROFS": "the file system is read-only",
}


def describe_os_error(exc: OSError, *, context: str = "") -> str:
    """One line naming the file and the storage problem behind ``exc``, with what to do next.

    ``context`` names the command and workspace (useful when the library raising it gave no file name).
    """
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    where = f" ({exc.filename})" if exc.filename else ""
    during = f" during {context}" if context else ""
    reason = exc.strerror or str(exc)
    if name in _STORAGE_ERRORS:
        return (f"{_STORAGE_ERRORS[name]}{during}: {reason}{where}. Nothing already written was damaged (every "
                "file is written atomically); free some space or fix the storage, then run the same command again "
                "to resume.")
    return f"{reason}{where}{during}"


def _database_error(exc: Exception) -> str | None:
    """A clear line for a curation-database failure (SQLAlchemy), or ``None`` if ``exc`` is not one."""
    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:
        return None
    if not isinstance(exc, SQLAlchemyError):
        return None
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    text = detail[0] if detail else type(exc).__name__
    if "disk is full" in text or "disk I/O error" in text:
        return (f"the curation database could not be written: {text}. Free some space, then run the command "
                "again; tags, collections and decisions already saved are kept.")
    return f"curation database error: {text}"


if __name__ == "__main__":
    sys.exit(main())
