"""The rule for names that become file names: prediction sets (``predictions/<name>.npy``).

Such a name is a file name, a database key and a label on every dashboard page, so it must be safe in all
three: no path separators or ``..``, no markup characters, no control characters, bounded length.
:func:`validate_name` is the check every entry point that takes such a name calls. Names that never reach
the file system (tags, collections, reviewers) follow the looser, display-safe rule of
:func:`robustlens.analysis.curation.check_name` (printable text; markup is escaped where it is shown).
"""

from __future__ import annotations

import re

from robustlens.errors import ValidationError

#: Longest accepted name (the curation database's name columns hold 200 characters).
MAX_NAME_LENGTH = 100
#: Letters, digits (any script), ``_``, ``.``, ``-``; single inner spaces; starts with a letter, digit or ``_``.
NAME_PATTERN = re.compile(r"\w[\w.\-]*(?: [\w.\-]+)*")


def validate_name(kind: str, value: object, *, max_length: int = MAX_NAME_LENGTH) -> str:
    """Return ``value`` if it is a safe name, else raise :class:`ValidationError` naming ``kind``.

    Parameters
    ----------
    kind:
        What is being named, used in the message: ``"prediction-set name"``, ``"tag"``, ``"collection"``
        or an option such as ``"--predictions"``.
    value:
        The proposed name.
    max_length:
        Longest accepted name.

    Examples
    --------
    >>> validate_name("tag", "needs review")
    'needs review'
    >>> validate_name("prediction-set name", "../../pwned")
    Traceback (most recent call last):
    ...
    robustlens.errors.ValidationError: prediction-set name '../../pwned' is not allowed: ...
    """
    if not isinstance(value, str):
        raise ValidationError(f"{kind} must be text, got {type(value).__name__}")
    shown = value if len(value) <= 60 else value[:57] + "..."
    rule = (
        f"use letters, digits, '_', '.', '-' and single inner spaces, starting with a letter, digit or '_', "
        f"at most {max_length} characters"
    )
    if not value:
        raise ValidationError(f"{kind} is empty: {rule}")
    if len(value) > max_length:
        raise ValidationError(f"{kind} {shown!r} is {len(value)} characters long: {rule}")
    if NAME_PATTERN.fullmatch(value) is None or ".." in value:
        raise ValidationError(f"{kind} {shown!r} is not allowed: {rule}")
    return value
