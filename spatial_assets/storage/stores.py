"""One object-store interface over a local directory or an S3 bucket/prefix.

Pipelines address artefacts by '/'-separated keys and never care where bytes live, so the same code
runs on a laptop (``LocalStore``), on the bundled SeaweedFS, or on AWS S3 (``S3Store``). Writes are
all-or-nothing: a local write is a temp file renamed into place, an S3 write is a (multipart) upload
of a finished local file, which S3 only makes visible once complete — a failed write leaves no
object at the final key. S3 reads go through the ETag-keyed cache of :mod:`spatial_assets.storage.objectstore`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from spatial_assets.storage.objectstore import (
    TRANSFER_CONCURRENCY,
    TRANSFER_PART_SIZE,
    S3Settings,
    cache_path,
    content_type,
    fetch_to_cache,
    sha256_file,
    transfer_config,
    upload_file,
    with_content_types,
)

__all__ = [
    "InvalidKeyError",
    "KeyOutsideRootError",
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStore",
    "S3Store",
    "validate_key",
]

_PART_SUFFIX = ".part"
log = logging.getLogger(__name__)


#: IO-managed asset values live under ``<storage prefix>/assets/`` (manifests and landing data beside it)
ASSETS_PREFIX = "assets"


def asset_key(asset: str, partition: str | None, ext: str) -> str:
    """Where the IO managers keep an asset value: ``assets/<asset>/<partition><ext>`` or ``assets/<asset><ext>``."""
    return f"{ASSETS_PREFIX}/{asset}/{partition}{ext}" if partition is not None else f"{ASSETS_PREFIX}/{asset}{ext}"


class InvalidKeyError(ValueError):
    """A key that could escape the store's root/prefix or is not a plain '/'-separated path."""


class KeyOutsideRootError(InvalidKeyError):
    """A local key whose resolved path (symlinks followed) lies outside the store's root."""


