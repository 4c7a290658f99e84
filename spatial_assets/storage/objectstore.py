"""Plain (Dagster-free) access to local paths and ``s3://`` URIs.

AnnData cannot be written to or read from an S3 file object reliably (h5py needs a real file), so
everything goes through a local file: downloads land in a cache keyed by the object's ETag (a
changed object is fetched again, an unchanged one never twice) and uploads are multipart from a
temporary file, so a failed write never leaves a partial object at the final key.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

_MB = 1024 * 1024


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is and how to sign requests; ``None`` fields fall back to boto3's own chain."""

    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region_name: str | None = None

    @classmethod
    def from_env(cls) -> "S3Settings":
        return cls(
            endpoint_url=os.environ.get("SPATIAL_ASSETS_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL"),
            access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region_name,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"}),
        )


def is_s3_uri(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``(bucket, key)``; raises on anything else."""
    if not is_s3_uri(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = str(uri)[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise ValueError(f"S3 URI needs a bucket and a key: {uri!r}")
    return bucket, key


def default_cache_dir() -> Path:
    root = os.environ.get("SPATIAL_ASSETS_CACHE") or os.path.join(
        os.environ.get("SPATIAL_ASSETS_HOME", os.path.join(os.getcwd(), ".local")), "cache"
    )
    return Path(root)


def sha256_file(path: str | os.PathLike[str], chunk: int = 4 * _MB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def head(uri: str, settings: S3Settings | None = None, client: Any = None) -> dict[str, Any]:
    """Cheap fingerprint of an object or file: ``{"etag", "size", "uri"}`` (no download).

    For local files the "etag" is size + mtime, which is what a change detector needs.
    """
    if is_s3_uri(uri):
        bucket, key = parse_s3_uri(uri)
        client = client or (settings or S3Settings.from_env()).client()
        resp = client.head_object(Bucket=bucket, Key=key)
        return {"uri": uri, "etag": resp["ETag"].strip('"'), "size": int(resp["ContentLength"])}
    st = os.stat(uri)
    return {"uri": str(uri), "etag": f"{st.st_size}-{st.st_mtime_ns}", "size": int(st.st_size)}


def fetch_to_cache(
    uri: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    settings: S3Settings | None = None,
    client: Any = None,
) -> Path:
    """Return a local path holding ``uri``'s bytes; S3 objects are cached by bucket/key/ETag."""
    if not is_s3_uri(uri):
        p = Path(uri)
        if not p.exists():
            raise FileNotFoundError(f"file not found: {p}")
        return p
    bucket, key = parse_s3_uri(str(uri))
    client = client or (settings or S3Settings.from_env()).client()
    etag = head(str(uri), client=client)["etag"]
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    digest = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()[:16]
    target = cache_root / "s3" / digest / etag / Path(key).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        client.download_file(bucket, key, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def upload_file(local_path: str | os.PathLike[str], uri: str, settings: S3Settings | None = None, client: Any = None) -> None:
    """Multipart upload: the object appears at ``uri`` only once the upload completes."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = parse_s3_uri(uri)
    client = client or (settings or S3Settings.from_env()).client()
    client.upload_file(
        str(local_path), bucket, key, Config=TransferConfig(multipart_threshold=16 * _MB, multipart_chunksize=16 * _MB)
    )


def write_atomic(dest: str, write: Callable[[Path], None]) -> None:
    """Let ``write(path)`` produce the file, then publish it at ``dest`` (a path or s3:// URI) at once.

    Local: a temp file beside ``dest`` renamed over it; S3: a temp file uploaded (multipart). Either
    way an error inside ``write`` leaves nothing at ``dest``.
    """
    s3 = is_s3_uri(dest)
    tmpdir = None
    if not s3:
        target = Path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = target.parent
    # same suffix as the destination: writers that look at it (h5ad) behave as for the real name
    fd, tmp = tempfile.mkstemp(dir=tmpdir, prefix=f".{Path(dest).name}.", suffix=f".part{Path(dest).suffix}")
    os.close(fd)
    try:
        write(Path(tmp))
        if s3:
            upload_file(tmp, dest)
        else:
            os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
