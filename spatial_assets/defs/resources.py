"""S3 access and the storage resource assets, checks and sensors use.

S3 is reached through ONE ``dagster_aws.s3.S3Resource`` (resource key ``s3``), passed to the
``storage`` resource and to the IO manager as a ``ResourceDependency`` — the way dagster-aws's own
S3 IO managers take it — so endpoint and credentials are configured once:

* deployment ``s3``: a plain ``S3Resource`` whose endpoint/credentials/region are ``dg.EnvVar``
  references (resolved at run time, shown in the UI by variable name only) or unset (boto3's chain);
* deployment ``local_s3``: :class:`LocalS3Resource`, an ``S3Resource`` that reads the bundled
  SeaweedFS's endpoint and generated credentials from its state dir when a client is made (never
  in config, so never in the UI). It does not start the server; a stopped server is a clear error.

``storage`` gives asset code an :class:`~spatial_assets.storage.stores.ObjectStore` (manifests,
landing objects) and the allow-list check for locations a manifest points at.

Run start cleans what killed writers left (:func:`clean_staging_at_run_start`): the storage
resource and the IO managers call the storage janitor when a run initializes them — once per run
and store in each process, since every step process (or pod) has its own download cache and temp
dir — so a SIGKILLed upload's multipart parts and ``.part`` files do not outlive the next run.

NB: no ``from __future__ import annotations`` here; it breaks Dagster's config classes.
"""

import threading
from pathlib import Path
from typing import Any, Callable, Optional

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field, PrivateAttr

from spatial_assets.storage.deployment import local_s3_settings
from spatial_assets.storage.janitor import DEFAULT_OLDER_THAN_S, JanitorReport, clean_stale_staging
from spatial_assets.storage.locations import check_allowed_uri, normalize_location
from spatial_assets.storage.objectstore import TRANSFER_CONCURRENCY, S3Settings, with_content_types
from spatial_assets.storage.stores import LocalStore, ObjectStore, S3Store

_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()
_JANITOR_DONE: set[tuple[str, str]] = set()  # (run id, store location) cleaned in this process
_JANITOR_LOCK = threading.Lock()

JANITOR_DESCRIPTION = (
    "at run start, remove staging (.part files, stage dirs, incomplete multipart uploads) older than this many "
    "seconds, left by killed writers; longer than the longest legitimate write (a concurrent run's is younger)"
)


def clean_staging_at_run_start(context: Any, store: ObjectStore, older_than_s: float) -> Optional[JanitorReport]:
    """Run the storage janitor on ``store`` once per run in this process; None outside a run.

    Called from resource initialization, which Dagster does for every run (and every step
    process of a multiprocess run) but also for sensor and schedule evaluations: those are
    skipped (``context.dagster_run`` is None). A janitor error is logged, never fatal — cleaning
    staging must not stop the run it precedes.
    """
    run = getattr(context, "run", None)
    if run is None:
        return None
    where = str(store.root) if isinstance(store, LocalStore) else f"s3://{store.bucket}/{store.prefix}"
    marker = (run.run_id, where)
    with _JANITOR_LOCK:
        if marker in _JANITOR_DONE:
            return None
        _JANITOR_DONE.add(marker)
    log = getattr(context, "log", None)
    try:
        report = clean_stale_staging(store, older_than_s)
    except Exception as exc:  # e.g. no s3:ListBucketMultipartUploads permission
        if log is not None:
            log.warning(f"storage janitor could not clean {where}: {exc!r}")
        return None
    if report and log is not None:
        log.warning(f"storage janitor at run start: {report.summary()} ({where})")
    return report


def _value(setting: Any) -> Any:
    """An ``EnvVar`` field is resolved by Dagster inside a run; outside one (demo, scripts) resolve it here."""
    return setting.get_value() if isinstance(setting, dg.EnvVar) else setting


class LocalS3Resource(S3Resource):
    """dagster-aws's ``S3Resource`` for the bundled SeaweedFS of a ``local_s3`` deployment.

    Endpoint and credentials are read from ``state_dir`` (``server.json`` + the generated
    credentials file) each time a client is made; the resource never starts the server.
    """

    state_dir: str = Field(description="SeaweedFS state dir ($SPATIAL_ASSETS_HOME/s3): server.json and the generated credentials")

    def s3_settings(self) -> S3Settings:
        return local_s3_settings(Path(self.state_dir))

    def get_client(self) -> Any:
        return _shared_client(("local_s3", self.s3_settings(), self.max_attempts), lambda: self._make_client())

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        s = self.s3_settings()
        return boto3.client(
            "s3",
            endpoint_url=s.endpoint_url,
            aws_access_key_id=s.access_key_id,
            aws_secret_access_key=s.secret_access_key,
            region_name=s.region_name,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": self.max_attempts, "mode": "standard"},
                max_pool_connections=TRANSFER_CONCURRENCY + 2,
                # loopback to our own server: the CRC32 trailers only cost CPU (TCP checksums the bytes)
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )


