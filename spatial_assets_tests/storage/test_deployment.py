"""Deployment settings from the environment (the one place they are read) and the local S3 lifecycle."""

from __future__ import annotations

from pathlib import Path

import pytest

from spatial_assets.storage.deployment import LocalS3NotRunningError, StorageConfigError, StorageSettings, store_from_env
from spatial_assets.storage.objectstore import S3Settings
from spatial_assets.storage.stores import LocalStore, S3Store


@pytest.fixture()
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in ("SPATIAL_ASSETS_DEPLOYMENT", "SPATIAL_ASSETS_BUCKET", "SPATIAL_ASSETS_PREFIX", "SPATIAL_ASSETS_ALLOWED_LOCATIONS",
                 "SPATIAL_ASSETS_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPATIAL_ASSETS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPATIAL_ASSETS_CACHE", str(tmp_path / "cache"))
    return monkeypatch


def test_three_deployments_from_the_environment(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = (tmp_path / "home").resolve()
    default = StorageSettings.from_env()
    assert (default.deployment, default.bucket, default.state_dir) == ("local_s3", "spatial-assets", home / "s3")
    assert default.location == "s3://spatial-assets/" and default.allowed() == ["s3://spatial-assets/"]
    local = StorageSettings.from_env("local")
    assert local.root == home / "storage" and local.s3_settings() is None and isinstance(local.store(), LocalStore)
    assert local.allowed() == [str(home / "storage")]
    env.setenv("SPATIAL_ASSETS_DEPLOYMENT", "s3")
    with pytest.raises(StorageConfigError, match="SPATIAL_ASSETS_BUCKET"):
        StorageSettings.from_env()
    env.setenv("SPATIAL_ASSETS_BUCKET", "prod-bucket")
    env.setenv("SPATIAL_ASSETS_PREFIX", "/team/")
    env.setenv("AWS_ENDPOINT_URL", "http://fallback:1")
    env.setenv("SPATIAL_ASSETS_S3_ENDPOINT", "http://preferred:2")
    env.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    env.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    s3 = StorageSettings.from_env()
    assert (s3.bucket, s3.prefix, s3.location) == ("prod-bucket", "team", "s3://prod-bucket/team/")
    settings = s3.s3_settings()
    assert (settings.endpoint_url, settings.region_name) == ("http://preferred:2", "eu-west-1")
    assert "very-secret-value" not in repr(settings) and "very-secret-value" not in repr(s3)
    store = s3.store()
    assert isinstance(store, S3Store) and store.uri("a/b.json") == "s3://prod-bucket/team/a/b.json"
    env.setenv("SPATIAL_ASSETS_DEPLOYMENT", "gcs")
    with pytest.raises(StorageConfigError, match="'gcs' is not one of"):
        StorageSettings.from_env()


def test_local_s3_is_never_started_by_the_settings(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(LocalS3NotRunningError, match=r"state dir .*home/s3\) is not running: start it with `make ui`"):
        store_from_env()
    assert not (tmp_path / "home" / "s3").exists()  # nothing created, nothing started


def test_s3_settings_from_env_prefers_project_endpoint(env: pytest.MonkeyPatch) -> None:
    env.setenv("AWS_REGION", "us-west-2")
    env.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert S3Settings.from_env().region_name == "us-west-2"
    env.delenv("AWS_REGION")
    env.delenv("AWS_DEFAULT_REGION")
    assert S3Settings.from_env() == S3Settings(region_name="us-east-1")
    assert S3Settings("http://e", "k", "s", "r").s3fs_options() == {
        "key": "k", "secret": "s", "endpoint_url": "http://e", "client_kwargs": {"region_name": "r"}
    }
