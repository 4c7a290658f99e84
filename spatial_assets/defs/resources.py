"""Storage resource and the per-deployment resource set.

One switch, ``SPATIAL_ASSETS_DEPLOYMENT``, decides where every artefact lives; asset code only sees
an :class:`~spatial_assets.stores.ObjectStore`, so the same code runs on the bundled SeaweedFS, on
AWS S3 (or any S3) and on a plain directory by configuration alone:

============  ==============================================================================
``local_s3``  (default) the local SeaweedFS whose state lives in ``$SPATIAL_ASSETS_HOME/s3``;
              started lazily (detached, so it outlives the run) on the first use of the store,
              never at import time of the definitions. Endpoint and credentials come from that
              state dir (the generated credentials file + ``server.json``), not from config, so
              the secrets never appear in the Dagster UI.
``s3``        any S3: ``SPATIAL_ASSETS_BUCKET`` (required), ``SPATIAL_ASSETS_PREFIX``,
              ``SPATIAL_ASSETS_S3_ENDPOINT`` / ``AWS_ENDPOINT_URL`` (omit for AWS),
              ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (omit to use boto3's own chain:
              profile, instance role, ...), ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.
``local``     files under ``$SPATIAL_ASSETS_HOME/storage``.
============  ==============================================================================

NB: no ``from __future__ import annotations`` here; it breaks Dagster's config classes.
"""

import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import dagster as dg
from pydantic import PrivateAttr

from spatial_assets.objectstore import S3Settings
from spatial_assets.stores import ASSETS_PREFIX, LocalStore, ObjectStore, S3Store

DEPLOYMENT_ENV = "SPATIAL_ASSETS_DEPLOYMENT"
DEPLOYMENTS = ("local_s3", "s3", "local")
DEFAULT_BUCKET = "spatial-assets"


class StorageConfigError(ValueError):
    """A storage/deployment setting that cannot work (names the setting)."""


def spatial_assets_home() -> Path:
    return Path(os.environ.get("SPATIAL_ASSETS_HOME") or Path.cwd() / ".local").resolve()


_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _s3_client_factory(settings: S3Settings, max_attempts: int = 5) -> Callable[[], Any]:
    """A client factory built on dagster-aws's S3Resource (so retries/profile handling match Dagster's).

    Clients are cached per settings: Dagster re-creates resources for every run, and building a
    boto3 client costs ~0.3 s of CPU; boto3 clients are thread-safe, so sharing one is fine.
    """
    from dagster_aws.s3 import S3Resource

    cache_key = (settings, max_attempts)

    def make() -> Any:
        with _CLIENTS_LOCK:
            client = _CLIENTS.get(cache_key)
            if client is None:
                client = S3Resource(
                    endpoint_url=settings.endpoint_url,
                    aws_access_key_id=settings.access_key_id,
                    aws_secret_access_key=settings.secret_access_key,
                    region_name=settings.region_name,
                    max_attempts=max_attempts,
                ).get_client()
                _CLIENTS[cache_key] = client
            return client

    return make


_LOCAL_S3: dict[Path, tuple[int, S3Settings]] = {}


def _local_s3_settings(state_dir: Path) -> S3Settings:
    """``ensure_running`` once per process and server: later runs only check the recorded pid is alive.

    Every run builds its resources again; a full ensure_running (lock, signed request) each time
    would add a boto3 client and a round trip to every run for nothing.
    """
    from spatial_assets.seaweed import ensure_running, recorded_pid

    state_dir = state_dir.resolve()
    cached = _LOCAL_S3.get(state_dir)
    if cached is not None and recorded_pid(state_dir) == cached[0]:
        return cached[1]
    settings = ensure_running(state_dir)
    pid = recorded_pid(state_dir)
    if pid is not None:
        _LOCAL_S3[state_dir] = (pid, settings)
    return settings


def _resolve_s3_settings(
    kind: str,
    *,
    seaweed_state_dir: Optional[str],
    endpoint_url: Optional[str],
    aws_access_key_id: Optional[str],
    aws_secret_access_key: Optional[str],
    region_name: Optional[str],
) -> S3Settings:
    """Config first, then environment; ``local_s3`` asks the (lazily started) SeaweedFS server."""
    if kind == "local_s3":
        state_dir = Path(seaweed_state_dir) if seaweed_state_dir else spatial_assets_home() / "s3"
        return _local_s3_settings(state_dir)
    env = S3Settings.from_env()
    return S3Settings(
        endpoint_url=_value(endpoint_url) or env.endpoint_url,
        access_key_id=_value(aws_access_key_id) or env.access_key_id,
        secret_access_key=_value(aws_secret_access_key) or env.secret_access_key,
        region_name=_value(region_name) or env.region_name,
    )


