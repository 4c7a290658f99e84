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


# ------------------------------------------------------------------------------------------------
# Bundled real data (data/README.md), for every test package: session-scoped paths, and session-
# scoped loaders that read each file once and return a NEW copy on every call, so no test can
# change the data another test sees (and each test still runs alone).

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
POA_REFERENCE_FILE = "mouse_POA_scRNA_ref_Moffitt2018.h5ad"
MERFISH_FILE = "mouse_POA_MERFISH_Moffitt2018.h5ad"
STARMAP_FILE = "mouse_mPFC_STARmap_Wang2018.h5ad"
PBMC_FILE = "human_PBMC3k_400genes_seurat_labels.h5ad"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The repository's ``data/`` folder."""
    return DATA_DIR


@pytest.fixture(scope="session")
def poa_reference_path() -> Path:
    """Moffitt 2018 POA scRNA-seq reference, 1,308 cells × 134 genes, raw counts, ``obs['cell_type']``."""
    return DATA_DIR / POA_REFERENCE_FILE


@pytest.fixture(scope="session")
def merfish_path() -> Path:
    """Moffitt 2018 POA MERFISH, 11,162 cells × 161 features (5 Blank), linear per-volume values."""
    return DATA_DIR / MERFISH_FILE


@pytest.fixture(scope="session")
def starmap_path() -> Path:
    """Wang 2018 STARmap mPFC, 3,190 cells × 166 genes, 3 slices, ``obs['layer']`` ground truth."""
    return DATA_DIR / STARMAP_FILE


@pytest.fixture(scope="session")
def pbmc_path() -> Path:
    """10x PBMC 3k, 2,700 cells × 400 genes, raw counts, ``obs['seurat_annotations']``."""
    return DATA_DIR / PBMC_FILE


class _Loader:
    """Reads ``path`` on the first call; every call returns a fresh in-memory copy."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cached = None

    def __call__(self):  # -> anndata.AnnData
        if self._cached is None:
            import anndata as ad

            self._cached = ad.read_h5ad(self.path)
        return self._cached.copy()


@pytest.fixture(scope="session")
def load_poa_reference(poa_reference_path: Path) -> _Loader:
    """``load_poa_reference()`` → a fresh AnnData of the POA reference."""
    return _Loader(poa_reference_path)


@pytest.fixture(scope="session")
def load_merfish(merfish_path: Path) -> _Loader:
    """``load_merfish()`` → a fresh AnnData of the POA MERFISH sample."""
    return _Loader(merfish_path)


@pytest.fixture(scope="session")
def load_starmap(starmap_path: Path) -> _Loader:
    """``load_starmap()`` → a fresh AnnData of the STARmap mPFC slices."""
    return _Loader(starmap_path)


@pytest.fixture(scope="session")
def load_pbmc(pbmc_path: Path) -> _Loader:
    """``load_pbmc()`` → a fresh AnnData of PBMC 3k (400 genes)."""
    return _Loader(pbmc_path)
