"""Where storage is, from the environment alone (no Dagster): the one place deployment settings are read.

``SPATIAL_ASSETS_DEPLOYMENT`` =

* ``local_s3`` (default): the bundled SeaweedFS whose state lives in ``$SPATIAL_ASSETS_HOME/s3``
  (endpoint in ``server.json``, generated credentials beside it). Nothing here starts it: ``make
  demo`` / ``make ui`` / ``python -m spatial_assets.storage.local_s3 start`` do, and using the
  deployment while it is stopped raises :class:`LocalS3NotRunningError` saying so.
* ``s3``: any S3 — ``SPATIAL_ASSETS_BUCKET`` (required), ``SPATIAL_ASSETS_PREFIX``, the endpoint
  and credentials of :data:`spatial_assets.storage.objectstore.S3_ENV` (omit them for boto3's own
  chain: profile, instance role, ...).
* ``local``: files under ``$SPATIAL_ASSETS_HOME/storage``.

``SPATIAL_ASSETS_ALLOWED_LOCATIONS`` (comma-separated ``s3://bucket/prefix/`` or absolute
directories) lists where manifest entries may point; default: the deployment's own location.
``SPATIAL_ASSETS_CACHE``: the S3 download cache (default ``$SPATIAL_ASSETS_HOME/cache``).

The Dagster resources (:func:`spatial_assets.defs.deployment.build_resources`) and the CLI
(:func:`store_from_env`) both resolve through :meth:`StorageSettings.from_env`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from spatial_assets.storage.locations import check_allowed_uri, normalize_location
from spatial_assets.storage.objectstore import S3Settings, default_cache_dir
from spatial_assets.storage.stores import ASSETS_PREFIX, LocalStore, ObjectStore, S3Store  # noqa: F401  (ASSETS_PREFIX re-exported)

DEPLOYMENT_ENV = "SPATIAL_ASSETS_DEPLOYMENT"
ALLOWED_LOCATIONS_ENV = "SPATIAL_ASSETS_ALLOWED_LOCATIONS"
DEPLOYMENTS = ("local_s3", "s3", "local")
DEFAULT_BUCKET = "spatial-assets"
START_HINT = "start it with `make ui` (or `python -m spatial_assets.storage.local_s3 start`)"


class StorageConfigError(ValueError):
    """A storage/deployment setting that cannot work (names the setting)."""


class LocalS3NotRunningError(StorageConfigError):
    """The bundled S3 server of a ``local_s3`` deployment is not running (resources never start it)."""


def spatial_assets_home() -> Path:
    return Path(os.environ.get("SPATIAL_ASSETS_HOME") or Path.cwd() / ".local").resolve()


def _check_kind(kind: str) -> None:
    if kind not in DEPLOYMENTS:
        raise StorageConfigError(f"{DEPLOYMENT_ENV}={kind!r} is not one of {list(DEPLOYMENTS)}")


def join_prefix(prefix: str, sub: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{sub}" if prefix else sub


@dataclass(frozen=True)
class StorageSettings:
    """One deployment's storage: which kind, where, and which other locations it may read."""

    deployment: str
    bucket: str = ""  # S3 kinds
    prefix: str = ""  # S3 kinds: everything lives under s3://bucket/prefix/
    root: Path | None = None  # local: the directory
    state_dir: Path | None = None  # local_s3: the SeaweedFS state dir
    cache_dir: Path | None = None  # S3 download cache
    allowed_locations: tuple[str, ...] = ()  # explicit list; empty → the deployment's own location

    @classmethod
    def from_env(cls, deployment: str | None = None) -> StorageSettings:
        deployment = deployment or os.environ.get(DEPLOYMENT_ENV) or "local_s3"
        _check_kind(deployment)
        home = spatial_assets_home()
        allowed = tuple(a.strip() for a in os.environ.get(ALLOWED_LOCATIONS_ENV, "").split(",") if a.strip())
        for a in allowed:
            try:
                normalize_location(a)
            except ValueError as exc:
                raise StorageConfigError(f"{ALLOWED_LOCATIONS_ENV}: {exc}") from exc
        if deployment == "local":
            return cls("local", root=home / "storage", allowed_locations=allowed)
        bucket = os.environ.get("SPATIAL_ASSETS_BUCKET") or (DEFAULT_BUCKET if deployment == "local_s3" else "")
        if not bucket:
            raise StorageConfigError("deployment 's3' needs env SPATIAL_ASSETS_BUCKET (the bucket to store everything in)")
        return cls(
            deployment,
            bucket=bucket,
            prefix=os.environ.get("SPATIAL_ASSETS_PREFIX", "").strip("/"),
            state_dir=home / "s3" if deployment == "local_s3" else None,
            cache_dir=default_cache_dir(),
            allowed_locations=allowed,
        )

    @property
    def location(self) -> str:
        """The deployment's own root: ``s3://bucket/prefix/`` or the local directory."""
        if self.deployment == "local":
            return str(self.root)
        return normalize_location(f"s3://{self.bucket}/{self.prefix}")

    def allowed(self) -> list[str]:
        return list(self.allowed_locations) or [self.location]

    def check_allowed_uri(self, uri: str) -> str:
        return check_allowed_uri(uri, self.allowed())

    def s3_settings(self) -> S3Settings | None:
        """How to reach S3 (None for ``local``); ``local_s3`` raises if its server is not running."""
        if self.deployment == "local":
            return None
        if self.deployment == "local_s3":
            assert self.state_dir is not None
            return local_s3_settings(self.state_dir)
        return S3Settings.from_env()

    def store(self) -> ObjectStore:
        """The deployment's root store (manifests, landing, assets)."""
        if self.deployment == "local":
            assert self.root is not None
            return LocalStore(self.root)
        return S3Store(self.bucket, self.prefix, self.s3_settings(), cache_dir=self.cache_dir)


_LOCAL_S3: dict[Path, tuple[int, S3Settings]] = {}


def local_s3_settings(state_dir: Path) -> S3Settings:
    """Endpoint + credentials of the bundled server recorded in ``state_dir``; never starts one.

    Checked once per server process (its pid, recorded in ``server.json``): every Dagster run builds
    its resources again, and a signed round trip per run would be wasted.
    """
    from spatial_assets.storage.seaweed import recorded_pid, running_settings

    state_dir = Path(state_dir).resolve()
    pid = recorded_pid(state_dir)
    cached = _LOCAL_S3.get(state_dir)
    if pid is not None and cached is not None and cached[0] == pid:
        return cached[1]
    settings = running_settings(state_dir) if pid is not None else None
    if settings is None:
        raise LocalS3NotRunningError(f"the local S3 server (SeaweedFS, state dir {state_dir}) is not running: {START_HINT}")
    _LOCAL_S3[state_dir] = (pid, settings)  # type: ignore[assignment]
    return settings


def store_from_env() -> tuple[ObjectStore, S3Settings | None]:
    """The deployment's root store (manifests, landing, assets) and its S3 settings (None for ``local``)."""
    settings = StorageSettings.from_env()
    return settings.store(), settings.s3_settings()
