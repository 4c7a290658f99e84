"""Storage resource and the per-deployment resource set.

One switch, ``SPATIAL_ASSETS_DEPLOYMENT``, decides where every artefact lives; asset code only sees
an :class:`~spatial_assets.storage.stores.ObjectStore`, so the same code runs on the bundled SeaweedFS, on
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

import threading
from pathlib import Path
from typing import Any, Callable, Optional

import dagster as dg
from pydantic import PrivateAttr

from spatial_assets.storage.objectstore import S3Settings
from spatial_assets.storage.deployment import (
    DEFAULT_BUCKET,
    StorageConfigError,  # noqa: F401  (re-exported: raised by the resources)
    _check_kind,
    _local_s3_settings,
    _make_store,
    spatial_assets_home,
)
from spatial_assets.storage.stores import ObjectStore

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
                client_factory=_s3_client_factory(self.s3_settings()) if self.kind != "local" else None,
            )
        return self._store
