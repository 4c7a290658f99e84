"""The resource set of each deployment (``SPATIAL_ASSETS_DEPLOYMENT``): storage, IO manager."""

import os
from typing import Any, Optional

import dagster as dg

from spatial_assets.defs.io_managers import LocalObjectStoreIOManager, S3ObjectStoreIOManager
from spatial_assets.defs.resources import StorageResource
from spatial_assets.storage.deployment import DEFAULT_BUCKET, DEPLOYMENT_ENV, DEPLOYMENTS, StorageConfigError, spatial_assets_home
from spatial_assets.storage.stores import ASSETS_PREFIX


def _env_or_none(name: str) -> Any:
    """A Dagster EnvVar when set (resolved at run time, hidden in the UI), else None (boto3's chain)."""
    return dg.EnvVar(name) if os.environ.get(name) else None


def build_resources(deployment: Optional[str] = None) -> dict[str, Any]:
    """The resource dict for ``Definitions``: ``storage`` (StorageResource) and ``io_manager``.

    Cheap: nothing is started or contacted here (``local_s3`` starts SeaweedFS on first use).
    """
    deployment = deployment or os.environ.get(DEPLOYMENT_ENV) or "local_s3"
    if deployment not in DEPLOYMENTS:
        raise StorageConfigError(f"{DEPLOYMENT_ENV}={deployment!r} is not one of {list(DEPLOYMENTS)}")
    home = spatial_assets_home()
    if deployment == "local":
        root = str(home / "storage")
        return {
            "storage": StorageResource(kind="local", root=root),
            "io_manager": LocalObjectStoreIOManager(root=root, prefix=ASSETS_PREFIX),
        }
    if deployment == "local_s3":
        bucket = os.environ.get("SPATIAL_ASSETS_BUCKET") or DEFAULT_BUCKET
        prefix = os.environ.get("SPATIAL_ASSETS_PREFIX", "")
        state = str(home / "s3")
        storage = StorageResource(kind="local_s3", bucket=bucket, prefix=prefix, seaweed_state_dir=state)
        io = S3ObjectStoreIOManager(
            kind="local_s3", bucket=bucket, prefix=_join(prefix, ASSETS_PREFIX), seaweed_state_dir=state
        )
        return {"storage": storage, "io_manager": io}
    bucket = os.environ.get("SPATIAL_ASSETS_BUCKET", "")
    if not bucket:
        raise StorageConfigError("deployment 's3' needs env SPATIAL_ASSETS_BUCKET (the bucket to store everything in)")
    prefix = os.environ.get("SPATIAL_ASSETS_PREFIX", "")
    endpoint_env = "SPATIAL_ASSETS_S3_ENDPOINT" if os.environ.get("SPATIAL_ASSETS_S3_ENDPOINT") else "AWS_ENDPOINT_URL"
    common = dict(
        endpoint_url=_env_or_none(endpoint_env),
        aws_access_key_id=_env_or_none("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=_env_or_none("AWS_SECRET_ACCESS_KEY"),
        region_name=_env_or_none("AWS_REGION") or _env_or_none("AWS_DEFAULT_REGION"),
    )
    common = {k: v for k, v in common.items() if v is not None}
    return {
        "storage": StorageResource(kind="s3", bucket=bucket, prefix=prefix, **common),
        "io_manager": S3ObjectStoreIOManager(kind="s3", bucket=bucket, prefix=_join(prefix, ASSETS_PREFIX), **common),
    }


def _join(prefix: str, sub: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{sub}" if prefix else sub
