"""The ECS deployment: ``deploy/dagster.ecs.yaml`` builds its EcsRunLauncher, offline.

AWS is replaced by botocore's own ``Stubber`` on a real ECS client (requests are validated against
the ECS API model, nothing leaves the machine). What is checked: the region variable the launcher
really reads, the run-monitoring health check that marks a killed run task FAILURE, and that the
heavy assets' ``ecs/cpu`` / ``ecs/memory`` tags become the per-step task overrides.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import NoRegionError
from botocore.stub import Stubber
from dagster import DagsterInstance
from dagster._core.launcher import WorkerStatus
from dagster._core.storage.tags import RUN_WORKER_ID_TAG
from dagster._core.test_utils import create_run_for_test

from spatial_assets.defs.execution import HEAVY_STEPS, op_tags_for

REPO = Path(__file__).resolve().parents[2]
TASK_ARN = "arn:aws:ecs:eu-west-1:123456789012:task/spatial/0123456789abcdef"
CLUSTER = "arn:aws:ecs:eu-west-1:123456789012:cluster/spatial"
# Fargate: CPU units → allowed memory (MiB), https://docs.aws.amazon.com/AmazonECS/latest/developerguide/fargate-tasks-services.html
FARGATE_MEMORY = {1024: range(2048, 8193, 1024), 2048: range(4096, 16385, 1024), 4096: range(8192, 30721, 1024)}


@pytest.fixture()
def ecs_home(tmp_path: Path, pg_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "ecs_home"
    home.mkdir()
    shutil.copy(REPO / "deploy/dagster.ecs.yaml", home / "dagster.yaml")
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))  # no region from ~/.aws either
    monkeypatch.setenv("SPATIAL_ASSETS_BUCKET", "spatial-assets-logs")
    return home


def test_aws_region_alone_raises_no_region_error_aws_default_region_works(ecs_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")  # what env.example used to set, alone
    with DagsterInstance.from_config(str(ecs_home)) as instance:
        with pytest.raises(NoRegionError):
            instance.run_launcher  # noqa: B018 - building it is the point
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    with DagsterInstance.from_config(str(ecs_home)) as instance:
        launcher = instance.run_launcher
        assert type(launcher).__name__ == "EcsRunLauncher"
        assert launcher.ecs.meta.region_name == "eu-west-1"
    example = (REPO / "deploy/env.example").read_text()
    assert "\nAWS_DEFAULT_REGION=" in example and "\nAWS_REGION=" in example


def _stubbed_ecs(monkeypatch: pytest.MonkeyPatch) -> tuple[object, Stubber]:
    """A real ECS client with a Stubber, returned by boto3.client('ecs') inside dagster_aws."""
    ecs = boto3.client("ecs", region_name="eu-west-1")
    stubber = Stubber(ecs)
    real_client = boto3.client

    def client(service: str, *args, **kwargs):
        return ecs if service == "ecs" else real_client(service, *args, **kwargs)

    monkeypatch.setattr("dagster_aws.ecs.launcher.boto3.client", client)
    return ecs, stubber


def _task(status: str, exit_code: int | None, reason: str = "") -> dict:
    container = {"name": "run", "lastStatus": status, **({"exitCode": exit_code} if exit_code is not None else {})}
    return {"tasks": [{"taskArn": TASK_ARN, "clusterArn": CLUSTER, "lastStatus": status, "stoppedReason": reason,
                       "stopCode": "EssentialContainerExited" if status == "STOPPED" else "", "containers": [container]}],
            "failures": []}


def test_run_monitoring_health_check_sees_a_killed_run_task(ecs_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    ecs, stubber = _stubbed_ecs(monkeypatch)
    expected = {"tasks": [TASK_ARN], "cluster": CLUSTER}
    stubber.add_response("describe_tasks", _task("RUNNING", None), expected)
    stubber.add_response("describe_tasks", _task("STOPPED", 137, "Essential container in task exited"), expected)
    with stubber, DagsterInstance.from_config(str(ecs_home)) as instance:
        launcher = instance.run_launcher
        assert launcher.ecs is ecs and launcher.supports_check_run_worker_health
        run = create_run_for_test(instance, job_name="__ASSET_JOB",
                                  tags={"ecs/task_arn": TASK_ARN, "ecs/cluster": CLUSTER, RUN_WORKER_ID_TAG: "abc123"})
        assert launcher.check_run_worker_health(run).status == WorkerStatus.RUNNING
        stopped = launcher.check_run_worker_health(run)
        assert stopped.status == WorkerStatus.FAILED  # run monitoring marks the run FAILURE, run retries retry it
        assert "exit code 137" in stopped.msg and TASK_ARN in stopped.msg
    stubber.assert_no_pending_responses()


@pytest.mark.parametrize("asset", sorted(HEAVY_STEPS))
def test_heavy_asset_tags_become_valid_fargate_step_overrides(asset: str) -> None:
    from dagster_aws.ecs.executor import EcsStepHandler

    tags = op_tags_for(asset)
    cpu, memory = int(tags["ecs/cpu"]), int(tags["ecs/memory"])
    assert memory in FARGATE_MEMORY[cpu], f"{asset}: {cpu} CPU units cannot have {memory} MiB on Fargate"
    # the executor's own mapping of step tags to the RunTask overrides (no AWS call involved)
    handler = EcsStepHandler.__new__(EcsStepHandler)
    handler._task_overrides, handler._cpu, handler._memory, handler._ephemeral_storage = {}, None, None, None
    assert handler._get_task_overrides(tags) == {"cpu": str(cpu), "memory": str(memory)}
