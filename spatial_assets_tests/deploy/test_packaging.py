"""The image and the make set-up agree with the pinned environment (static checks; no docker here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from spatial_assets_tests.deploy import postgres

REPO = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_dockerfile_installs_the_pinned_environment_and_serves_the_code_location() -> None:
    docker = (REPO / "Dockerfile").read_text()
    pins = _pins()
    assert f'"torch=={pins["torch"]}"' in docker and "download.pytorch.org/whl/cpu" in docker  # torch CPU, first
    assert docker.index("torch==") < docker.index('-c constraints.txt ".[novae,rctd,prod]"')
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"novae", "rctd", "prod"} <= set(extras)
    for req in extras["prod"]:
        name = re.split(r"[=<>\[]", req)[0].lower()
        assert name in pins, f"{name} (extra 'prod') is not pinned in constraints.txt"
    values = yaml.safe_load((REPO / "deploy/helm/values.yaml").read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "spatial_assets.definitions"]
    assert '"-m", "spatial_assets.definitions"' in docker and str(deployment["port"]) in docker


def test_make_test_installs_postgres_first() -> None:
    make = (REPO / "Makefile").read_text()
    test_target = make.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "deploy/ensure_postgres.sh" in test_target.splitlines()[1]  # before pytest runs
    script = (REPO / "deploy/ensure_postgres.sh").read_text()
    assert "apt-get install -y" in script and "create_main_cluster = false" in script


def test_missing_server_binaries_give_an_actionable_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PG_BINDIR", raising=False)
    monkeypatch.setattr(postgres.Path, "glob", lambda self, pattern: iter(()))
    monkeypatch.setattr(postgres.shutil, "which", lambda name: None)
    with pytest.raises(postgres.PostgresUnavailable, match=r"apt-get install -y postgresql"):
        postgres.find_bindir()
    monkeypatch.setattr(postgres.os, "geteuid", lambda: 0)
    monkeypatch.setattr(postgres.pwd, "getpwnam", lambda name: (_ for _ in ()).throw(KeyError(name)))
    with pytest.raises(postgres.PostgresUnavailable, match="no 'postgres' system user"):
        postgres._run_as()