class ObjectNotFoundError(FileNotFoundError):
    """No object at that key (a FileNotFoundError, so Dagster's missing-partition handling applies)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object without reading it."""

    key: str
    etag: str
    size: int
    last_modified: datetime | None
    sha256: str | None = None  # set by writes that hashed the bytes on the way (put_file(with_sha256=True), open_write)


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
    def put_file(self, local_path: str | os.PathLike[str], key: str, *, with_sha256: bool = False) -> ObjectInfo:
        """Copy a finished local file to ``key`` atomically (``with_sha256``: also hash it on the way)."""

    @abstractmethod
    def open_write(self, key: str) -> contextlib.AbstractContextManager[AtomicWriter]:
        """A binary file to stream into; the object appears at ``key`` only if the block succeeds.

        For serialisers that write sequentially (parquet, json): no local copy, and on S3 the parts
        are uploaded while the serialiser still writes. ``writer.result`` is the stored object's
        :class:`ObjectInfo` (with ``sha256``) after the block.
        """

    @abstractmethod
    def get_file(self, key: str) -> Path:
        """A local path with the object's bytes (S3: a cached download; do not modify it)."""

    def open_read(self, key: str) -> BinaryIO:
        """A seekable binary file with the object's bytes, to hand to a reader that takes file objects.

        S3 overrides this to stream: reading can start while the rest is still downloading.
        """
        return open(self.get_file(key), "rb")

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

    def write_file(self, key: str, write: Callable[[Path], None]) -> ObjectInfo:
        """Let ``write(path)`` produce a local file, then store it at ``key`` atomically.

        For serialisers that need a real file (h5py). Returns the stored object's info with the
        sha256 of its bytes; an error in ``write`` or in the upload leaves nothing at ``key``.
        """
        validate_key(key)
        tmpdir = Path(tempfile.mkdtemp(prefix="stage-"))
        try:
            path = tmpdir / Path(key).name  # same file name: serialisers that look at the suffix still work
            write(path)
            if not path.exists():
                raise FileNotFoundError(f"write for {self.uri(key)} produced no file at {path}")
            return self.put_file(path, key, with_sha256=True)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    @contextlib.contextmanager
    def staged(self, key: str) -> Iterator[Path]:
        """Yield a temp local path to write; it is stored at ``key`` only if the block succeeds.

        This is how serialisers that need a real file (h5py) write without ever exposing a
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


class AtomicWriter(io.RawIOBase):
    """A write-only binary stream that hashes what passes through it (base of both stores' writers)."""

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri
        self.size = 0
        self._sha = hashlib.sha256()
        self.result: ObjectInfo | None = None
        self.error: BaseException | None = None  # a failed transfer (as opposed to a failing serialiser)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError(f"write to closed writer for {self.uri}")
        view = memoryview(data).cast("B")
        self._sha.update(view)
        self._emit(view)
        self.size += len(view)
        return len(view)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def _emit(self, view: memoryview) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Closing is not committing: only the store's context manager publishes the object."""
        super().close()


class LocalStore(ObjectStore):
    """Objects as files under ``root``; writes are temp file + rename in the same directory.

    Keys are confined to the root: a key whose path resolves outside it (``..`` is refused by
    :func:`validate_key`; a symlink inside the root pointing elsewhere is refused here) raises
    :class:`KeyOutsideRootError` for reads and writes alike, and :meth:`list` skips such links.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _inside(self, path: Path) -> bool:
        return path == self.root or self.root in path.parents

    def _path(self, key: str) -> Path:
        real = (self.root / validate_key(key)).resolve()
        if not self._inside(real):
            raise KeyOutsideRootError(
                f"object key {key!r} resolves to {real}, outside the store root {self.root} "
                "(through a symlink): refused"
            )
        return real

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def _info_from_path(self, key: str, path: Path, sha256: str | None = None) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(
            key=key,
            etag=f"{st.st_size}-{st.st_mtime_ns}",  # same fingerprint as objectstore.head for files
            size=int(st.st_size),
            last_modified=datetime.fromtimestamp(st.st_mtime, tz=timezone.utc),
            sha256=sha256,
        )

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[AtomicWriter]:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=_PART_SUFFIX)
        fh = os.fdopen(fd, "wb")
        writer = _LocalWriter(str(dest), fh)
        try:
            yield writer
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
            writer.result = self._info_from_path(key, dest, writer.sha256)
        except BaseException:
            fh.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            writer.close()

    def put_file(self, local_path: str | os.PathLike[str], key: str, *, with_sha256: bool = False) -> ObjectInfo:
        src = Path(local_path)
        if not src.is_file():
            raise FileNotFoundError(f"cannot store {self.uri(key)}: source file {src} does not exist")
        with open(src, "rb") as fin, self.open_write(key) as out:
            shutil.copyfileobj(fin, out, 4 * 1024 * 1024)
        assert out.result is not None
        return out.result if with_sha256 else replace(out.result, sha256=None)

    def write_bytes(self, key: str, data: bytes) -> ObjectInfo:
        with self.open_write(key) as out:
            out.write(data)
        assert out.result is not None
        return out.result

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
        if not base.is_dir() or not self._inside(base.resolve()):
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):  # symlinked directories are not followed
            dirnames[:] = [d for d in dirnames if not (d.startswith(".") and d.endswith(".stage"))]  # in-flight
            for name in filenames:
                if name.startswith(".") and name.endswith(_PART_SUFFIX):
                    continue  # an in-flight write
                path = Path(dirpath) / name
                if path.is_symlink() and not self._inside(path.resolve()):
                    continue  # a link out of the root is not an object of this store
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    out.append(self._info_from_path(key, path))
        return sorted(out, key=lambda i: i.key)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def write_file(self, key: str, write: Callable[[Path], None]) -> ObjectInfo:
        """Write straight into a temp file beside the destination, hash it, rename it (no copy)."""
        with self.staged(key) as path:
            write(path)
            if not path.exists():
                raise FileNotFoundError(f"write for {self.uri(key)} produced no file at {path}")
            digest = sha256_file(path)
        return self._info_from_path(key, self._path(key), digest)

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


class _LocalWriter(AtomicWriter):
    def __init__(self, uri: str, fh: Any) -> None:
        super().__init__(uri)
        self._fh = fh

    def _emit(self, view: memoryview) -> None:
        self._fh.write(view)


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix/``.

    ``settings`` is an :class:`S3Settings` or a zero-argument factory returning a boto3 S3 client
    (the Dagster resources pass their ``S3Resource``'s client), so Dagster and plain code share one
    class. Transfers move ``part_size`` parts, ``concurrency`` at a time.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        settings: S3Settings | Callable[[], Any] | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        page_size: int = 1000,
        part_size: int = TRANSFER_PART_SIZE,
        concurrency: int = TRANSFER_CONCURRENCY,
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
        self.part_size = int(part_size)
        self.concurrency = int(concurrency)
        self._client: Any = None

    def __repr__(self) -> str:
        return f"S3Store('s3://{self.bucket}/{self.prefix}')"

    @property
    def client(self) -> Any:
        if self._client is None:
            s = self._settings
            self._client = with_content_types(s.client() if isinstance(s, S3Settings) else s())
        return self._client

    @property
    def transfer_config(self) -> Any:
        return transfer_config(part_size=self.part_size, concurrency=self.concurrency)

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

    def put_file(self, local_path: str | os.PathLike[str], key: str, *, with_sha256: bool = False) -> ObjectInfo:
        src = Path(local_path)
        if not src.is_file():
            raise FileNotFoundError(f"cannot store {self.uri(key)}: source file {src} does not exist")
        digest = upload_file(src, self.uri(key), client=self.client, config=self.transfer_config, with_sha256=with_sha256)
        return replace(self.info(key), sha256=digest)

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[AtomicWriter]:
        writer = _S3Writer(self, self._full(key), self.uri(key))
        try:
            yield writer
            writer.commit()
            writer.result = replace(self.info(key), sha256=writer.sha256)
        except BaseException:
            writer.abort()
            raise
        finally:
            writer.close()

    def write_bytes(self, key: str, data: bytes) -> ObjectInfo:
        full = self._full(key)
        self.client.put_object(Bucket=self.bucket, Key=full, Body=data, ContentType=content_type(full))  # one PUT: atomic
        return replace(self.info(key), sha256=hashlib.sha256(data).hexdigest())

    def get_file(self, key: str) -> Path:
        uri = self.uri(key)
        try:
            return fetch_to_cache(uri, cache_dir=self.cache_dir, client=self.client, config=self.transfer_config)
        except Exception as exc:
            if self._is_missing(exc):
                raise ObjectNotFoundError(f"no object at {uri}") from exc
            raise

    def open_read(self, key: str) -> BinaryIO:
        """Stream the object: its parts download in parallel into the cache while the caller reads.

        A read waits only for the parts it touches (parts asked for jump the queue, so a reader that
        looks at the end first — HDF5, parquet footers — does not wait for the whole object). The
        complete download becomes the ETag cache entry, so a second read is local. A cached
        version is returned as a plain file.
        """
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as exc:
            if self._is_missing(exc):
                raise ObjectNotFoundError(f"no object at {self.uri(key)}") from exc
            raise
        etag, size = head["ETag"].strip('"'), int(head["ContentLength"])
        target = cache_path(self.cache_dir, self.bucket, self._full(key), etag)
        if target.exists():
            return open(target, "rb")
        return _PrefetchReader(self, self._full(key), size=size, etag=head["ETag"], target=target)  # type: ignore[return-value]

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


class _S3Writer(AtomicWriter):
    """Streams into a multipart upload: each full part is uploaded by a pool while writing goes on.

    Nothing is visible at the key until :meth:`commit` completes the upload; a small object (less
    than one part) is a single PUT at commit. :meth:`abort` cancels the upload and its parts.
    """

    def __init__(self, store: S3Store, full_key: str, uri: str) -> None:
        super().__init__(uri)
        self._store = store
        self._key = full_key
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._slots = threading.BoundedSemaphore(max(1, store.concurrency))  # parts in memory at once

    def _emit(self, view: memoryview) -> None:
        self._buf += view
        while len(self._buf) >= self._store.part_size:
            chunk = bytes(self._buf[: self._store.part_size])
            del self._buf[: self._store.part_size]
            self._submit(chunk)

    def _submit(self, chunk: bytes) -> None:
        client = self._store.client
        if self._upload_id is None:
            resp = client.create_multipart_upload(Bucket=self._store.bucket, Key=self._key, ContentType=content_type(self._key))
            self._upload_id = resp["UploadId"]
            self._pool = ThreadPoolExecutor(max_workers=max(1, self._store.concurrency), thread_name_prefix="s3-part")
        assert self._pool is not None
        number = len(self._parts) + 1
        self._slots.acquire()

        def upload() -> dict[str, Any]:
            try:
                resp = client.upload_part(
                    Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=chunk
                )
                return {"PartNumber": number, "ETag": resp["ETag"]}
            finally:
                self._slots.release()

        self._parts.append(self._pool.submit(upload))
        failed = [f for f in self._parts if f.done() and f.exception() is not None]
        if failed:  # fail fast: the serialiser need not finish writing into a lost upload
            self.error = failed[0].exception()
            raise self.error  # type: ignore[misc]

    def commit(self) -> None:
        client = self._store.client
        if self._upload_id is None:
            client.put_object(
                Bucket=self._store.bucket, Key=self._key, Body=bytes(self._buf), ContentType=content_type(self._key)
            )
            return
        if self._buf or not self._parts:
            self._submit(bytes(self._buf))
            self._buf.clear()
        try:
            parts = [f.result() for f in self._parts]
        except BaseException as exc:
            self.error = exc
            raise
        client.complete_multipart_upload(
            Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
        )
        self._upload_id = None
        self._shutdown()

    def abort(self) -> None:
        upload_id, self._upload_id = self._upload_id, None
        self._shutdown(cancel=True)
        if upload_id is not None:
            try:
                self._store.client.abort_multipart_upload(Bucket=self._store.bucket, Key=self._key, UploadId=upload_id)
            except Exception as exc:  # keep the original error; say what is left behind
                log.warning("could not abort multipart upload %s of %s (its parts remain until aborted): %r", upload_id, self.uri, exc)

    def _shutdown(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None


class _PrefetchReader(io.RawIOBase):
    """A seekable file over an S3 object whose parts download in parallel into a local file.

    ``concurrency`` workers fetch ``part_size`` ranges (the object's ETag pinned with If-Match, so
    a concurrent overwrite fails the read instead of mixing versions) and write them at their
    offset; :meth:`readinto` waits only for the parts it covers, asking for them first if no worker
    has started them. :meth:`close` waits for the remaining parts and publishes the file as the
    cache entry ``target``; on any error the partial file is removed.
    """

    def __init__(self, store: S3Store, full_key: str, *, size: int, etag: str, target: Path) -> None:
        super().__init__()
        self._store, self._key, self._etag, self.size, self._target = store, full_key, etag, size, target
        self.name = f"s3://{store.bucket}/{full_key}"
        self._part = max(1, store.part_size)
        self._n = max(1, -(-size // self._part))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=_PART_SUFFIX)
        self._fd = fd
        os.ftruncate(fd, size)
        self._pos = 0
        self._lock = threading.Lock()
        self._done = [threading.Event() for _ in range(self._n)]
        self._errors: dict[int, BaseException] = {}
        self._started: set[int] = set()
        self._asked: list[int] = []
        self._next = 0
        workers = max(1, min(store.concurrency, self._n))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-range")
        for _ in range(workers):
            self._pool.submit(self._work)

    def _claim(self) -> int | None:
        with self._lock:
            while self._asked:
                i = self._asked.pop()
                if i not in self._started:
                    self._started.add(i)
                    return i
            while self._next < self._n and self._next in self._started:
                self._next += 1
            if self._next >= self._n:
                return None
            self._started.add(self._next)
            return self._next

    def _work(self) -> None:
        client = self._store.client
        while (i := self._claim()) is not None:
            start = i * self._part
            end = min(self.size, start + self._part) - 1
            try:
                if self.size:
                    body = client.get_object(
                        Bucket=self._store.bucket, Key=self._key, Range=f"bytes={start}-{end}", IfMatch=self._etag
                    )["Body"]
                    offset = start
                    for chunk in body.iter_chunks(1024 * 1024):
                        offset += os.pwrite(self._fd, chunk, offset)
                    if offset != end + 1:
                        raise OSError(f"short read of {self.name} bytes {start}-{end}: got {offset - start}")
            except BaseException as exc:  # surfaced by the reader that needs this part
                self._errors[i] = exc
            finally:
                self._done[i].set()

    def _wait(self, i: int) -> None:
        if not self._done[i].is_set():
            with self._lock:
                if i not in self._started:
                    self._asked.append(i)
            self._done[i].wait()
        if i in self._errors:
            raise self._errors[i]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.size - self._pos)
        if n <= 0:
            return 0
        for i in range(self._pos // self._part, (self._pos + n - 1) // self._part + 1):
            self._wait(i)
        got = os.preadv(self._fd, [view[:n]], self._pos)
        self._pos += got
        return got

    def readall(self) -> bytes:
        out = bytearray(max(0, self.size - self._pos))
        n = self.readinto(out) if out else 0
        return bytes(out[:n])

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._pool.shutdown(wait=True)  # the remaining parts: the cache entry must be complete
            if self._errors:  # a reader that needed a failed part has raised already; just do not cache
                log.warning("download of %s incomplete (%r): not cached", self.name, next(iter(self._errors.values())))
            else:
                os.close(self._fd)
                self._fd = -1
                os.replace(self._tmp, self._target)
        finally:
            if self._fd >= 0:
                os.close(self._fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            super().close()
