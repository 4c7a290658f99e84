"""Raw-folder lineage and staging: content fingerprints, and a local copy of a landed folder.

The platform lists a landed raw folder (local or S3), brings it to a local temporary directory
(readers need real files: tifffile, h5py, parquet) and records every file's sha256 and size, so
the audit can show raw files → segmentation → cells and tell when a raw file changed.
Storage-agnostic: :func:`stage_files` takes ``(relative key, local path)`` pairs from any store.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from spatial_assets.segmentation.errors import SegmentationInputError
from spatial_assets.storage.objectstore import sha256_file


def fingerprint_files(folder: str | Path, files: Iterable[str] | None = None) -> dict[str, dict]:
    """``{relative path: {"sha256", "size"}}`` for every file under ``folder`` (or only ``files``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SegmentationInputError(f"{folder}: not a directory")
    rels = sorted(files) if files is not None else sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
    )
    out: dict[str, dict] = {}
    for rel in rels:
        p = folder / rel
        if not p.is_file():
            raise SegmentationInputError(f"{p}: file to fingerprint does not exist")
        out[rel.replace(os.sep, "/")] = {"sha256": sha256_file(p), "size": int(p.stat().st_size)}
    return out


def stage_files(entries: Iterable[tuple[str, str | Path]], dest: str | Path, *, link: bool = True) -> Path:
    """Lay ``(relative key, local file)`` pairs out under ``dest`` as a raw folder; returns ``dest``.

    Keys are checked so nothing escapes ``dest``; ``link=True`` hard-links when possible (no copy).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    for key, src in entries:
        key = str(key).lstrip("/")
        if not key or ".." in Path(key).parts:
            raise SegmentationInputError(f"unsafe key {key!r} in a raw folder listing")
        target = (dest / key).resolve()
        if not target.is_relative_to(root):
            raise SegmentationInputError(f"unsafe key {key!r} in a raw folder listing")
        target.parent.mkdir(parents=True, exist_ok=True)
        src = Path(src)
        if not src.is_file():
            raise SegmentationInputError(f"{src}: staged file does not exist (key {key})")
        if target.exists():
            target.unlink()
        try:
            if not link:
                raise OSError
            os.link(src, target)
        except OSError:
            shutil.copyfile(src, target)
    return dest


def fetch_folder(uri: str, dest: str | Path) -> Path:
    """A local directory holding the raw folder ``uri`` (a local path is returned as is; ``s3://`` downloaded)."""
    from spatial_assets.storage.objectstore import S3Settings, is_s3_uri, parse_s3_uri

    if not is_s3_uri(uri):
        p = Path(uri)
        if not p.is_dir():
            raise SegmentationInputError(f"{p}: input folder does not exist")
        return p
    bucket, prefix = parse_s3_uri(uri.rstrip("/") + "/")
    client = S3Settings.from_env().client()
    entries = []
    tmp = Path(dest) / ".download"
    tmp.mkdir(parents=True, exist_ok=True)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"][len(prefix):]
            if not key or key.endswith("/"):
                continue
            local = tmp / key
            local.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(local))
            entries.append((key, local))
    if not entries:
        raise SegmentationInputError(f"{uri}: no objects under this prefix")
    return stage_files(entries, Path(dest) / "raw")


__all__ = ["fetch_folder", "fingerprint_files", "stage_files"]
