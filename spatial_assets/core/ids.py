"""Validation of sample and reference ids.

Ids become object keys, partition keys and file names, so anything that could escape a prefix
(path separators, ``..``) or break Dagster's multi-partition syntax (commas) is refused up front.
"""

from __future__ import annotations

import re

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class InvalidIdError(ValueError):
    """An id that cannot be used as a partition key / storage key."""


def validate_id(value: str, kind: str = "id") -> str:
    """Return ``value`` unchanged if it is a safe id, else raise :class:`InvalidIdError`."""
    if not isinstance(value, str):
        raise InvalidIdError(f"{kind} must be a string, got {type(value).__name__}")
    problems = []
    if "/" in value or "\\" in value:
        problems.append("contains a path separator")
    if ".." in value:
        problems.append("contains '..'")
    if "," in value:
        problems.append("contains a comma")
    if not problems and not _ID_RE.match(value):
        problems.append("must start with a letter or digit and use only letters, digits, '.', '_' and '-' (max 128)")
    if problems:
        raise InvalidIdError(f"invalid {kind} {value!r}: " + "; ".join(problems))
    return value
