"""One object-store interface over a local directory or an S3 bucket/prefix.

Pipelines address artefacts by '/'-separated keys and never care where bytes live, so the same code
runs on a laptop (``LocalStore``), on the bundled SeaweedFS, or on AWS S3 (``S3Store``). Writes are
all-or-nothing: a local write is a temp file renamed into place, an S3 write is a (multipart) upload
of a finished local file, which S3 only makes visible once complete — a failed write leaves no
object at the final key. S3 reads go through the ETag-keyed cache of :mod:`spatial_assets.storage.objectstore`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spatial_assets.storage.objectstore import S3Settings, fetch_to_cache, upload_file

__all__ = [
    "InvalidKeyError",
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStore",
    "S3Store",
    "validate_key",
]

_PART_SUFFIX = ".part"


#: IO-managed asset values live under ``<storage prefix>/assets/`` (manifests and landing data beside it)
ASSETS_PREFIX = "assets"


def asset_key(asset: str, partition: str | None, ext: str) -> str:
    """Where the IO managers keep an asset value: ``assets/<asset>/<partition><ext>`` or ``assets/<asset><ext>``."""
    return f"{ASSETS_PREFIX}/{asset}/{partition}{ext}" if partition is not None else f"{ASSETS_PREFIX}/{asset}{ext}"


class InvalidKeyError(ValueError):
    """A key that could escape the store's root/prefix or is not a plain '/'-separated path."""


class ObjectNotFoundError(FileNotFoundError):
    """No object at that key (a FileNotFoundError, so Dagster's missing-partition handling applies)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object without reading it."""

    key: str
    etag: str
    size: int
    last_modified: datetime | None


