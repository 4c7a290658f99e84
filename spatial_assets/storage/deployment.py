"""Where storage is, from the environment alone (no Dagster): the one place deployment settings are read.

``SPATIAL_ASSETS_DEPLOYMENT`` = ``local_s3`` (the bundled SeaweedFS whose state lives in
``$SPATIAL_ASSETS_HOME/s3``) | ``s3`` (any S3: ``SPATIAL_ASSETS_BUCKET``, ``SPATIAL_ASSETS_PREFIX``,
``SPATIAL_ASSETS_S3_ENDPOINT`` / ``AWS_ENDPOINT_URL``, ``AWS_*``) | ``local`` (files under
``$SPATIAL_ASSETS_HOME/storage``). The Dagster resources and the CLI both resolve through here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from spatial_assets.storage.objectstore import S3Settings
from spatial_assets.storage.stores import LocalStore, ObjectStore, S3Store

DEPLOYMENT_ENV = "SPATIAL_ASSETS_DEPLOYMENT"
DEPLOYMENTS = ("local_s3", "s3", "local")
DEFAULT_BUCKET = "spatial-assets"


class StorageConfigError(ValueError):
    """A storage/deployment setting that cannot work (names the setting)."""


def spatial_assets_home() -> Path:
    return Path(os.environ.get("SPATIAL_ASSETS_HOME") or Path.cwd() / ".local").resolve()


def _check_kind(kind: str) -> None:
    if kind not in DEPLOYMENTS:
        raise StorageConfigError(f"storage kind {kind!r} is not one of {list(DEPLOYMENTS)}")


_LOCAL_S3: dict[Path, tuple[int, S3Settings]] = {}


def _local_s3_settings(state_dir: Path) -> S3Settings:
    """``ensure_running`` once per process and server: later runs only check the recorded pid is alive.

    Every run builds its resources again; a full ensure_running (lock, signed request) each time
    would add a boto3 client and a round trip to every run for nothing.
    """
    from spatial_assets.storage.seaweed import ensure_running, recorded_pid

    state_dir = state_dir.resolve()
    cached = _LOCAL_S3.get(state_dir)
    if cached is not None and recorded_pid(state_dir) == cached[0]:
        return cached[1]
    settings = ensure_running(state_dir)
    pid = recorded_pid(state_dir)
    if pid is not None:
        _LOCAL_S3[state_dir] = (pid, settings)
    return settings


def _make_store(
    kind: str,
    *,
    bucket: str,
    prefix: str,
    root: str,
    settings: Optional[S3Settings],
    cache_dir: Optional[str],
    create_bucket: bool,
    client_factory=None,
) -> ObjectStore:
    _check_kind(kind)
    if kind == "local":
        base = Path(root) if root else spatial_assets_home() / "storage"
        return LocalStore(base / prefix if prefix else base)
    if not bucket:
        raise StorageConfigError(f"storage kind {kind!r} needs a bucket (config 'bucket' or env SPATIAL_ASSETS_BUCKET)")
    assert settings is not None
    if create_bucket:  # our own SeaweedFS: the bucket is ours to create; on real S3 it must exist already
        from spatial_assets.storage.seaweed import ensure_bucket

        ensure_bucket(settings, bucket)
    return S3Store(bucket, prefix, client_factory or settings.client, cache_dir=cache_dir)



def store_from_env() -> tuple[ObjectStore, Optional[S3Settings]]:
    """The deployment's root store (manifests, landing, assets) and its S3 settings (None for ``local``)."""
    deployment = os.environ.get(DEPLOYMENT_ENV) or "local_s3"
    _check_kind(deployment)
    home = spatial_assets_home()
    prefix = os.environ.get("SPATIAL_ASSETS_PREFIX", "")
    if deployment == "local":
        root = str(home / "storage")
        return _make_store("local", bucket="", prefix="", root=root, settings=None, cache_dir=None, create_bucket=False), None
    bucket = os.environ.get("SPATIAL_ASSETS_BUCKET") or (DEFAULT_BUCKET if deployment == "local_s3" else "")
    settings = _local_s3_settings(home / "s3") if deployment == "local_s3" else S3Settings.from_env()
    store = _make_store(
        deployment, bucket=bucket, prefix=prefix, root="", settings=settings, cache_dir=None, create_bucket=deployment == "local_s3"
    )
    return store, settings
