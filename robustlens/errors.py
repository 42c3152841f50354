"""Errors the engine raises for bad input.

Every :class:`ValidationError` names where the problem is (file, row, column) so the user can fix it;
the CLI turns it into exit status 2. Nothing that raises one has modified the user's files.
"""

from __future__ import annotations

from pathlib import Path


class RobustlensError(Exception):
    """Base class of the errors this package raises on purpose."""


class ValidationError(RobustlensError):
    """Input that does not meet the expected format.

    Parameters
    ----------
    message:
        What was expected and what came.
    file:
        The offending file, if any.
    row:
        1-based data row (the header does not count) of a table, if the problem is in one row.
    column:
        Column name, if the problem is in one column.
    """

    def __init__(
        self, message: str, *, file: str | Path | None = None, row: int | None = None, column: str | None = None
    ):
        self.file = str(file) if file is not None else None
        self.row = row
        self.column = column
        self.detail = message
        where = []
        if self.file is not None:
            where.append(self.file)
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class WorkspaceError(RobustlensError):
    """A workspace that is missing, unreadable or from an incompatible version."""


class NotAWorkspaceError(WorkspaceError):
    """The path given as a workspace has no ``workspace.json``: a usage error (exit status 2)."""


class ConfigError(ValidationError, ValueError):
    """A configuration value out of range or of the wrong type, named by where it came from.

    Also a :class:`ValueError`, so code that validated with ``ValueError`` before keeps working.

    Parameters
    ----------
    owner:
        What the configuration belongs to, e.g. ``"stage 'duplicates'"`` or ``"--attack-config attacks.toml"``.
    field:
        The configuration field, e.g. ``"near_threshold"``.
    expected:
        What is allowed, e.g. ``"a number in [0, 1]"``.
    got:
        The value that came (shown with ``repr``).
    """

    def __init__(self, owner: str, field: str, expected: str, got: object):
        self.owner, self.field, self.expected, self.got = owner, field, expected, got
        super().__init__(f"{owner}: {field} must be {expected}, got {got!r}")
