"""Plain (Dagster-free) access to local paths and ``s3://`` URIs.

AnnData cannot be written to or read from an S3 file object reliably (h5py needs a real file), so
large objects go through a local file: downloads land in a cache keyed by the object's ETag (a
changed object is fetched again, an unchanged one never twice) and uploads are multipart from a
temporary file, so a failed write never leaves a partial object at the final key.

Throughput (measured in ``docs/storage.md`` with ``benchmarks/bench_storage.py``): transfers use
boto3's transfer manager with parts moved in parallel (:data:`TRANSFER_PART_SIZE`,
:data:`TRANSFER_CONCURRENCY`), and every request carries the object's media type
(:func:`content_type`): without one, SeaweedFS gzips each chunk it receives and gunzips it on every
read, which was measured to cost it 45 % of its CPU time on h5ad bytes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

_MB = 1024 * 1024

#: Multipart part size and parts in flight (measured: docs/storage.md). 8 MiB parts keep every core
#: busy on a 100 MB object; more than 8 in flight gained nothing on 2 cores.
TRANSFER_PART_SIZE = 8 * _MB
TRANSFER_CONCURRENCY = 8

#: Which environment variable fills which S3 setting (first one set wins). The deployment settings
#: (:mod:`spatial_assets.storage.deployment`) and the Dagster resources read S3 through this table.
S3_ENV: dict[str, tuple[str, ...]] = {
    "endpoint_url": ("SPATIAL_ASSETS_S3_ENDPOINT", "AWS_ENDPOINT_URL"),
    "access_key_id": ("AWS_ACCESS_KEY_ID",),
    "secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "session_token": ("AWS_SESSION_TOKEN",),
    # botocore reads only AWS_DEFAULT_REGION; AWS_REGION is what most tools set, so both count
    "region_name": ("AWS_REGION", "AWS_DEFAULT_REGION"),
}

_CONTENT_TYPES = {
    ".h5ad": "application/x-hdf5",
    ".h5": "application/x-hdf5",
    ".parquet": "application/vnd.apache.parquet",
    ".json": "application/json",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
    ".pkl": "application/x-python-pickle",
    ".zip": "application/zip",
    ".png": "image/png",
    ".csv": "text/csv",
}


def content_type(key: str) -> str:
    """The media type stored with an object (by extension; ``binary/octet-stream`` otherwise)."""
    return _CONTENT_TYPES.get(Path(key).suffix.lower(), "binary/octet-stream")


def env_source(setting: str) -> str | None:
    """Name of the environment variable that sets an S3 setting (see :data:`S3_ENV`), or None."""
    return next((name for name in S3_ENV[setting] if os.environ.get(name)), None)


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is and how to sign requests; ``None`` fields fall back to boto3's own chain."""

    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region_name: str | None = None
    session_token: str | None = None

    def __repr__(self) -> str:  # never print a secret (logs, tracebacks, the Dagster UI)
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, region_name={self.region_name!r})"

    @classmethod
    def from_env(cls) -> "S3Settings":
        values = {field: os.environ[name] for field in S3_ENV if (name := env_source(field))}
        values.setdefault("region_name", "us-east-1")
        return cls(**values)

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            aws_session_token=self.session_token,
            region_name=self.region_name,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 5, "mode": "standard"},
                max_pool_connections=TRANSFER_CONCURRENCY + 2,
            ),
        )
        return with_content_types(client)

    def s3fs_options(self) -> dict[str, Any]:
        """The same connection as fsspec/s3fs storage options (for ``UPath('s3://...', **options)``)."""
        opts: dict[str, Any] = {}
        if self.access_key_id:
            opts["key"] = self.access_key_id
        if self.secret_access_key:
            opts["secret"] = self.secret_access_key
        if self.session_token:
            opts["token"] = self.session_token
        if self.endpoint_url:
            opts["endpoint_url"] = self.endpoint_url
        if self.region_name:
            opts["client_kwargs"] = {"region_name": self.region_name}
        return opts


def _set_part_content_type(request: Any, **_: Any) -> None:
    if "Content-Type" not in request.headers:
        key = unquote(urlsplit(request.url).path)
        request.headers["Content-Type"] = content_type(key)


def with_content_types(client: Any) -> Any:
    """Make every PutObject/UploadPart of ``client`` carry the object's media type (idempotent).

    boto3 sends ``ContentType`` only on the CreateMultipartUpload request, so a multipart upload's
    parts reach SeaweedFS untyped, and SeaweedFS then gzips every chunk (and gunzips it on every
    read). The header is ignored by AWS S3 on UploadPart.
    """
    for op in ("PutObject", "UploadPart"):
        client.meta.events.register(
            f"before-sign.s3.{op}", _set_part_content_type, unique_id=f"spatial-assets-content-type-{op}"
        )
    return client


def transfer_config(*, part_size: int = TRANSFER_PART_SIZE, concurrency: int = TRANSFER_CONCURRENCY) -> Any:
    """boto3's transfer-manager configuration: multipart above one part, parts in parallel."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=part_size,
        multipart_chunksize=part_size,
        max_concurrency=concurrency,
        use_threads=concurrency > 1,
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


def cache_path(cache_dir: str | os.PathLike[str] | None, bucket: str, key: str, etag: str) -> Path:
    """Where the download cache keeps one version (ETag) of ``s3://bucket/key``."""
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    digest = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()[:16]
    return cache_root / "s3" / digest / etag / Path(key).name


def fetch_to_cache(
    uri: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    settings: S3Settings | None = None,
    client: Any = None,
    config: Any = None,
) -> Path:
    """Return a local path holding ``uri``'s bytes; S3 objects are cached by bucket/key/ETag.

    A download moves byte ranges in parallel (``config``: a boto3 TransferConfig, default
    :func:`transfer_config`) into a temp file that is renamed into the cache once complete.
    """
    if not is_s3_uri(uri):
        p = Path(uri)
        if not p.exists():
            raise FileNotFoundError(f"file not found: {p}")
        return p
    bucket, key = parse_s3_uri(str(uri))
    client = client or (settings or S3Settings.from_env()).client()
    etag = head(str(uri), client=client)["etag"]
    target = cache_path(cache_dir, bucket, key, etag)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        client.download_file(bucket, key, tmp, Config=config or transfer_config())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def upload_file(
    local_path: str | os.PathLike[str],
    uri: str,
    settings: S3Settings | None = None,
    client: Any = None,
    *,
    config: Any = None,
    with_sha256: bool = False,
) -> str | None:
    """Multipart upload, parts in parallel: the object appears at ``uri`` only once it completes.

    A failed part aborts the whole upload (boto3's transfer manager sends AbortMultipartUpload), so
    no object and no orphaned parts remain. ``with_sha256=True`` hashes the file while it uploads
    (the hash runs in its own thread; hashlib releases the GIL) and returns the hex digest.
    """
    bucket, key = parse_s3_uri(uri)
    client = with_content_types(client or (settings or S3Settings.from_env()).client())
    extra = {"ContentType": content_type(key)}
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(sha256_file, local_path) if with_sha256 else None
        client.upload_file(str(local_path), bucket, key, ExtraArgs=extra, Config=config or transfer_config())
        return digest.result() if digest is not None else None


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
