"""The resource set of each deployment (``SPATIAL_ASSETS_DEPLOYMENT``): s3, storage, IO manager.

Resolved by :meth:`spatial_assets.storage.deployment.StorageSettings.from_env` — the same settings
the CLI uses. Cheap and side-effect free: nothing is started or contacted here, and no secret is
copied into config (``s3``: ``dg.EnvVar`` references, read at run time; ``local_s3``: read from the
server's state dir when a client is made).
"""

from typing import Any, Optional

import dagster as dg
from dagster_aws.s3 import S3Resource

from spatial_assets.defs.io_managers import LocalAssetIOManager, S3AssetIOManager
from spatial_assets.defs.resources import LocalS3Resource, LocalStorageResource, S3StorageResource
from spatial_assets.storage.deployment import ASSETS_PREFIX, StorageSettings, join_prefix
from spatial_assets.storage.objectstore import env_source

# S3Resource field → S3Settings field (whose environment variables objectstore.S3_ENV lists)
_S3_FIELDS = {
    "endpoint_url": "endpoint_url",
    "aws_access_key_id": "access_key_id",
    "aws_secret_access_key": "secret_access_key",
    "aws_session_token": "session_token",
    "region_name": "region_name",
}


def s3_resource_from_env() -> S3Resource:
    """An S3Resource whose set fields are ``dg.EnvVar`` references to the variables that are set."""
    fields = {}
    for field, setting in _S3_FIELDS.items():
        name = env_source(setting)
        if name:
            fields[field] = dg.EnvVar(name)
    return S3Resource(**fields)


def build_resources(deployment: Optional[str] = None) -> dict[str, Any]:
    """The resource dict for ``Definitions``: ``storage`` and ``io_manager`` (+ ``s3`` for S3 kinds)."""
    settings = StorageSettings.from_env(deployment)
    allowed = list(settings.allowed_locations)
    cache = str(settings.cache_dir) if settings.cache_dir else ""
    if settings.deployment == "local":
        root = str(settings.root)
        return {
            "storage": LocalStorageResource(root=root, allowed_locations=allowed),
            "io_manager": LocalAssetIOManager(base_dir=str(settings.root / ASSETS_PREFIX)),
        }
    if settings.deployment == "local_s3":
        s3: S3Resource = LocalS3Resource(state_dir=str(settings.state_dir))
    else:
        s3 = s3_resource_from_env()
    return {
        "s3": s3,
        "storage": S3StorageResource(
            s3_resource=s3, bucket=settings.bucket, prefix=settings.prefix, cache_dir=cache, allowed_locations=allowed
        ),
        "io_manager": S3AssetIOManager(
            s3_resource=s3, s3_bucket=settings.bucket, s3_prefix=join_prefix(settings.prefix, ASSETS_PREFIX), cache_dir=cache
        ),
    }
