"""Every instance config this repo ships loads with ``dagster instance info`` against a real Postgres.

Configs: the local ``dagster.yaml`` (sqlite), ``deploy/dagster.postgres.yaml``, ``deploy/dagster.ecs.yaml``
and the instance the Helm chart generates from ``deploy/helm/values.yaml``. Each runs the real CLI in
a subprocess with a throwaway ``DAGSTER_HOME``, the way an operator would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance

from spatial_assets_tests.deploy.helm_render import render_instance
from spatial_assets_tests.deploy.postgres import PostgresServer

REPO = Path(__file__).resolve().parents[2]
DAGSTER = Path(sys.executable).parent / "dagster"
POLICY_BLOCKS = ("concurrency", "run_monitoring", "run_retries")


def _write_kubeconfig(path: Path) -> Path:
    """A kubeconfig for a cluster that does not exist: the launcher loads it, nothing dials it."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "offline",
        "clusters": [{"name": "offline", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "offline", "user": {"token": "not-a-token"}}],
        "contexts": [{"name": "offline", "context": {"cluster": "offline", "user": "offline", "namespace": "spatial-assets"}}],
    }))
    return path


def helm_instance(server: PostgresServer, db: str, tmp: Path) -> dict:
    """The chart's instance for our values, with what `helm template --set` would change to run here."""
    values = yaml.safe_load((REPO / "deploy/helm/values.yaml").read_text())
    values["postgresql"].update(postgresqlHost=server.host, postgresqlUsername=server.user, postgresqlDatabase=db)
    values["postgresql"]["service"]["port"] = server.port
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    k8s.update(loadInclusterConfig=False, kubeconfigFile=str(_write_kubeconfig(tmp / "kubeconfig")))
    return render_instance(values)


def _cli(home: Path, env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "AWS_", "SPATIAL_ASSETS_"))}
    full_env.update(env, DAGSTER_HOME=str(home), PYTHONPATH=str(REPO))
    return subprocess.run([str(DAGSTER), *args], cwd=home, env=full_env, capture_output=True, text=True, timeout=timeout)


def _home(tmp: Path, name: str, config: dict | str) -> Path:
    home = tmp / name
    home.mkdir()
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    (home / "dagster.yaml").write_text(text)
    return home


def _deploy_env(server: PostgresServer, db: str) -> dict[str, str]:
    return {**server.env(db), "AWS_DEFAULT_REGION": "eu-west-1", "SPATIAL_ASSETS_BUCKET": "spatial-assets-logs"}


def _info_sections(stdout: str) -> tuple[dict, dict]:
    """(instance configuration, storage schema state) from `dagster instance info` output."""
    config = stdout.split("Instance configuration:\n-----------------------\n", 1)[1]
    config, schema = config.split("\nStorage schema state:\n---------------------\n", 1)
    return yaml.safe_load(config), yaml.safe_load(schema)["schema"]


def _cls(entry) -> str:
    return entry if isinstance(entry, str) else entry["class"]


