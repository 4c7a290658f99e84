"""Shared fixtures: one real SeaweedFS S3 server per test session (started here, explicitly: no
resource starts a server), fresh buckets per test.

The server is real (``weed mini`` on 127.0.0.1 with generated credentials), not a mock, so tests
exercise signing, multipart uploads and ETags exactly as production S3 code paths do.
"""

from __future__ import annotations

import os

# 2 shared cores: keep BLAS/torch single-threaded in every test process (before numpy is imported)
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spatial_assets.storage.objectstore import S3Settings
from spatial_assets.storage.seaweed import SeaweedS3, ensure_bucket
from spatial_assets.storage.stores import S3Store


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A running SeaweedS3 for the whole session (≈1.5 s to start); killed at the end.

    SIGKILL rather than SIGTERM at teardown: the data dir is a throwaway tmp dir, a graceful stop
    costs 4-12 s, and a SIGKILL was measured to lose nothing anyway.
    """
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.stop(graceful=False)


@pytest.fixture(scope="session")
def s3_settings(s3_server: SeaweedS3) -> S3Settings:
    """Endpoint + generated credentials of the session server."""
    return s3_server.settings


@pytest.fixture()
def s3_env(s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch) -> S3Settings:
    """Export the server's endpoint/credentials as env vars (for code that uses S3Settings.from_env())."""
    from spatial_assets.storage.seaweed import settings_env

    for k, v in settings_env(s3_settings).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_settings


@pytest.fixture()
def s3_bucket(s3_settings: S3Settings) -> str:
    """A fresh, uniquely named, empty bucket for this test."""
    name = f"t-{uuid.uuid4().hex[:20]}"
    ensure_bucket(s3_settings, name)
    return name


@pytest.fixture()
def s3_cache_dir(tmp_path: Path) -> Path:
    """A per-test download cache, so tests never share (or pollute) ``.local/cache``."""
    d = tmp_path / "s3cache"
    d.mkdir()
    return d


@pytest.fixture()
def s3_store(s3_settings: S3Settings, s3_bucket: str, s3_cache_dir: Path) -> S3Store:
    """An S3Store on the fresh bucket, under a prefix (so prefix handling is always exercised)."""
    return S3Store(s3_bucket, "pfx", s3_settings, cache_dir=s3_cache_dir)


@pytest.fixture()
def s3_resource(s3_settings: S3Settings):
    """dagster-aws's S3Resource pointed at the session server (what the IO managers and storage take)."""
    from dagster_aws.s3 import S3Resource

    return S3Resource(
        endpoint_url=s3_settings.endpoint_url,
        aws_access_key_id=s3_settings.access_key_id,
        aws_secret_access_key=s3_settings.secret_access_key,
        region_name=s3_settings.region_name,
    )
