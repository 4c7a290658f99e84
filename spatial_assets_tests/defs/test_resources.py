"""The s3 / storage / io_manager resources of each deployment: one S3Resource, no secrets in config, no server started."""

import json
import re
from pathlib import Path

import dagster as dg
import pytest
from dagster_aws.s3 import S3Resource

from spatial_assets.defs.deployment import build_resources
from spatial_assets.defs.io_managers import LocalAssetIOManager, S3AssetIOManager
from spatial_assets.defs.resources import LocalS3Resource, LocalStorageResource, S3StorageResource
from spatial_assets.storage.deployment import LocalS3NotRunningError, StorageConfigError, StorageSettings
from spatial_assets.storage.locations import LocationNotAllowedError
from spatial_assets.storage.objectstore import S3Settings


def test_storage_resources_local_and_s3(tmp_path: Path, s3_resource: S3Resource, s3_settings: S3Settings, s3_bucket: str) -> None:
    local = LocalStorageResource(root=str(tmp_path / "files"))
    local.get_store().write_bytes("a.txt", b"1")
    assert (tmp_path / "files" / "a.txt").read_bytes() == b"1"
    assert local.s3_settings() is None
    assert local.allowed() == [str((tmp_path / "files").resolve())]
    assert local.check_allowed_uri(str(tmp_path / "files" / "refs" / "r.h5ad")) == str((tmp_path / "files" / "refs" / "r.h5ad").resolve())
    with pytest.raises(LocationNotAllowedError, match="elsewhere"):
        local.check_allowed_uri(str(tmp_path / "elsewhere" / "r.h5ad"))

    s3 = S3StorageResource(s3_resource=s3_resource, bucket=s3_bucket, prefix="p", cache_dir=str(tmp_path / "cache"))
    s3.get_store().write_bytes("a.txt", b"2")
    assert s3_settings.client().get_object(Bucket=s3_bucket, Key="p/a.txt")["Body"].read() == b"2"
    assert s3.s3_settings().endpoint_url == s3_settings.endpoint_url
    assert s3.allowed() == [f"s3://{s3_bucket}/p/"]
    assert s3.check_allowed_uri(f"s3://{s3_bucket}/p/raw/ref.h5ad")
    with pytest.raises(LocationNotAllowedError, match=f"s3://{s3_bucket}/other/ref.h5ad"):
        s3.check_allowed_uri(f"s3://{s3_bucket}/other/ref.h5ad")
    wider = S3StorageResource(s3_resource=s3_resource, bucket=s3_bucket, allowed_locations=[f"s3://{s3_bucket}/", "/data/refs"])
    assert wider.check_allowed_uri(f"s3://{s3_bucket}/other/ref.h5ad")


