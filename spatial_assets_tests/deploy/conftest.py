"""Fixtures for the production-deployment tests: one real PostgreSQL server per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from spatial_assets_tests.deploy.postgres import PostgresServer, PostgresUnavailable


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on a free loopback port (password auth), stopped at the end of the session.

    Skips — with the reason and the install command — when the machine has no server binaries;
    ``make test`` installs them first when it runs as root.
    """
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL-backed tests skipped: {exc}")
    print(f"\n[postgres] started on 127.0.0.1:{server.port} in {server.startup_seconds:.1f} s (contended machine)")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def pg_database(postgres_server: PostgresServer) -> str:
    """A fresh, empty database for one test."""
    return postgres_server.create_database()


@pytest.fixture()
def pg_env(postgres_server: PostgresServer, pg_database: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The DAGSTER_PG_* variables of a fresh database, exported for this test."""
    env = postgres_server.env(pg_database)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
