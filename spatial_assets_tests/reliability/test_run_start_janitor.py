"""A run starting cleans what killed writers left: orphaned multipart uploads and stale ``.part`` files.

The storage janitor (:func:`spatial_assets.storage.janitor.clean_stale_staging`) is wired into
resource initialization (``storage``'s ``setup_for_execution``, the IO managers'
``create_io_manager``), which Dagster does at the start of every run — and also for sensor
evaluations, which must not clean. The leftovers are real: a writer process SIGKILLed inside its
multipart upload to SeaweedFS (``reliability/killable_writer``).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster_aws.s3 import S3Resource

from spatial_assets.defs.io_managers import LocalAssetIOManager, S3AssetIOManager
from spatial_assets.defs.resources import LocalStorageResource, S3StorageResource, StorageResource
from spatial_assets.storage.janitor import DEFAULT_OLDER_THAN_S
from spatial_assets.storage.objectstore import S3Settings
from spatial_assets.storage.seaweed import settings_env
from spatial_assets_tests.reliability.test_killed_writes import _start_and_kill

THRESHOLD_S = 5.0  # the S3 server stamps an upload's start itself: the test waits this long, not an hour


@dg.asset
def touches_storage(storage: StorageResource) -> dict:
    return {"listed": len(list(storage.get_store().list("assets/")))}


@dg.sensor(asset_selection=[touches_storage])
def looks_at_storage(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SkipReason:
    return dg.SkipReason(f"looked at {storage.location()}")


def _logged(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [e.message for e in instance.all_logs(run_id) if e.message and "storage janitor" in e.message]


def _uploads(settings: S3Settings, bucket: str, prefix: str) -> list[str]:
    return [u["Key"] for u in settings.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []) or []]


def test_run_start_aborts_the_killed_upload_and_removes_stale_part_files_but_a_sensor_tick_does_not(
    s3_settings: S3Settings, s3_resource: S3Resource, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, tmpdir = tmp_path / "cache", tmp_path / "tmp"
    cache.mkdir(), tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))  # the janitor's temp-dir sweep sees only this test's
    # a writer killed inside its multipart upload of pfx/assets/annotations.h5ad
    _start_and_kill(["s3-upload", s3_bucket, "pfx", "assets/annotations.h5ad", str(cache)], tmp_path / "up.pid", tmpdir,
                    settings_env(s3_settings))
    assert _uploads(s3_settings, s3_bucket, "pfx/") == ["pfx/assets/annotations.h5ad"]
    stale_download = cache / "s3" / "0123456789abcdef" / "etag" / "big.bin.part"  # a download killed half-way
    stale_download.parent.mkdir(parents=True)
    stale_download.write_bytes(b"half")
    staged = sorted(p for p in tmpdir.iterdir() if p.name.startswith("stage-"))
    assert staged, list(tmpdir.iterdir())  # the killed upload's source file
    time.sleep(THRESHOLD_S + 1)
    in_flight = cache / "s3" / "fedcba9876543210" / "etag" / "now.bin.part"  # a concurrent run's download
    in_flight.parent.mkdir(parents=True)

    resources = {
        "storage": S3StorageResource(s3_resource=s3_resource, bucket=s3_bucket, prefix="pfx", cache_dir=str(cache),
                                     janitor_older_than_s=THRESHOLD_S),
        "io_manager": S3AssetIOManager(s3_resource=s3_resource, s3_bucket=s3_bucket, s3_prefix="pfx/assets",
                                       cache_dir=str(cache), janitor_older_than_s=THRESHOLD_S),
    }
    defs = dg.Definitions(assets=[touches_storage], sensors=[looks_at_storage], resources=resources)
    with dg.instance_for_test() as instance:
        # a sensor tick initializes the same resources, outside any run: it must not clean
        with dg.build_sensor_context(instance=instance, resources=resources, repository_def=defs.get_repository_def()) as ctx:
            assert "looked at" in looks_at_storage(ctx).skip_message
        assert _uploads(s3_settings, s3_bucket, "pfx/") == ["pfx/assets/annotations.h5ad"] and stale_download.exists()

        job = defs.resolve_implicit_global_asset_job_def()
        in_flight.write_bytes(b"fresh")  # just begun: younger than the threshold when the run starts
        result = job.execute_in_process(instance=instance)
        assert result.success
        messages = _logged(instance, result.run_id)

    assert _uploads(s3_settings, s3_bucket, "pfx/") == []  # the orphan's parts are released
    assert not stale_download.exists() and not any(p.exists() for p in staged)
    assert in_flight.read_bytes() == b"fresh"  # younger than the threshold: someone's in-flight work
    # one cleaning per store (storage at pfx/, IO manager at pfx/assets/), logged in the run
    assert any("aborted 1 multipart upload(s)" in m for m in messages), messages
    assert len(messages) == 1, messages  # the second store found nothing left to do (only a report is logged)
    assert s3_settings.client().get_object(Bucket=s3_bucket, Key="pfx/assets/touches_storage.json")  # the run went on


def test_local_deployment_run_removes_a_stale_part_file_with_the_default_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    root = tmp_path / "storage"
    target = root / "assets" / "cell_type_annotations"
    target.mkdir(parents=True)
    stale, fresh = target / ".s1.h5ad.a1b2c3.part", target / ".s2.h5ad.d4e5f6.part"
    stale.write_bytes(b"killed half-way")
    fresh.write_bytes(b"in flight")
    old = time.time() - DEFAULT_OLDER_THAN_S - 60
    os.utime(stale, (old, old))
    resources = {"storage": LocalStorageResource(root=str(root)), "io_manager": LocalAssetIOManager(base_dir=str(root / "assets"))}
    with dg.instance_for_test() as instance:
        result = dg.materialize([touches_storage], resources=resources, instance=instance)
        messages = _logged(instance, result.run_id)
    assert result.success
    assert not stale.exists() and fresh.read_bytes() == b"in flight"
    assert any("removed 1 stale staging path(s)" in m for m in messages), messages