def test_build_resources_s3_by_environment_alone(
    s3_env: S3Settings, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The 'AWS' deployment pointed at SeaweedFS purely through env vars: what runs on AWS runs here."""
    monkeypatch.setenv("SPATIAL_ASSETS_BUCKET", s3_bucket)
    monkeypatch.setenv("SPATIAL_ASSETS_PREFIX", "prod")
    monkeypatch.setenv("SPATIAL_ASSETS_CACHE", str(tmp_path / "cache"))
    resources = build_resources("s3")
    assert set(resources) == {"s3", "storage", "io_manager"}
    s3 = resources["s3"]
    assert type(s3) is S3Resource
    # one S3Resource, handed to both as a ResourceDependency (not copied endpoint/credential fields)
    assert resources["storage"].s3_resource is s3 and resources["io_manager"].s3_resource is s3
    # secrets are EnvVar references (resolved at run time), never values in the UI-visible config
    assert isinstance(s3.aws_secret_access_key, dg.EnvVar) and isinstance(s3.endpoint_url, dg.EnvVar)
    config = json.dumps({k: r.model_dump() if hasattr(r, "model_dump") else str(r) for k, r in resources.items()}, default=str)
    assert s3_env.secret_access_key not in config and s3_env.access_key_id not in config

    @dg.asset
    def env_asset(storage: S3StorageResource) -> dict:
        storage.get_store().write_bytes("landing/x.txt", b"raw")
        return {"via": "env"}

    dg.materialize([env_asset], resources=resources)
    keys = sorted(o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == ["prod/assets/env_asset.json", "prod/landing/x.txt"]
    assert resources["storage"].allowed() == [f"s3://{s3_bucket}/prod/"]
    monkeypatch.setenv("SPATIAL_ASSETS_ALLOWED_LOCATIONS", f"s3://{s3_bucket}/prod/, s3://shared-refs/atlas")
    assert build_resources("s3")["storage"].allowed() == [f"s3://{s3_bucket}/prod/", "s3://shared-refs/atlas"]
    monkeypatch.setenv("SPATIAL_ASSETS_ALLOWED_LOCATIONS", "relative/dir")
    with pytest.raises(StorageConfigError, match="SPATIAL_ASSETS_ALLOWED_LOCATIONS.*absolute"):
        build_resources("s3")
    monkeypatch.delenv("SPATIAL_ASSETS_ALLOWED_LOCATIONS")
    monkeypatch.delenv("SPATIAL_ASSETS_BUCKET")
    with pytest.raises(StorageConfigError, match="SPATIAL_ASSETS_BUCKET"):
        build_resources("s3")
    with pytest.raises(StorageConfigError, match="nowhere"):
        build_resources("nowhere")


def test_build_resources_local(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPATIAL_ASSETS_HOME", str(tmp_path / "home"))

    @dg.asset
    def local_asset() -> dict:
        return {"x": 1}

    resources = build_resources("local")
    assert set(resources) == {"storage", "io_manager"} and isinstance(resources["io_manager"], LocalAssetIOManager)
    dg.materialize([local_asset], resources=resources)
    assert json.loads((tmp_path / "home" / "storage" / "assets" / "local_asset.json").read_text()) == {"x": 1}


def test_local_s3_resources_never_start_a_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from spatial_assets.storage import local_s3
    from spatial_assets.storage.seaweed import STATE_FILE, recorded_pid

    home = tmp_path / "home"
    monkeypatch.setenv("SPATIAL_ASSETS_HOME", str(home))
    monkeypatch.setenv("SPATIAL_ASSETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPATIAL_ASSETS_DEPLOYMENT", raising=False)
    monkeypatch.delenv("SPATIAL_ASSETS_BUCKET", raising=False)

    @dg.asset
    def lazy_asset() -> dict:
        return {"x": 1}

    resources = build_resources()  # default deployment: local_s3
    assert isinstance(resources["s3"], LocalS3Resource) and isinstance(resources["io_manager"], S3AssetIOManager)
    assert set(resources["s3"].model_dump(exclude_none=True)) <= {"state_dir", "max_attempts", "use_ssl", "use_unsigned_session"}
    with pytest.raises(dg.DagsterResourceFunctionError) as failed:  # the run fails at resource initialisation
        dg.materialize([lazy_asset], resources=resources)
    assert isinstance(failed.value.__cause__, LocalS3NotRunningError)
    assert re.search(r"not running.*make ui.*python -m spatial_assets.storage.local_s3 start", str(failed.value.__cause__))
    assert not (home / "s3" / STATE_FILE).exists() and recorded_pid(home / "s3") is None  # nothing was started
    assert local_s3.main(["status"]) == 1

    settings = StorageSettings.from_env()
    started = local_s3.start(settings)  # explicitly, as `make ui` / `make demo` do
    try:
        assert started.started and local_s3.start(settings).started is False  # a second start reuses it
        assert local_s3.main(["status"]) == 0
        dg.materialize([lazy_asset], resources=build_resources())
        store = resources["storage"].get_store()
        assert json.loads(store.read_bytes("assets/lazy_asset.json")) == {"x": 1}
        assert store.uri("assets/lazy_asset.json") == "s3://spatial-assets/assets/lazy_asset.json"
    finally:
        assert local_s3.stop(settings)
    assert local_s3.status(settings) is None
    with pytest.raises(dg.DagsterResourceFunctionError) as failed:  # stopped again: the clear error, not a hang
        dg.materialize([lazy_asset], resources=build_resources())
    assert isinstance(failed.value.__cause__, LocalS3NotRunningError)
