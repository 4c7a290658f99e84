"""Case: a writer SIGKILLed mid-write leaves no partial object, and the janitor clears its staging.

Real processes, real SeaweedFS: each writer is a separate Python process (``killable_writer``)
killed with SIGKILL at a known point inside the write, which no ``finally`` / ``except`` can
intercept. Then: nothing at the final key, the orphaned multipart upload is visible to S3, the
staging is on disk — and ``clean_stale_staging`` aborts / removes exactly that, once it is older
than the threshold, and nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spatial_assets.storage.janitor import clean_stale_staging
from spatial_assets.storage.objectstore import S3Settings
from spatial_assets.storage.seaweed import settings_env
from spatial_assets.storage.stores import LocalStore, S3Store

REPO = Path(__file__).resolve().parents[2]


def _start_and_kill(args: list[str], marker: Path, tmpdir: Path, env: dict[str, str] | None = None, timeout: float = 90) -> None:
    """Start the writer, SIGKILL it once it has parked inside the write (marker file written)."""
    full_env = {**os.environ, **(env or {}), "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
    marker.unlink(missing_ok=True)  # a marker left by an earlier writer must not be taken for this one's
    proc = subprocess.Popen([sys.executable, "-m", "spatial_assets_tests.reliability.killable_writer", args[0], str(marker), *args[1:]],
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not (marker.exists() and marker.read_text().strip()):
            if proc.poll() is not None:
                raise AssertionError(f"writer exited ({proc.returncode}) before parking: {proc.stdout.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("writer never reached the kill point")
            time.sleep(0.05)
        assert int(marker.read_text()) == proc.pid
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _staging(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if ".part" in p.name or p.name.startswith("stage-") or p.name.endswith(".stage"))


def test_killed_s3_upload_and_download_leave_only_staging_which_the_janitor_clears(
    s3_settings: S3Settings, s3_bucket: str, tmp_path: Path
) -> None:
    env = settings_env(s3_settings)
    cache, tmpdir = tmp_path / "cache", tmp_path / "tmp"
    cache.mkdir(), tmpdir.mkdir()
    store = S3Store(s3_bucket, "pfx", s3_settings, cache_dir=cache)
    store.write_bytes("assets/keep.bin", b"a finished object")
    store.write_bytes("assets/big.bin", os.urandom(6 * 1024 * 1024))
    other = S3Store(s3_bucket, "other-prefix", s3_settings)  # someone else's upload, outside our prefix
    other_upload = other.client.create_multipart_upload(Bucket=s3_bucket, Key="other-prefix/theirs.bin")["UploadId"]

    _start_and_kill(["s3-upload", s3_bucket, "pfx", "assets/annotations.h5ad", str(cache)], tmp_path / "up.pid", tmpdir, env)
    _start_and_kill(["s3-download", s3_bucket, "pfx", "assets/big.bin", str(cache)], tmp_path / "down.pid", tmpdir, env)

    # killed mid-write: no object at the final key, but an orphaned multipart upload and staging on disk
    assert not store.exists("assets/annotations.h5ad")
    uploads = store.client.list_multipart_uploads(Bucket=s3_bucket, Prefix="pfx/").get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["pfx/assets/annotations.h5ad"]
    parts = store.client.list_parts(Bucket=s3_bucket, Key="pfx/assets/annotations.h5ad", UploadId=uploads[0]["UploadId"])
    assert len(parts.get("Parts", [])) >= 1  # part 1 made it: real bytes are held by the orphan
    staged_before = _staging(tmpdir) + _staging(cache)
    assert any(p.name.startswith("stage-") for p in staged_before), staged_before  # the upload's source file
    assert any(".part" in p.name for p in _staging(cache)), staged_before  # the half-started download

    # a run starting now must not touch a concurrent run's in-flight work: nothing is that old yet
    assert not clean_stale_staging(store, older_than_s=3600, temp_dir=tmpdir)
    assert len(store.client.list_multipart_uploads(Bucket=s3_bucket, Prefix="pfx/").get("Uploads", [])) == 1

    report = clean_stale_staging(store, older_than_s=0, temp_dir=tmpdir)
    assert [k for k, _ in report.aborted_uploads] == ["pfx/assets/annotations.h5ad"]
    assert set(report.removed) >= {p for p in staged_before if p.parent in (tmpdir,) or ".part" in p.name}
    assert store.client.list_multipart_uploads(Bucket=s3_bucket, Prefix="pfx/").get("Uploads") in (None, [])
    assert _staging(tmpdir) == [] and _staging(cache) == []
    # nothing else was touched
    assert store.read_bytes("assets/keep.bin") == b"a finished object"
    theirs = other.client.list_multipart_uploads(Bucket=s3_bucket, Prefix="other-prefix/").get("Uploads", [])
    assert [u["UploadId"] for u in theirs] == [other_upload]
    other.client.abort_multipart_upload(Bucket=s3_bucket, Key="other-prefix/theirs.bin", UploadId=other_upload)
    # and the store still works: the killed write can simply be redone
    store.write_bytes("assets/annotations.h5ad", b"redone")
    assert store.read_bytes("assets/annotations.h5ad") == b"redone"


def test_killed_local_staged_write_leaves_a_stage_dir_the_janitor_removes(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    store = LocalStore(root)
    store.write_bytes("assets/cell_type_annotations/keep.h5ad", b"finished")
    _start_and_kill(["local-staged", str(root), "assets/cell_type_annotations/s1.h5ad"], tmp_path / "w.pid", tmp_path)
    leftovers = _staging(root)
    assert len(leftovers) >= 1 and all(p.name.endswith(".stage") or p.parent.name.endswith(".stage") for p in leftovers)
    assert [i.key for i in store.list("assets/")] == ["assets/cell_type_annotations/keep.h5ad"]  # not visible
    assert not store.exists("assets/cell_type_annotations/s1.h5ad")
    assert not clean_stale_staging(store, older_than_s=3600, temp_dir=tmp_path / "none")
    report = clean_stale_staging(store, older_than_s=0, temp_dir=tmp_path / "none")
    assert len(report.removed) == 1 and report.removed[0].name.endswith(".stage")
    assert _staging(root) == []
    assert store.read_bytes("assets/cell_type_annotations/keep.h5ad") == b"finished"


def test_janitor_refuses_a_negative_age(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="older_than_s"):
        clean_stale_staging(LocalStore(tmp_path), older_than_s=-1)
