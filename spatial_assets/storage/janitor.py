"""Clean what a killed writer leaves behind: staging files and orphaned multipart uploads.

Writes are all-or-nothing (:mod:`spatial_assets.storage.stores`), so a SIGKILLed upload never leaves a
partial object at a final key — but it does leave its *staging*: the temp file it was uploading
from, a half-downloaded cache file, and on S3 an incomplete multipart upload whose parts the bucket
keeps (and bills) until someone aborts it. Nothing in the killed process can clean up after a
SIGKILL, so the next run does: call :func:`clean_stale_staging` at run start.

What counts as staging (the names the stores and ``objectstore`` give their temp files):

* under a :class:`LocalStore` root: ``.<name>.<random>.part`` / ``.<name>.<random>.part<ext>`` files
  and ``.<name>.<random>.stage`` directories;
* in the S3 download cache: ``*.part`` files and the ``*.part.<random>`` files s3transfer downloads into;
* in the temp directory: ``stage-*`` directories (:meth:`ObjectStore.staged`) and ``.*.part*``
  files (``write_atomic`` towards S3), owned by the current user;
* on S3: multipart uploads under the store's prefix.

Only what is older than ``older_than_s`` goes: a concurrent run's in-flight write is younger than
that, so pick a threshold longer than the longest legitimate write (an hour by default).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spatial_assets.storage.objectstore import default_cache_dir
from spatial_assets.storage.stores import LocalStore, ObjectStore, S3Store

__all__ = ["DEFAULT_OLDER_THAN_S", "JanitorReport", "clean_stale_staging"]

DEFAULT_OLDER_THAN_S = 3600.0
_LOG = logging.getLogger(__name__)
_PART_FILE = re.compile(r"^\..+\.part(\.[^/]*)?$")  # .<name>.<rand>.part[.h5ad]
_STAGE_DIR = re.compile(r"^\..+\.stage$")
_CACHE_PART = re.compile(r"\.part(\.[A-Za-z0-9]+)?$")  # tmpXXXX.part, tmpXXXX.part.1a2B3c4D (s3transfer)
_TEMP_STAGE_DIR = re.compile(r"^stage-")


@dataclass
class JanitorReport:
    """What was cleaned (paths removed, multipart uploads aborted as ``(key, upload_id)``)."""

    removed: list[Path] = field(default_factory=list)
    aborted_uploads: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.removed or self.aborted_uploads)

    def summary(self) -> str:
        return f"removed {len(self.removed)} stale staging path(s), aborted {len(self.aborted_uploads)} multipart upload(s)"


def _age_s(path: Path, now: float) -> float:
    """Seconds since the newest change to ``path`` (for a directory: to anything inside it)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return now - newest


def _remove(path: Path, report: JanitorReport) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return
    report.removed.append(path)


def _sweep(root: Path, cutoff_s: float, now: float, report: JanitorReport, *, files: re.Pattern, dirs: re.Pattern | None) -> None:
    """Remove stale matching files/dirs anywhere under ``root`` (never following symlinks)."""
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in list(dirnames):
            if dirs is not None and dirs.search(name):
                dirnames.remove(name)  # do not descend: it goes whole or stays whole
                path = here / name
                if _age_s(path, now) >= cutoff_s:
                    _remove(path, report)
        for name in filenames:
            if files.search(name):
                path = here / name
                with contextlib.suppress(FileNotFoundError):
                    if _age_s(path, now) >= cutoff_s:
                        _remove(path, report)


def _sweep_temp_dir(temp_dir: Path, cutoff_s: float, now: float, report: JanitorReport) -> None:
    """Our own staging in the shared temp dir: top level only, owned by us, never others' files."""
    uid = os.getuid()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(temp_dir):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_uid != uid:
                continue
            ours = (entry.is_dir(follow_symlinks=False) and _TEMP_STAGE_DIR.search(entry.name)) or (
                entry.is_file(follow_symlinks=False) and _PART_FILE.search(entry.name)
            )
            if ours and _age_s(Path(entry.path), now) >= cutoff_s:
                _remove(Path(entry.path), report)


def _abort_multipart(store: S3Store, cutoff_s: float, report: JanitorReport) -> None:
    client: Any = store.client
    prefix = f"{store.prefix}/" if store.prefix else ""
    cutoff = datetime.now(timezone.utc).timestamp() - cutoff_s
    kwargs: dict[str, Any] = {"Bucket": store.bucket, "Prefix": prefix}
    while True:
        page = client.list_multipart_uploads(**kwargs)
        for upload in page.get("Uploads", []) or []:
            initiated = upload.get("Initiated")
            if initiated is not None and initiated.timestamp() > cutoff:
                continue  # in flight (or too recent to tell)
            client.abort_multipart_upload(Bucket=store.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            report.aborted_uploads.append((upload["Key"], upload["UploadId"]))
        if not page.get("IsTruncated"):
            break
        kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
        kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")


def clean_stale_staging(
    store: ObjectStore,
    older_than_s: float = DEFAULT_OLDER_THAN_S,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    temp_dir: str | os.PathLike[str] | None = None,
) -> JanitorReport:
    """Remove staging older than ``older_than_s`` seconds left by killed writers; returns what went.

    ``cache_dir`` defaults to the store's S3 download cache (or the default cache), ``temp_dir`` to
    :func:`tempfile.gettempdir`. Safe to call concurrently (a path already gone is skipped).
    """
    if older_than_s < 0:
        raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
    now = time.time()
    report = JanitorReport()
    if isinstance(store, LocalStore):
        _sweep(store.root, older_than_s, now, report, files=_PART_FILE, dirs=_STAGE_DIR)
    elif isinstance(store, S3Store):
        _abort_multipart(store, older_than_s, report)
        cache = Path(cache_dir) if cache_dir else (store.cache_dir or default_cache_dir())
        _sweep(cache / "s3", older_than_s, now, report, files=_CACHE_PART, dirs=None)
    else:  # pragma: no cover - a new store kind must say what its staging looks like
        raise TypeError(f"no staging rules for {type(store).__name__}")
    _sweep_temp_dir(Path(temp_dir) if temp_dir else Path(tempfile.gettempdir()), older_than_s, now, report)
    if report:
        _LOG.warning("storage janitor: %s (%s)", report.summary(), store)
    return report
