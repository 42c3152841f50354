"""The ``robustlens`` command line: builds the parser from the subcommands in :mod:`robustlens.commands` (one
module each) and maps what a command raises to an exit status (:func:`robustlens.commands.common.run_handler`).

Exit status: 0 success, 1 failure, 2 usage or validation error (bad input, named in the message).

Building the parser imports no torch, pandas or streamlit: each command imports what it needs when it runs, so
``robustlens --help`` starts at once.
"""

from __future__ import annotations

import argparse
import sys

from robustlens import __version__
from robustlens.commands import analyze, export, info, init, robustness, serve
from robustlens.commands.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, describe_os_error, resolve_device, run_handler

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "COMMANDS",
    "build_parser",
    "describe_os_error",
    "main",
    "resolve_device",
]

#: The subcommands in the order ``robustlens --help`` lists them; each module has ``add_parser(subparsers)``.
COMMANDS = (init, info, analyze, robustness, export, serve)


def build_parser() -> argparse.ArgumentParser:
    """The ``robustlens`` parser with every subcommand; each sets ``handler`` (``args -> exit status``)."""
    parser = argparse.ArgumentParser(
        prog="robustlens",
        description="Inspect an image-classification dataset and its model: quality, duplicates, label errors, "
        "slices and robustness.",
    )
    parser.add_argument("--version", action="version", version=f"robustlens {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit status.

    argparse exits with status 2 on a malformed command line; errors raised by a command become an exit status
    and one ``error: …`` line on stderr (``--debug`` re-raises them for the traceback).
    """
    args = build_parser().parse_args(argv)
    return run_handler(args)


if __name__ == "__main__":
    sys.exit(main())