def s3_settings_of(resource: S3Resource) -> S3Settings:
    """The resolved connection of an S3Resource (for Dagster-free code and fsspec options)."""
    if isinstance(resource, LocalS3Resource):
        return resource.s3_settings()
    return S3Settings(
        endpoint_url=_value(resource.endpoint_url),
        access_key_id=_value(resource.aws_access_key_id),
        secret_access_key=_value(resource.aws_secret_access_key),
        session_token=_value(resource.aws_session_token),
        region_name=_value(resource.region_name),
    )


def _shared_client(key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """One boto3 client per S3 configuration in this process.

    Dagster builds resources again for every run and a boto3 client costs ~0.3 s of CPU to make;
    clients are thread-safe, so runs in one process (tests, the demo) share one.
    """
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = with_content_types(make())
        return client


def s3_client(resource: S3Resource) -> Any:
    """The (shared) boto3 client of ``resource``: its own ``get_client()``, EnvVars resolved outside a run."""
    if isinstance(resource, LocalS3Resource):
        return resource.get_client()
    fields = ("endpoint_url", "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "region_name", "profile_name")
    if any(isinstance(getattr(resource, f), dg.EnvVar) for f in fields):  # outside a run
        resource = resource.model_copy(update={f: _value(getattr(resource, f)) for f in fields})
    key = (type(resource).__name__, resource.max_attempts, resource.use_ssl, resource.verify,
           resource.use_unsigned_session, *(getattr(resource, f) for f in fields))
    return _shared_client(key, resource.get_client)


def client_factory(resource: S3Resource) -> Callable[[], Any]:
    """A zero-argument factory (what :class:`S3Store` takes) for the resource's client."""
    return lambda: s3_client(resource)


class StorageResource(dg.ConfigurableResource):
    """What assets ask for (``storage: StorageResource``): the deployment's root store and its rules.

    Subclasses say where: :class:`LocalStorageResource` (a directory), :class:`S3StorageResource`
    (a bucket/prefix reached through the ``s3`` resource).
    """

    allowed_locations: list[str] = Field(
        default=[],
        description="where manifest entries may point (s3://bucket/prefix/ or absolute directories); empty: this storage's own location",
    )
    janitor_older_than_s: float = Field(default=DEFAULT_OLDER_THAN_S, ge=0, description=JANITOR_DESCRIPTION)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        clean_staging_at_run_start(context, self.get_store(), self.janitor_older_than_s)

    def get_store(self) -> ObjectStore:  # pragma: no cover - abstract
        raise NotImplementedError

    def s3_settings(self) -> Optional[S3Settings]:
        """How to reach S3 (None for local storage), for Dagster-free helpers that take S3Settings."""
        return None

    def location(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def allowed(self) -> list[str]:
        return list(self.allowed_locations) or [self.location()]

    def check_allowed_uri(self, uri: str) -> str:
        """``uri`` if a manifest may point there, else :class:`~spatial_assets.storage.locations.LocationNotAllowedError`."""
        return check_allowed_uri(uri, self.allowed())


class LocalStorageResource(StorageResource):
    """Storage in a local directory (deployment ``local``)."""

    root: str = Field(description="directory holding manifests/, landing/ and assets/")

    _store: Optional[ObjectStore] = PrivateAttr(default=None)

    def get_store(self) -> ObjectStore:
        if self._store is None:
            self._store = LocalStore(self.root)
        return self._store

    def location(self) -> str:
        return normalize_location(str(Path(self.root).resolve()))


class S3StorageResource(StorageResource):
    """Storage under ``s3://bucket/prefix/`` (deployments ``s3`` and ``local_s3``)."""

    s3_resource: dg.ResourceDependency[S3Resource]
    bucket: str = Field(description="bucket holding manifests/, landing/ and assets/")
    prefix: str = Field(default="", description="key prefix inside the bucket")
    cache_dir: str = Field(default="", description="local download cache (default $SPATIAL_ASSETS_HOME/cache)")

    _store: Optional[ObjectStore] = PrivateAttr(default=None)

    def get_store(self) -> ObjectStore:
        if self._store is None:
            self._store = S3Store(self.bucket, self.prefix, client_factory(self.s3_resource), cache_dir=self.cache_dir or None)
        return self._store

    def s3_settings(self) -> Optional[S3Settings]:
        return s3_settings_of(self.s3_resource)

    def location(self) -> str:
        return normalize_location(f"s3://{self.bucket}/{self.prefix}")
