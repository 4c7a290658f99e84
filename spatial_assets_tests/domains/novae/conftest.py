"""Fixtures of the Novae tests: no network, a tiny two-sample tissue, one trained and saved model.

Nothing here imports torch or novae at import time: without the ``novae`` extra the test modules
skip themselves (``pytest.importorskip`` with the install hint) instead of failing to collect.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from spatial_assets_tests.domains.novae.helpers import LEVELS, NETWORK_ATTEMPTS, _engine

os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: nothing in these tests may download


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> object:
    """Non-local connections fail (OSError, as offline) and are recorded; a test that made one fails."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1") and not str(host).startswith("/"):
            NETWORK_ATTEMPTS.append(address)
            raise OSError(f"network disabled in tests: {address!r}")
        return real_connect(self, address)

    NETWORK_ATTEMPTS.clear()
    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield
    assert not NETWORK_ATTEMPTS, f"network access attempted: {NETWORK_ATTEMPTS}"


@pytest.fixture(scope="package")
def samples() -> list:
    from spatial_assets.domains.synthetic import make_synthetic_tissue, split_samples

    tissue = make_synthetic_tissue(600, n_domains=4, n_samples=2, n_genes=50, n_cell_types=6, seed=3)
    return split_samples(tissue)


@pytest.fixture(scope="package")
def trained(samples: list):
    return _engine().fit(samples, levels=LEVELS, n_domains=4, seed=0)


@pytest.fixture(scope="package")
def saved_dir(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("novae") / "model"
    trained.save(d)
    return d
