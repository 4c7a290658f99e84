"""Which locations a manifest may point the workers at (buckets, prefixes, local directories).

A reference's URI comes from a manifest that users edit; without a check it could make a worker
read any file it can reach (``/etc/...``, another project's bucket). The allowed locations are
explicit configuration (``SPATIAL_ASSETS_ALLOWED_LOCATIONS``, read by
:mod:`spatial_assets.storage.deployment`; default: the deployment's own bucket/prefix or directory).
Local paths are compared after resolving symlinks, so a link inside an allowed directory that
points outside it is refused too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LocationNotAllowedError", "check_allowed_uri", "normalize_location"]


class LocationNotAllowedError(PermissionError):
    """A URI outside every allowed location (the message names the URI and the allowed list)."""


def normalize_location(location: str) -> str:
    """``s3://bucket[/prefix]`` → ``s3://bucket/prefix/`` (trailing '/'); a local dir → its resolved absolute path."""
    loc = str(location).strip()
    if loc.startswith("s3://"):
        bucket, _, prefix = loc[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"allowed location {location!r} has no bucket")
        prefix = prefix.strip("/")
        return f"s3://{bucket}/{prefix}/" if prefix else f"s3://{bucket}/"
    if "://" in loc:
        raise ValueError(f"allowed location {location!r}: scheme {loc.split('://', 1)[0]!r} is not supported (s3:// or a local directory)")
    if loc.startswith("file:"):
        loc = loc[len("file:") :]
    if not os.path.isabs(loc):
        raise ValueError(f"allowed location {location!r} must be an absolute directory or an s3:// prefix")
    return str(Path(loc).resolve())


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_allowed_uri(uri: str, allowed: Sequence[str]) -> str:
    """Return ``uri`` (local paths: resolved) if it lies in one of ``allowed``, else raise.

    ``allowed``: ``s3://bucket/`` (the whole bucket), ``s3://bucket/prefix/`` or absolute local
    directories. Raises :class:`LocationNotAllowedError` naming the URI and the allowed list.
    """
    normalized = [normalize_location(a) for a in allowed]
    text = str(uri)

    def refuse(why: str) -> LocationNotAllowedError:
        return LocationNotAllowedError(
            f"{text!r} {why}; allowed locations: {normalized or '(none)'} — to allow it, add its bucket/prefix "
            "or directory to SPATIAL_ASSETS_ALLOWED_LOCATIONS (comma-separated)"
        )

    if text.startswith("s3://"):
        bucket, _, key = text[len("s3://") :].partition("/")
        for loc in normalized:
            if not loc.startswith("s3://"):
                continue
            a_bucket, _, a_prefix = loc[len("s3://") :].partition("/")
            if bucket == a_bucket and key.startswith(a_prefix):
                return text
        raise refuse("is not inside an allowed location")
    if "://" in text:
        raise refuse(f"uses the unsupported scheme {text.split('://', 1)[0]!r}")
    local = text[len("file:") :] if text.startswith("file:") else text
    if not os.path.isabs(local):
        raise refuse("is a relative path")
    resolved = Path(local).resolve()
    for loc in normalized:
        if not loc.startswith("s3://") and _inside(resolved, Path(loc)):
            return str(resolved)
    where = f" (resolves to {resolved})" if str(resolved) != os.path.normpath(local) else ""
    raise refuse(f"is not inside an allowed location{where}")
