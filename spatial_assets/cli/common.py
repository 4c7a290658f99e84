"""What every ``spatial-assets`` subcommand shares: exit codes, errors, progress lines, files written.

A subcommand module only registers its parser and, in its handler, calls these helpers:

* :func:`read_h5ad` / :func:`fetch_h5ad` / :func:`fetch_input` for every input (local path or
  ``s3://``): anything that cannot be read (missing file, S3 404/403, no credentials, a truncated or
  non-h5ad file) becomes :class:`UnreadableInputError` -> exit 2 with ONE line naming the file;
* :class:`Progress` for a line per long step on stderr, with the time since the command started;
* :class:`Outputs` to write every file atomically and list them all in the final summary.

:func:`spatial_assets.cli.main` turns exceptions into exit codes (:func:`error_line`): bad input
(these errors and the science modules' ``ValueError`` subclasses) -> 2, anything else -> 1 with a hint
to rerun with ``--debug``, which prints the traceback. Nothing here imports anndata, h5py or boto3 at
module level: building the parser must stay cheap.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2

DEBUG_HINT = "run again with --debug for the traceback"


class InputError(Exception):
    """Input the user has to fix (exit 2, one line, no traceback)."""


class UnreadableInputError(InputError):
    """An input file or object that cannot be read at all; the message names it."""


class OutputError(InputError):
    """A destination that cannot be written (S3 403, missing bucket, read-only directory)."""


# ------------------------------------------------------------------------------------------------
# help text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is nothing to show (None, flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "%(default)" in text or nothing or action.required:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


# ------------------------------------------------------------------------------------------------
# progress and outputs


class Progress:
    """``progress("training model on 1,308 cells × 134 genes")`` -> ``[  3.2s] training ...`` on stderr."""

    def __init__(self, stream: IO[str] | None = None, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self._stream = stream
        self._clock = clock
        self._start = clock()

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    def __call__(self, message: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        print(f"[{self.elapsed:6.1f}s] {message}", file=stream, flush=True)


def cells_by_genes(adata: Any) -> str:
    """``1,308 cells × 134 genes`` (for progress lines)."""
    return f"{adata.n_obs:,} cells × {adata.n_vars:,} genes"


class Outputs:
    """Every file a command writes goes through :meth:`write` (atomic) or :meth:`add`; :meth:`summary` lists them."""

    def __init__(self, progress: Progress | None = None) -> None:
        self.files: list[tuple[str, str]] = []
        self._progress = progress

    def write(self, what: str, dest: str, write: Callable[[Path], None], *, announce: bool = True) -> str:
        """``write(local_path)`` produces the file, published at ``dest`` (path or s3://) only when complete."""
        from spatial_assets.storage.objectstore import write_atomic

        if announce and self._progress is not None:
            self._progress(f"writing {what} {dest}")
        try:
            write_atomic(dest, write)
        except Exception as exc:
            reason = describe_storage_error(exc)
            if reason is None:
                raise
            raise OutputError(f"cannot write {dest}: {reason}") from exc
        self.add(what, dest)
        return dest

    def add(self, what: str, dest: str) -> None:
        """Record a file written by other code (e.g. plots, a model and its card)."""
        self.files.append((what, str(dest)))

    def summary(self) -> str:
        if not self.files:
            return "files written: none"
        width = max(len(what) for what, _ in self.files)
        return "\n".join(["files written:"] + [f"  {what:<{width}}  {dest}" for what, dest in self.files])


# ------------------------------------------------------------------------------------------------
# reading inputs


def describe_storage_error(exc: BaseException) -> str | None:
    """A short reason for an error of local-file or S3 access, or ``None`` if it is something else.

    Covers boto3/botocore (S3 ``ClientError`` codes, missing credentials, unreachable endpoint) and
    the builtin errors fsspec/s3fs raise for the same cases, so it keeps working whichever client
    the storage layer uses.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        reason = _describe_one(exc)
        if reason is not None:
            return reason
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


_S3_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_S3_DENIED = {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}


def _describe_one(exc: BaseException) -> str | None:
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if module.startswith("botocore") or module.startswith("boto3"):
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            return "no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"):
            return f"cannot reach the S3 endpoint ({exc})"
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code == "NoSuchBucket":
                return "no such bucket (S3 NoSuchBucket)"
            if code in _S3_NOT_FOUND or status == "404":
                return "no such object (S3 404)"
            if code in _S3_DENIED or status == "403":
                return (
                    f"access denied (S3 {code or status}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                    "and the bucket's permissions"
                )
            if code:
                return f"S3 error {code}"
        return None
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return None


def fetch_input(uri: str, what: str = "input") -> Path:
    """A local path holding ``uri`` (a local path itself, or the cached download of an s3:// object)."""
    from spatial_assets.storage.objectstore import fetch_to_cache

    try:
        local = Path(fetch_to_cache(uri))
    except Exception as exc:
        reason = describe_storage_error(exc)
        if reason is None:
            raise
        raise UnreadableInputError(f"cannot read {what} {uri}: {reason}") from exc
    if local.is_dir():
        raise UnreadableInputError(f"cannot read {what} {uri}: is a directory, not a file")
    return local


def _h5_reason(local: Path, exc: BaseException) -> str:
    text = str(exc)
    if local.stat().st_size == 0:
        return "empty file (0 bytes)"
    if "truncated file" in text:
        import re

        m = re.search(r"eof = (\d+).*stored_eof = (\d+)", text)
        if m:
            return f"truncated HDF5/h5ad file ({int(m.group(1)):,} of {int(m.group(2)):,} bytes)"
        return "truncated HDF5/h5ad file"
    if "signature" in text:
        return "not an HDF5/h5ad file (truncated?)"
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"not a readable HDF5/h5ad file ({first})"


def fetch_h5ad(uri: str, what: str = "input") -> Path:
    """Fetch ``uri`` and check, without loading it, that it is an AnnData h5ad; return the local path."""
    import h5py

    local = fetch_input(uri, what)
    try:
        with h5py.File(local, "r") as fh:
            missing = [k for k in ("obs", "var") if k not in fh]
    except OSError as exc:
        raise UnreadableInputError(f"cannot read {what} {uri}: {_h5_reason(local, exc)}") from exc
    if missing:
        raise UnreadableInputError(
            f"cannot read {what} {uri}: an HDF5 file but not an AnnData h5ad (no {' or '.join(missing)} group)"
        )
    return local


def read_h5ad(uri: str, what: str = "input") -> Any:
    """``anndata.read_h5ad`` of a local path or s3:// URI, with one clear error naming the file."""
    import anndata as ad

    local = fetch_h5ad(uri, what)
    try:
        return ad.read_h5ad(local)
    except Exception as exc:  # valid HDF5 but damaged or not written by anndata
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableInputError(f"cannot read {what} {uri}: not a readable h5ad file ({first})") from exc


# ------------------------------------------------------------------------------------------------
# exit codes


def error_line(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ended a command."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, InputError):
        return EXIT_BAD_INPUT, f"error: {first}"
    reason = describe_storage_error(exc)
    if reason is not None:
        return EXIT_BAD_INPUT, f"error: {reason}: {first}" if reason not in first else f"error: {first}"
    if isinstance(exc, ValueError):  # the science modules' bad-input errors (they name file/column/gene)
        return EXIT_BAD_INPUT, f"error: {first}"
    return EXIT_UNEXPECTED, f"error: unexpected {type(exc).__name__}: {first} ({DEBUG_HINT})"


__all__ = [
    "DEBUG_HINT",
    "EXIT_BAD_INPUT",
    "EXIT_OK",
    "EXIT_UNEXPECTED",
    "HelpFormatter",
    "InputError",
    "OutputError",
    "Outputs",
    "Progress",
    "UnreadableInputError",
    "cells_by_genes",
    "describe_storage_error",
    "error_line",
    "fetch_h5ad",
    "fetch_input",
    "read_h5ad",
]
