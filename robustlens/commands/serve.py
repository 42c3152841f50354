"""``robustlens serve WORKSPACE``: start the Streamlit dashboard on a workspace, behind the DNS-rebinding guard
(:mod:`robustlens.dashboard.host_guard`). On POSIX the command becomes the server process.

Exit status: the server's; 2 when the path is not a workspace or an option is invalid.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from robustlens.commands.common import EXIT_OK


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "serve", help="start the dashboard on a workspace", description="Start the Streamlit dashboard for a workspace."
    )
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    parser.add_argument(
        "--export-root",
        type=Path,
        metavar="DIR",
        help="folder the Export page saves under (default: WORKSPACE/exports); the page only "
        "creates new files and folders there, never replaces one",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another host name the dashboard may be reached by (repeatable; e.g. this machine's "
        "DNS name). Requests naming any other host are refused (DNS-rebinding guard); "
        "127.0.0.1, localhost, ::1 and --host are always allowed",
    )
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Handler of ``robustlens serve``: checks the workspace and options, then runs Streamlit."""
    from robustlens.analysis.workspace import Workspace
    from robustlens.dashboard.host_guard import HostPolicy

    workspace = Workspace(args.workspace)  # fail now, with a clear message, rather than in the browser
    export_root = None
    if args.export_root is not None:
        from robustlens.analysis.safety import check_export_root

        export_root = check_export_root(args.export_root, workspace)
    policy = HostPolicy(args.host, args.allowed_host)  # a bad --allowed-host fails here (exit 2)
    # server_app.py is app.py behind the DNS-rebinding guard (robustlens/dashboard/host_guard.py).
    app = Path(__file__).resolve().parent.parent / "dashboard" / "server_app.py"
    env = dict(os.environ, ROBUSTLENS_WORKSPACE=str(args.workspace.resolve()), **policy.to_environ())
    if export_root is not None:
        env["ROBUSTLENS_EXPORT_ROOT"] = str(export_root)
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.address",
        args.host,
        "--server.port",
        str(args.port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
        "--server.fileWatcherType",
        "none",
    ]
    print(f"robustlens dashboard on http://{args.host}:{args.port} (Ctrl+C to stop)", flush=True)
    if os.name == "posix":
        # Become the server process, so a signal sent to `robustlens serve` (Ctrl+C, a supervisor's
        # SIGTERM) reaches Streamlit itself instead of orphaning it.
        os.execve(sys.executable, command, env)
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return EXIT_OK
