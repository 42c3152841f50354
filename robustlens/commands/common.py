"""What every ``robustlens`` subcommand shares: the exit statuses, the shared options (``--device``,
``--workers``, ``--quiet``; one definition each), the one device resolver, and the mapping from an error to an
exit status and a one-line message.

Importing this module is cheap (no torch, pandas or streamlit): the parser is built from it for ``--help``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

from robustlens.argtypes import positive_int
from robustlens.errors import NotAWorkspaceError, RobustlensError, ValidationError

#: Exit statuses of every subcommand: success, failure (the input was fine, the work failed), usage or
#: validation error (bad input, named in the message; nothing was written).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

#: A handler runs one parsed subcommand and returns its exit status; errors are raised for :func:`run_handler`.
Handler = Callable[[argparse.Namespace], int]


# -- shared options -------------------------------------------------------------------------------------------


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default ``auto``); resolve it with :func:`resolve_device` when the command runs."""
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda or cuda:N")


def add_workers_option(parser: argparse.ArgumentParser) -> None:
    """``--workers N`` (a positive integer, default ``None`` = the number of CPU cores)."""
    parser.add_argument("--workers", type=positive_int, help="image-decoding threads (default: CPU cores)")


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress bars (``args.quiet``)."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_shared_options(
    parser: argparse.ArgumentParser, *, device: bool = False, workers: bool = False, quiet: bool = False
) -> None:
    """Add the chosen shared options to a subcommand's parser, in the order device, workers, quiet."""
    if device:
        add_device_option(parser)
    if workers:
        add_workers_option(parser)
    if quiet:
        add_quiet_option(parser)


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(requested: str) -> str:
    """The torch device a ``--device`` value names, checked against this machine.

    ``auto`` → ``cuda`` when CUDA is available, else ``cpu``. ``cpu`` is always allowed; ``cuda`` / ``cuda:N``
    need CUDA (and device N to exist); ``mps`` needs Apple's Metal backend. Anything else (``tpu``, ``gpu``, a
    typo) is refused here, before any work, instead of failing inside torch minutes later.

    Raises
    ------
    ValidationError
        The value is not a device name, or names a device this machine does not have (CLI exit status 2).
    """
    text = requested.strip().lower()
    if not _DEVICE.match(text):
        raise ValidationError(f"--device must be auto, cpu, cuda, cuda:N or mps; got {requested!r}")
    if text == "cpu":
        return "cpu"  # no torch import needed
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValidationError(
                f"--device {requested}: the MPS (Apple Metal) backend is not available on this machine"
            )
        return "mps"
    if not torch.cuda.is_available():
        raise ValidationError(f"--device {requested}: CUDA is not available on this machine")
    if ":" in text:
        index, count = int(text.split(":", 1)[1]), torch.cuda.device_count()
        if index >= count:
            raise ValidationError(
                f"--device {requested}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
    return text


# -- errors → exit status ----------------------------------------------------------------------------------------


def exit_status(exc: BaseException) -> int:
    """The exit status of an error raised by a handler.

    Bad input (:class:`~robustlens.errors.ValidationError`, :class:`~robustlens.errors.NotAWorkspaceError`) is a
    usage error (2); every other :class:`~robustlens.errors.RobustlensError`, an interrupt, an ``OSError`` and any
    unexpected exception is a failure (1).
    """
    if isinstance(exc, ValidationError | NotAWorkspaceError):
        return EXIT_USAGE
    return EXIT_FAILURE


def one_line(text: str) -> str:
    """``text`` on one line: its lines joined with ``" / "`` (blank lines dropped)."""
    return " / ".join(line.strip() for line in str(text).splitlines() if line.strip())


def error_message(exc: BaseException, args: argparse.Namespace) -> str:
    """The one line printed (after ``error: ``) for an error raised by the handler of ``args.command``."""
    if isinstance(exc, RobustlensError):
        return one_line(str(exc))
    if isinstance(exc, OSError):
        # Disk full, I/O error, permission denied: say what and where, never a traceback. Every artifact is
        # written atomically, so the workspace stays readable and a re-run resumes where this one stopped.
        workspace = getattr(args, "workspace", None)
        context = f"'robustlens {args.command}' on {workspace}" if workspace is not None else ""
        return one_line(describe_os_error(exc, context=context))
    database_error = _database_error(exc) if isinstance(exc, Exception) else None
    if database_error is not None:
        return one_line(database_error)
    return (
        f"unexpected {type(exc).__name__}: {exc}\n(this is a bug in robustlens; rerun with --debug for the "
        "traceback and report it)"
    )


def run_handler(args: argparse.Namespace) -> int:
    """Run ``args.handler(args)`` and map what it raises to an exit status with a message on stderr.

    A :class:`~robustlens.errors.RobustlensError` prints ``error: <one line>`` and returns its
    :func:`exit_status`; an ``OSError`` (disk full, permission denied) and a curation-database error print what
    and where; ``KeyboardInterrupt`` prints ``interrupted``; any other exception is a bug: ``error: unexpected
    …`` plus how to get the traceback. With ``--debug`` the exception is re-raised after the message (traceback).
    """
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # the last line of defence: a user sees one line, never a traceback (but --debug)
        print(f"error: {error_message(exc, args)}", file=sys.stderr)
        if getattr(args, "debug", False):
            raise
        return exit_status(exc)


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
        return (
            f"{_STORAGE_ERRORS[name]}{during}: {reason}{where}. Nothing already written was damaged (every "
            "file is written atomically); free some space or fix the storage, then run the same command again "
            "to resume."
        )
    return f"{reason}{where}{during}"


def _database_error(exc: Exception) -> str | None:
    """A clear line for a curation-database failure (SQLAlchemy), or ``None`` if ``exc`` is not one."""
    if "sqlalchemy" not in sys.modules:
        return None  # nothing imported SQLAlchemy, so nothing raised one of its errors (and importing it costs)
    from sqlalchemy.exc import SQLAlchemyError

    if not isinstance(exc, SQLAlchemyError):
        return None
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    text = detail[0] if detail else type(exc).__name__
    if "disk is full" in text or "disk I/O error" in text:
        return (
            f"the curation database could not be written: {text}. Free some space, then run the command "
            "again; tags, collections and decisions already saved are kept."
        )
    return f"curation database error: {text}"
