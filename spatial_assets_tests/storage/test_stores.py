"""ObjectStore contract, run identically against a directory and the real SeaweedFS S3."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import threading

from spatial_assets.storage.objectstore import TRANSFER_PART_SIZE, S3Settings
from spatial_assets.storage.stores import InvalidKeyError, KeyOutsideRootError, LocalStore, ObjectNotFoundError, ObjectStore, S3Store

MB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "root")
    return request.getfixturevalue("s3_store")


def _count_calls(client, operation: str) -> list[int]:
    """Count real requests of one S3 operation (botocore's event hooks; nothing is replaced)."""
    calls: list[int] = []
    client.meta.events.register(f"before-call.s3.{operation}", lambda **kw: calls.append(1))
    return calls


def test_round_trip_info_list_delete(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    payload = os.urandom(3000)
    src.write_bytes(payload)
    info = store.put_file(src, "a/b/c.bin")
    assert info.size == 3000 and info.key == "a/b/c.bin" and info.etag
    assert store.get_file("a/b/c.bin").read_bytes() == payload
    assert store.read_bytes("a/b/c.bin") == payload
    store.write_bytes("a/b/d.json", b"{}")
    store.write_bytes("a/bx.txt", b"x")
    store.write_bytes("z.txt", b"zz")
    assert store.exists("a/b/d.json") and not store.exists("a/b/nope")

    assert [i.key for i in store.list()] == ["a/b/c.bin", "a/b/d.json", "a/bx.txt", "z.txt"]
    assert [i.key for i in store.list("a/b/")] == ["a/b/c.bin", "a/b/d.json"]
    assert [i.key for i in store.list("a/b")] == ["a/b/c.bin", "a/b/d.json", "a/bx.txt"]  # S3 string-prefix semantics
    assert [i.key for i in store.list("nothing/")] == []
    sizes = {i.key: i.size for i in store.list("a/")}
    assert sizes == {"a/b/c.bin": 3000, "a/b/d.json": 2, "a/bx.txt": 1}
    assert store.info("z.txt").last_modified is not None

    store.delete("a/b/c.bin")
    store.delete("a/b/c.bin")  # idempotent
    assert not store.exists("a/b/c.bin")
    with pytest.raises(ObjectNotFoundError, match="c.bin"):
        store.get_file("a/b/c.bin")
    with pytest.raises(ObjectNotFoundError, match="c.bin"):
        store.read_bytes("a/b/c.bin")
    with pytest.raises(FileNotFoundError):  # ObjectNotFoundError is a FileNotFoundError
        store.info("a/b/c.bin")


@pytest.mark.parametrize("bad", ["../escape", "a/../../b", "/abs", "a//b", "a/./b", "", "a\\b", "trailing/"])
def test_unsafe_keys_are_refused(store: ObjectStore, bad: str) -> None:
    with pytest.raises(InvalidKeyError):
        store.write_bytes(bad, b"x")
    with pytest.raises(ValueError):  # InvalidKeyError is a ValueError
        store.uri(bad)


def test_s3_keys_live_under_the_prefix(s3_store: S3Store, s3_settings: S3Settings) -> None:
    s3_store.write_bytes("x/y.txt", b"1")
    assert s3_store.uri("x/y.txt") == f"s3://{s3_store.bucket}/pfx/x/y.txt"
    raw = s3_settings.client().list_objects_v2(Bucket=s3_store.bucket)
    assert [o["Key"] for o in raw["Contents"]] == ["pfx/x/y.txt"]
    # a sibling prefix is invisible to this store
    s3_settings.client().put_object(Bucket=s3_store.bucket, Key="pfx2/other.txt", Body=b"2")
    assert [i.key for i in s3_store.list()] == ["x/y.txt"]


def test_s3_list_paginates(s3_settings: S3Settings, s3_bucket: str, s3_cache_dir: Path) -> None:
    store = S3Store(s3_bucket, "p", s3_settings, cache_dir=s3_cache_dir, page_size=2)
    keys = [f"k/{i:02d}" for i in range(7)]
    for k in keys:
        store.write_bytes(k, k.encode())
    calls = _count_calls(store.client, "ListObjectsV2")
    assert [i.key for i in store.list("k/")] == keys
    assert len(calls) == 4  # ceil(7 / 2) pages: everything beyond the first page was fetched


def test_failed_staged_write_leaves_nothing(store: ObjectStore) -> None:
    store.write_bytes("out/value.bin", b"old")
    with pytest.raises(RuntimeError, match="serialiser crashed"):
        with store.staged("out/value.bin") as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("serialiser crashed")
    assert store.read_bytes("out/value.bin") == b"old"  # previous version intact
    with pytest.raises(RuntimeError):
        with store.staged("out/new.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("serialiser crashed")
    assert not store.exists("out/new.bin")
    assert [i.key for i in store.list()] == ["out/value.bin"]  # no temp or partial objects visible
    with store.staged("out/new.bin") as tmp:
        tmp.write_bytes(b"complete")
        assert [i.key for i in store.list()] == ["out/value.bin"]  # in flight: not visible yet
    assert store.read_bytes("out/new.bin") == b"complete"


def test_local_failed_write_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    with pytest.raises(RuntimeError):
        with store.staged("d/v.h5ad") as tmp:
            tmp.write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert [p.name for p in (tmp_path / "root" / "d").iterdir()] == []


def test_interrupted_multipart_upload_leaves_no_object(s3_store: S3Store, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(5 * TRANSFER_PART_SIZE))
    parts = _count_calls(s3_store.client, "UploadPart")

    def cut_connection(**kwargs):
        if len(parts) >= 2:
            raise ConnectionError("network cut during part upload")

    s3_store.client.meta.events.register("before-call.s3.UploadPart", cut_connection)
    with pytest.raises(Exception, match="network cut"):
        s3_store.put_file(src, "models/big.bin")
    assert not s3_store.exists("models/big.bin")
    assert s3_store.list() == []
    uploads = s3_store.client.list_multipart_uploads(Bucket=s3_store.bucket).get("Uploads", [])
    assert uploads == []  # boto3 aborted the multipart upload: no orphaned parts either


def test_large_upload_is_multipart(s3_store: S3Store, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(2 * TRANSFER_PART_SIZE + 123))
    parts = _count_calls(s3_store.client, "UploadPart")
    info = s3_store.put_file(src, "big.bin")
    assert len(parts) == 3
    assert info.etag.endswith("-3")  # S3's multipart ETag: md5-of-part-md5s + '-<parts>'
    assert info.size == 2 * TRANSFER_PART_SIZE + 123
    assert hashlib.sha256(s3_store.get_file("big.bin").read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    small = s3_store.write_bytes("small.bin", b"abc")
    assert small.etag == hashlib.md5(b"abc").hexdigest()  # single PUT: plain md5


def test_etag_cache_downloads_once_and_refetches_changed_objects(s3_store: S3Store, s3_cache_dir: Path) -> None:
    s3_store.write_bytes("cached/obj.bin", b"version-1")
    gets = _count_calls(s3_store.client, "GetObject")
    p1 = s3_store.get_file("cached/obj.bin")
    assert p1.read_bytes() == b"version-1" and len(gets) == 1
    assert s3_cache_dir in p1.parents
    mtime = p1.stat().st_mtime_ns
    p1b = s3_store.get_file("cached/obj.bin")
    assert p1b == p1 and len(gets) == 1  # no second download
    assert p1.stat().st_mtime_ns == mtime
    s3_store.write_bytes("cached/obj.bin", b"version-2")
    p2 = s3_store.get_file("cached/obj.bin")
    assert len(gets) == 2 and p2 != p1
    assert p2.read_bytes() == b"version-2"


def test_local_store_get_file_is_the_file_itself(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write_bytes("x/y.bin", b"1")
    assert store.get_file("x/y.bin") == (tmp_path / "x" / "y.bin").resolve()
    assert store.uri("x/y.bin") == str((tmp_path / "x" / "y.bin").resolve())


def _max_parts_in_flight(client) -> list[int]:
    """Largest number of UploadPart requests between send and response at any moment (real hooks)."""
    state = {"now": 0}
    peak = [0]
    lock = threading.Lock()

    def start(**kwargs):
        with lock:
            state["now"] += 1
            peak[0] = max(peak[0], state["now"])

    def done(**kwargs):
        with lock:
            state["now"] -= 1

    client.meta.events.register("before-send.s3.UploadPart", start)
    client.meta.events.register("after-call.s3.UploadPart", done)
    client.meta.events.register("after-call-error.s3.UploadPart", done)
    return peak


def test_parts_move_in_parallel_with_the_object_media_type(s3_store: S3Store, tmp_path: Path) -> None:
    """The throughput design: several parts in flight at once, each typed (SeaweedFS gzips untyped parts)."""
    src = tmp_path / "cells.h5ad"
    src.write_bytes(os.urandom(6 * TRANSFER_PART_SIZE))
    peak = _max_parts_in_flight(s3_store.client)
    types: list[str] = []
    s3_store.client.meta.events.register("before-send.s3.UploadPart", lambda request, **kw: types.append(request.headers["Content-Type"].decode() if isinstance(request.headers["Content-Type"], bytes) else request.headers["Content-Type"]))
    info = s3_store.put_file(src, "cells.h5ad", with_sha256=True)
    assert peak[0] >= 2, peak  # measured 6-8 on 2 cores; 1 would mean serial parts
    assert types == ["application/x-hdf5"] * 6
    assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()  # hashed while uploading
    assert s3_store.client.head_object(Bucket=s3_store.bucket, Key="pfx/cells.h5ad")["ContentType"] == "application/x-hdf5"
    peak[0] = 0
    with s3_store.open_write("t.parquet") as out:  # the streaming writer uploads its parts in parallel too
        for _ in range(6):
            out.write(os.urandom(TRANSFER_PART_SIZE))
    assert peak[0] >= 2, peak
    assert out.result.size == 6 * TRANSFER_PART_SIZE and out.result.etag.endswith("-6")


def test_streamed_write_is_atomic(store: ObjectStore) -> None:
    payload = os.urandom(2 * TRANSFER_PART_SIZE + 5)  # several parts on S3
    with store.open_write("s/stream.bin") as out:
        for i in range(0, len(payload), 1_000_000):
            out.write(payload[i : i + 1_000_000])
        assert not store.exists("s/stream.bin")  # in flight: not visible
    assert store.read_bytes("s/stream.bin") == payload
    assert out.result.sha256 == hashlib.sha256(payload).hexdigest() and out.result.size == len(payload)
    with pytest.raises(RuntimeError, match="serialiser crashed"):
        with store.open_write("s/stream.bin") as out:
            out.write(b"x" * (2 * TRANSFER_PART_SIZE))  # parts already uploaded on S3
            raise RuntimeError("serialiser crashed")
    assert store.read_bytes("s/stream.bin") == payload  # previous version intact
    assert [i.key for i in store.list()] == ["s/stream.bin"]
    if isinstance(store, S3Store):
        assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []  # aborted


def test_write_file_hashes_and_publishes_once(store: ObjectStore) -> None:
    info = store.write_file("w/v.h5ad", lambda p: p.write_bytes(b"abc" * 1000))
    assert info.sha256 == hashlib.sha256(b"abc" * 1000).hexdigest() and info.size == 3000
    with pytest.raises(ValueError, match="bad value"):
        store.write_file("w/x.h5ad", lambda p: (p.write_bytes(b"half"), (_ for _ in ()).throw(ValueError("bad value"))))
    assert [i.key for i in store.list()] == ["w/v.h5ad"]


@pytest.fixture()
def escape(tmp_path: Path) -> tuple[LocalStore, Path]:
    """A store whose root holds a directory link and a file link to a directory outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    root = tmp_path / "root"
    root.mkdir()
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "link.txt").symlink_to(outside / "secret.txt")
    (root / "inner").mkdir()
    (root / "inner" / "ok.txt").write_text("ok")
    (root / "alias.txt").symlink_to(root / "inner" / "ok.txt")  # a link that stays inside is fine
    return LocalStore(root), outside


@pytest.mark.parametrize("key", ["linkdir/secret.txt", "link.txt"])
def test_symlink_escape_refused_for_reads(escape: tuple[LocalStore, Path], key: str) -> None:
    store, outside = escape
    for read in (store.read_bytes, store.get_file, store.info, store.exists, store.uri):
        with pytest.raises(KeyOutsideRootError, match=f"{key!r} resolves to {outside}.*outside the store root"):
            read(key)
    assert store.read_bytes("alias.txt") == b"ok"


@pytest.mark.parametrize("key", ["linkdir/new.txt", "linkdir/sub/new.txt", "link.txt"])
def test_symlink_escape_refused_for_writes(escape: tuple[LocalStore, Path], key: str, tmp_path: Path) -> None:
    store, outside = escape
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    writes = [
        lambda: store.write_bytes(key, b"overwrite"),
        lambda: store.put_file(src, key),
        lambda: store.write_file(key, lambda p: p.write_bytes(b"x")),
        lambda: store.open_write(key).__enter__(),
        lambda: store.staged(key).__enter__(),
        lambda: store.delete(key),
    ]
    for write in writes:
        with pytest.raises(KeyOutsideRootError, match="outside the store root"):
            write()
    assert sorted(p.name for p in outside.rglob("*")) == ["secret.txt"]  # nothing created outside
    assert (outside / "secret.txt").read_text() == "secret"  # nothing changed or deleted outside


def test_list_skips_links_out_of_the_root(escape: tuple[LocalStore, Path]) -> None:
    store, _ = escape
    assert [i.key for i in store.list()] == ["alias.txt", "inner/ok.txt"]


def test_streamed_read_serves_any_offset_and_fills_the_cache(s3_store: S3Store, s3_cache_dir: Path) -> None:
    payload = os.urandom(3 * TRANSFER_PART_SIZE + 777)
    s3_store.write_bytes("r/blob.bin", payload)
    gets = _count_calls(s3_store.client, "GetObject")
    with s3_store.open_read("r/blob.bin") as fh:
        fh.seek(-100, os.SEEK_END)  # the end first, as HDF5 and parquet readers do
        assert fh.read() == payload[-100:]
        fh.seek(TRANSFER_PART_SIZE - 5)
        assert fh.read(10) == payload[TRANSFER_PART_SIZE - 5 : TRANSFER_PART_SIZE + 5]  # across a part boundary
        fh.seek(0)
        assert fh.read() == payload
    assert len(gets) == 4  # one ranged GET per part, none twice
    cached = s3_store.get_file("r/blob.bin")
    assert s3_cache_dir in cached.parents and cached.read_bytes() == payload and len(gets) == 4  # complete cache entry
    with s3_store.open_read("r/blob.bin") as fh:  # warm: the cached file, no download
        assert fh.read() == payload and len(gets) == 4
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no partial files left


def test_streamed_read_of_a_changed_object_fails_instead_of_mixing_versions(s3_store: S3Store, s3_cache_dir: Path) -> None:
    s3_store.write_bytes("r/v.bin", b"a" * (2 * TRANSFER_PART_SIZE))
    swapped = []

    def overwrite_once(**kwargs):
        if not swapped:
            swapped.append(1)
            s3_store.client.put_object(Bucket=s3_store.bucket, Key="pfx/r/v.bin", Body=b"b" * (2 * TRANSFER_PART_SIZE))

    s3_store.client.meta.events.register("before-call.s3.GetObject", overwrite_once)
    with pytest.raises(Exception, match="PreconditionFailed|412"):
        with s3_store.open_read("r/v.bin") as fh:
            fh.read()
    s3_store.client.meta.events.unregister("before-call.s3.GetObject", overwrite_once)
    assert not any(p.is_file() for p in s3_cache_dir.rglob("*"))  # nothing cached from the mixed download