def _value(setting: Any) -> Any:
    """An ``EnvVar`` field is resolved by Dagster at run time; outside a run (CLI, demo) resolve it here."""
    return setting.get_value() if isinstance(setting, dg.EnvVar) else setting


def _check_kind(kind: str) -> None:
    if kind not in DEPLOYMENTS:
        raise StorageConfigError(f"storage kind {kind!r} is not one of {list(DEPLOYMENTS)}")


class StorageResource(dg.ConfigurableResource):
    """Gives assets an :class:`ObjectStore` (``get_store()``) and, for S3 kinds, :class:`S3Settings`.

    kind ``s3``/``local_s3``: objects under ``s3://<bucket>/<prefix>/``; ``local``: under ``root``.
    Unset S3 fields fall back to the environment (see module docstring).
    """

    kind: str = "local_s3"
    bucket: str = DEFAULT_BUCKET
    prefix: str = ""
    root: str = ""  # kind=local: directory (default $SPATIAL_ASSETS_HOME/storage)
    seaweed_state_dir: str = ""  # kind=local_s3: default $SPATIAL_ASSETS_HOME/s3
    endpoint_url: Optional[str] = None
    aws_access_key_id: Optional[str] = None
    aws_secret_access_key: Optional[str] = None
    region_name: Optional[str] = None
    cache_dir: Optional[str] = None  # S3 download cache (default objectstore.default_cache_dir())

    _store: Optional[ObjectStore] = PrivateAttr(default=None)
    _settings: Optional[S3Settings] = PrivateAttr(default=None)

    def s3_settings(self) -> Optional[S3Settings]:
        """How to reach S3 (None for kind ``local``); for ``local_s3`` this starts the server if needed."""
        _check_kind(self.kind)
        if self.kind == "local":
            return None
        if self._settings is None:
            self._settings = _resolve_s3_settings(
                self.kind,
                seaweed_state_dir=self.seaweed_state_dir or None,
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.aws_access_key_id,
                aws_secret_access_key=self.aws_secret_access_key,
                region_name=self.region_name,
            )
        return self._settings

    def get_store(self) -> ObjectStore:
        """The store (created once per resource instance)."""
        if self._store is None:
            self._store = _make_store(
                self.kind,
                bucket=self.bucket,
                prefix=self.prefix,
                root=self.root,
                settings=self.s3_settings(),
                cache_dir=self.cache_dir,
                create_bucket=self.kind == "local_s3",
            )
        return self._store


def _make_store(
    kind: str,
    *,
    bucket: str,
    prefix: str,
    root: str,
    settings: Optional[S3Settings],
    cache_dir: Optional[str],
    create_bucket: bool,
) -> ObjectStore:
    _check_kind(kind)
    if kind == "local":
        base = Path(root) if root else spatial_assets_home() / "storage"
        return LocalStore(base / prefix if prefix else base)
    if not bucket:
        raise StorageConfigError(f"storage kind {kind!r} needs a bucket (config 'bucket' or env SPATIAL_ASSETS_BUCKET)")
    assert settings is not None
    if create_bucket:  # our own SeaweedFS: the bucket is ours to create; on real S3 it must exist already
        from spatial_assets.seaweed import ensure_bucket

        ensure_bucket(settings, bucket)
    return S3Store(bucket, prefix, _s3_client_factory(settings), cache_dir=cache_dir)


def _env_or_none(name: str) -> Any:
    """A Dagster EnvVar when set (resolved at run time, hidden in the UI), else None (boto3's chain)."""
    return dg.EnvVar(name) if os.environ.get(name) else None


def build_resources(deployment: Optional[str] = None) -> dict[str, Any]:
    """The resource dict for ``Definitions``: ``storage`` (StorageResource) and ``io_manager``.

    Cheap: nothing is started or contacted here (``local_s3`` starts SeaweedFS on first use).
    """
    from spatial_assets.defs.io_managers import LocalObjectStoreIOManager, S3ObjectStoreIOManager

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