@pytest.mark.parametrize(
    "name, storage, launcher, compute_logs",
    [
        ("local", "SqliteRunStorage", "DefaultRunLauncher", None),
        ("postgres", "PostgresRunStorage", "DefaultRunLauncher", None),
        ("ecs", "PostgresRunStorage", "EcsRunLauncher", "S3ComputeLogManager"),
        ("helm", "PostgresRunStorage", "K8sRunLauncher", "S3ComputeLogManager"),
    ],
)
def test_instance_info_loads_every_shipped_config(
    name: str, storage: str, launcher: str, compute_logs: str | None,
    postgres_server: PostgresServer, pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = {"local": "dagster.yaml", "postgres": "deploy/dagster.postgres.yaml", "ecs": "deploy/dagster.ecs.yaml"}
    config = helm_instance(postgres_server, pg_database, tmp_path) if name == "helm" else (REPO / files[name]).read_text()
    home = _home(tmp_path, name, config)
    result = _cli(home, _deploy_env(postgres_server, pg_database), "instance", "info")
    assert result.returncode == 0, result.stderr[-3000:]
    info, schema = _info_sections(result.stdout)
    assert _cls(info["run_storage"]) == storage and _cls(info["event_log_storage"]) == storage.replace("Run", "EventLog")
    assert _cls(info["run_launcher"]) == launcher  # instantiated: the ECS/K8s launchers' clients were built
    assert info["run_monitoring"]["enabled"] is True and info["run_monitoring"]["max_resume_run_attempts"] == 0
    assert info["run_retries"] == {"enabled": True, "max_retries": 1}
    assert info["concurrency"]["pools"]["default_limit"] == 1
    assert {s: v["current"] == v["latest"] for s, v in schema.items()} == dict.fromkeys(schema, True)
    # what `info` leaves lazy: the run coordinator and the compute-log manager, built in-process
    for k, v in _deploy_env(postgres_server, pg_database).items():
        monkeypatch.setenv(k, v)
    with DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert type(instance.compute_log_manager).__name__ == (compute_logs or "LocalComputeLogManager")
        assert instance.event_log_storage.supports_global_concurrency_limits  # pools work on this storage


def test_migrate_runs_twice_and_the_schema_is_at_head(
    postgres_server: PostgresServer, pg_env: dict[str, str], tmp_path: Path
) -> None:
    home = _home(tmp_path, "pg", (REPO / "deploy/dagster.postgres.yaml").read_text())
    env = _deploy_env(postgres_server, pg_env["DAGSTER_PG_DB"])
    for attempt in (1, 2):
        result = _cli(home, env, "instance", "migrate")
        assert result.returncode == 0, f"migrate #{attempt}: {result.stderr[-3000:]}"
    with DagsterInstance.from_config(str(home)) as instance:
        for storage in (instance.run_storage, instance.event_log_storage, instance.schedule_storage):
            current, head = storage.alembic_version()
            assert current == head, (type(storage).__name__, current, head)
    pg_database = pg_env["DAGSTER_PG_DB"]
    # the tables are really in this database (not a sqlite fallback)
    conn = postgres_server.connect(pg_database)
    try:
        with conn.cursor() as cur:
            cur.execute("select count(*) from runs")
            assert cur.fetchone() == (0,)
            cur.execute("select count(*) from information_schema.tables where table_name = 'concurrency_slots'")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()


def test_postgres_port_and_driver_come_from_config_not_defaults(
    postgres_server: PostgresServer, pg_env: dict[str, str], tmp_path: Path
) -> None:
    db = yaml.safe_load((REPO / "deploy/dagster.postgres.yaml").read_text())["storage"]["postgres"]["postgres_db"]
    assert db["port"] == {"env": "DAGSTER_PG_PORT"} and db["scheme"] == "postgresql+psycopg2"
    assert postgres_server.port != 5432  # so connecting at all proves the port is read from the environment
    home = _home(tmp_path, "pg", (REPO / "deploy/dagster.postgres.yaml").read_text())
    with DagsterInstance.from_config(str(home)) as instance:
        assert instance.run_storage._engine.url.drivername == "postgresql+psycopg2"
        assert instance.run_storage._engine.url.port == postgres_server.port
        assert instance.get_runs() == []


def test_policy_is_the_same_on_every_deployment(postgres_server: PostgresServer, tmp_path: Path) -> None:
    postgres = yaml.safe_load((REPO / "deploy/dagster.postgres.yaml").read_text())
    ecs = yaml.safe_load((REPO / "deploy/dagster.ecs.yaml").read_text())
    helm = helm_instance(postgres_server, "dagster", tmp_path)
    local = yaml.safe_load((REPO / "dagster.yaml").read_text())
    for block in (*POLICY_BLOCKS, "storage", "run_queue"):
        assert ecs[block] == postgres[block], block
    assert helm["concurrency"] == postgres["concurrency"]
    assert helm["run_retries"] == postgres["run_retries"]
    assert helm["run_monitoring"] == postgres["run_monitoring"]
    for inst in (postgres, local):
        assert inst["run_monitoring"]["enabled"] and inst["run_monitoring"]["max_resume_run_attempts"] == 0
        assert inst["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
        assert inst["run_retries"] == {"enabled": True, "max_retries": 1}
        assert inst["concurrency"]["pools"]["default_limit"] == 1  # the heavy pool
        assert any(t["key"] == "dagster/backfill" for t in inst["concurrency"]["runs"]["tag_concurrency_limits"])
    assert not (REPO / "deploy/dagster.k8s.yaml").exists()  # the chart generates the K8s instance