def validate_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` if it is a safe relative '/'-separated key, else raise :class:`InvalidKeyError`.

    ``prefix=True`` also accepts ``""`` and a trailing '/' (list prefixes, store prefixes).
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"object key must be a string, got {type(key).__name__}")
    if key == "":
        if prefix:
            return key
        raise InvalidKeyError("object key is empty")
    problems = []
    if key.startswith("/"):
        problems.append("starts with '/'")
    if "\\" in key:
        problems.append("contains a backslash")
    if "\x00" in key:
        problems.append("contains a NUL byte")
    segments = key.split("/")
    if prefix and key.endswith("/"):
        segments = segments[:-1]  # a trailing '/' is fine on a prefix
    if any(s in ("..", ".") for s in segments):
        problems.append("has a '.' or '..' segment")
    if "" in segments[1 if key.startswith("/") else 0 :]:
        problems.append("has an empty segment ('//' or a trailing '/')")
    if problems:
        raise InvalidKeyError(f"invalid object key {key!r}: " + "; ".join(problems))
    return key


def _join(prefix: str, key: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


class ObjectStore(ABC):
    """Keyed blobs with atomic writes; implementations: :class:`LocalStore`, :class:`S3Store`."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """Where the object lives, as a path or ``s3://`` URI (for metadata and logs)."""

    @abstractmethod
    def put_file(self, local_path: str | os.PathLike[str], key: str) -> ObjectInfo:
        """Copy a finished local file to ``key`` atomically."""

    @abstractmethod
    def get_file(self, key: str) -> Path:
        """A local path with the object's bytes (S3: a cached download; do not modify it)."""

    @abstractmethod
    def info(self, key: str) -> ObjectInfo:
        """Raise :class:`ObjectNotFoundError` when missing."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """All objects whose key starts with ``prefix`` (recursive), sorted by key."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> ObjectInfo: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""

    def exists(self, key: str) -> bool:
        try:
            self.info(key)
            return True
        except ObjectNotFoundError:
            return False

    @contextlib.contextmanager
    def staged(self, key: str) -> Iterator[Path]:
        """Yield a temp local path to write; it is stored at ``key`` only if the block succeeds.

        This is how serialisers that need a real file (h5py, parquet) write without ever exposing a
        partial object.
        """
        validate_key(key)
        tmpdir = Path(tempfile.mkdtemp(prefix="stage-"))
        try:
            path = tmpdir / Path(key).name  # same file name: serialisers that look at the suffix still work
            yield path
            if not path.exists():
                raise FileNotFoundError(f"staged write for {self.uri(key)} produced no file at {path}")
            self.put_file(path, key)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)


class LocalStore(ObjectStore):
    """Objects as files under ``root``; writes are temp file + rename in the same directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def _info_from_path(self, key: str, path: Path) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(
            key=key,
            etag=f"{st.st_size}-{st.st_mtime_ns}",  # same fingerprint as objectstore.head for files
            size=int(st.st_size),
            last_modified=datetime.fromtimestamp(st.st_mtime, tz=timezone.utc),
        )

    def _atomic_write(self, key: str, writer: Callable[[Any], None]) -> ObjectInfo:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=_PART_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as fh:
                writer(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return self._info_from_path(key, dest)

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> ObjectInfo:
        src = Path(local_path)
        if not src.is_file():
            raise FileNotFoundError(f"cannot store {self.uri(key)}: source file {src} does not exist")
        with open(src, "rb") as fin:
            return self._atomic_write(key, lambda fout: shutil.copyfileobj(fin, fout, 4 * 1024 * 1024))

    def write_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._atomic_write(key, lambda fout: fout.write(data))

    def get_file(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFoundError(f"no object at {path}")
        return path

    def read_bytes(self, key: str) -> bytes:
        return self.get_file(key).read_bytes()

    def info(self, key: str) -> ObjectInfo:
        return self._info_from_path(key, self.get_file(key))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        validate_key(prefix, prefix=True)
        # walk only the deepest directory the prefix pins down, then filter by string prefix (S3 semantics)
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not (d.startswith(".") and d.endswith(".stage"))]  # in-flight
            for name in filenames:
                if name.startswith(".") and name.endswith(_PART_SUFFIX):
                    continue  # an in-flight write
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    out.append(self._info_from_path(key, path))
        return sorted(out, key=lambda i: i.key)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    @contextlib.contextmanager
    def staged(self, key: str) -> Iterator[Path]:
        """Write straight into a temp file beside the destination, then rename (no extra copy)."""
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".stage"))
        try:
            path = tmpdir / dest.name
            yield path
            if not path.exists():
                raise FileNotFoundError(f"staged write for {dest} produced no file at {path}")
            os.replace(path, dest)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix/``.

    ``settings`` is an :class:`S3Settings` or a zero-argument factory returning a boto3 S3 client
    (e.g. ``S3Resource(...).get_client``), so Dagster resources and plain code share one class.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        settings: S3Settings | Callable[[], Any] | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        page_size: int = 1000,
    ) -> None:
        if not bucket or "/" in bucket:
            raise InvalidKeyError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        validate_key(prefix, prefix=True)
        self.bucket = bucket
        self.prefix = prefix
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._settings = settings if settings is not None else S3Settings.from_env()
        self.page_size = int(page_size)  # objects per ListObjectsV2 page (S3's maximum is 1000)
        self._client: Any = None

    def __repr__(self) -> str:
        return f"S3Store('s3://{self.bucket}/{self.prefix}')"

    @property
    def client(self) -> Any:
        if self._client is None:
            s = self._settings
            self._client = s.client() if isinstance(s, S3Settings) else s()
        return self._client

    def _full(self, key: str) -> str:
        return _join(self.prefix, validate_key(key))

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    @staticmethod
    def _is_missing(exc: Exception) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(exc, ClientError):
            return False
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> ObjectInfo:
        src = Path(local_path)
        if not src.is_file():
            raise FileNotFoundError(f"cannot store {self.uri(key)}: source file {src} does not exist")
        upload_file(src, self.uri(key), client=self.client)
        return self.info(key)

    def write_bytes(self, key: str, data: bytes) -> ObjectInfo:
        self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data)  # single PUT: atomic
        return self.info(key)

    def get_file(self, key: str) -> Path:
        uri = self.uri(key)
        try:
            return fetch_to_cache(uri, cache_dir=self.cache_dir, client=self.client)
        except Exception as exc:
            if self._is_missing(exc):
                raise ObjectNotFoundError(f"no object at {uri}") from exc
            raise

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()
        except Exception as exc:
            if self._is_missing(exc):
                raise ObjectNotFoundError(f"no object at {self.uri(key)}") from exc
            raise

    def info(self, key: str) -> ObjectInfo:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as exc:
            if self._is_missing(exc):
                raise ObjectNotFoundError(f"no object at {self.uri(key)}") from exc
            raise
        return ObjectInfo(
            key=key, etag=resp["ETag"].strip('"'), size=int(resp["ContentLength"]), last_modified=resp.get("LastModified")
        )

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        validate_key(prefix, prefix=True)
        full_prefix = _join(self.prefix, prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        out = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(
            Bucket=self.bucket, Prefix=full_prefix, PaginationConfig={"PageSize": self.page_size}
        ):
            for obj in page.get("Contents", []):
                out.append(
                    ObjectInfo(
                        key=self._rel(obj["Key"]),
                        etag=obj["ETag"].strip('"'),
                        size=int(obj["Size"]),
                        last_modified=obj.get("LastModified"),
                    )
                )
        return sorted(out, key=lambda i: i.key)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._full(key))
