"""The Kubernetes deployment, without a cluster: the Jobs Dagster would create, validated offline.

The K8sRunLauncher is built from the instance the Helm chart generates from ``deploy/helm/values.yaml``
(see ``helm_render``), with the ``kubernetes`` client's ``BatchV1Api`` replaced by a recording fake.
It launches a run of ``cell_type_annotations`` (the code location's image and container context as
the chart's user deployment sets them), and the ``k8s_job_executor``'s step handler launches that
run's heavy step. Both Job manifests are checked against the Kubernetes OpenAPI schema
(``kubernetes-validate``, strict: unknown fields fail too) and for Guaranteed QoS.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from pathlib import Path
from typing import Any

import dagster as dg
import kubernetes
import kubernetes_validate
import pytest
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.context.system import PlanData, PlanOrchestrationContext
from dagster._core.execution.context_creation_job import create_context_free_log_manager
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.init import InitExecutorContext
from dagster._core.executor.step_delegating import StepHandlerContext
from dagster._core.launcher import LaunchRunContext
from dagster._core.test_utils import create_run_for_test
from dagster._grpc.types import ExecuteStepArgs
from dagster_k8s.executor import _K8S_EXECUTOR_CONFIG_SCHEMA, k8s_job_executor

from spatial_assets.defs.execution import HEAVY_STEPS
from spatial_assets_tests.deploy.helm_render import (
    render_instance,
    user_deployment_container_context,
    user_deployment_image,
)

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.32.0"  # the oldest cluster version the chart targets here; schemas ship with kubernetes-validate
ASSET = "cell_type_annotations"
PARTITION = "poa_bregma_0.21"


class RecordingBatchApi:
    """Stands in for ``kubernetes.client.BatchV1Api``: records every Job it is asked to create."""

    created: list[tuple[str, Any]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def create_namespaced_job(self, namespace: str, body: Any, **kwargs: Any) -> Any:
        RecordingBatchApi.created.append((namespace, body))
        return body


def _manifest(job: Any) -> dict:
    return kubernetes.client.ApiClient().sanitize_for_serialization(job)


def _kubeconfig(path: Path) -> str:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "offline",
        "clusters": [{"name": "offline", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "offline", "user": {"token": "x"}}],
        "contexts": [{"name": "offline", "context": {"cluster": "offline", "user": "offline"}}],
    }))
    return str(path)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The run-worker Job and the heavy step's Job, as manifests (one launch, shared by the tests)."""
    tmp = tmp_path_factory.mktemp("k8s")
    values = yaml.safe_load((REPO / "deploy/helm/values.yaml").read_text())
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    k8s.update(loadInclusterConfig=False, kubeconfigFile=_kubeconfig(tmp / "kubeconfig"))  # out of cluster
    run_launcher = render_instance(values)["run_launcher"]
    image = user_deployment_image(values, "spatial-assets")
    context = user_deployment_container_context(values, "spatial-assets")
    RecordingBatchApi.created.clear()
    mp = pytest.MonkeyPatch()
    mp.setattr(kubernetes.client, "BatchV1Api", RecordingBatchApi)
    mp.setenv("SPATIAL_ASSETS_DEPLOYMENT", "local")
    mp.setenv("SPATIAL_ASSETS_HOME", str(tmp / "home"))
    mp.setenv("SPATIAL_ASSETS_EXECUTOR", "k8s")  # what the user deployment's env sets
    # the code location is built when its module is imported: a module another test imported
    # before (with the default executor) must be rebuilt, as a fresh user-code process would
    import spatial_assets.definitions as definitions_module

    importlib.reload(definitions_module)
    try:
        warnings.filterwarnings("ignore", category=dg.PreviewWarning)
        repo = ReconstructableRepository.for_module(
            "spatial_assets.definitions", "defs", container_image=image, container_context=context
        )
        recon_job = repo.get_reconstructable_job("__ASSET_JOB").get_subset(asset_selection={dg.AssetKey(ASSET)})
        with dg.instance_for_test(overrides={"run_launcher": run_launcher}) as instance:
            instance.add_dynamic_partitions("samples", [PARTITION])
            launcher = instance.run_launcher
            assert type(launcher).__name__ == "K8sRunLauncher"
            run = create_run_for_test(
                instance, job_name="__ASSET_JOB", asset_selection=frozenset({dg.AssetKey(ASSET)}),
                tags={"dagster/partition": PARTITION}, job_code_origin=recon_job.get_python_origin(),
            )
            launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
            job_def = recon_job.get_definition()
            assert job_def.executor_def is k8s_job_executor  # SPATIAL_ASSETS_EXECUTOR=k8s picked it
            config = process_config(resolve_to_config_type(_K8S_EXECUTOR_CONFIG_SCHEMA), {})
            assert config.success, config.errors
            executor = k8s_job_executor.executor_creation_fn(
                InitExecutorContext(job=recon_job, executor_def=k8s_job_executor, executor_config=config.value, instance=instance)
            )
            plan = create_execution_plan(recon_job, tags=run.tags, instance_ref=instance.get_ref())
            plan_context = PlanOrchestrationContext(
                plan_data=PlanData(job=recon_job, dagster_run=run, instance=instance, execution_plan=plan,
                                   raise_on_error=True, retry_mode=RetryMode.DISABLED),
                log_manager=create_context_free_log_manager(instance, run),
                executor=executor,
                output_capture=None,
            )
            step_context = StepHandlerContext(
                instance=instance, plan_context=plan_context, steps=plan.steps,
                execute_step_args=ExecuteStepArgs(recon_job.get_python_origin(), run.run_id, [ASSET], print_serialized_events=False),
            )
            list(executor._step_handler.launch_step(step_context))
    finally:
        mp.undo()
        importlib.reload(definitions_module)  # back to this process's environment
    (ns_run, run_job), (ns_step, step_job) = RecordingBatchApi.created
    assert ns_run == ns_step == "spatial-assets"
    return {"run": _manifest(run_job), "step": _manifest(step_job), "image": image}


def _container(manifest: dict) -> dict:
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("which", ["run", "step"])
def test_jobs_are_valid_kubernetes_batch_v1_jobs(launched: dict, which: str) -> None:
    manifest = launched[which]
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    assert _container(manifest)["image"] == launched["image"]


def test_validation_catches_a_missing_required_field(launched: dict) -> None:
    broken = copy.deepcopy(launched["step"])
    del _container(broken)["name"]  # containers[].name is required by the schema
    with pytest.raises(kubernetes_validate.ValidationError, match="name"):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    typo = copy.deepcopy(launched["step"])
    typo["spec"]["template"]["spec"]["restartPolcy"] = "Never"  # strict: an unknown field is an error
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_heavy_step_pod_is_guaranteed_qos_with_the_assets_own_size(launched: dict) -> None:
    container = _container(launched["step"])
    cpu, memory_mib = HEAVY_STEPS[ASSET]
    assert container["resources"]["requests"] == container["resources"]["limits"] == {"cpu": str(cpu), "memory": f"{memory_mib}Mi"}
    assert container["args"][:3] == ["dagster", "api", "execute_step"]
    assert launched["step"]["metadata"]["labels"]["dagster/op"] == ASSET


def test_run_worker_pod_runs_the_run_and_is_guaranteed_too(launched: dict) -> None:
    manifest = launched["run"]
    container = _container(manifest)
    assert container["args"][:3] == ["dagster", "api", "execute_run"]
    res = container["resources"]
    values = yaml.safe_load((REPO / "deploy/helm/values.yaml").read_text())
    run_pod = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfig"]["resources"]
    assert res == run_pod and res["requests"] == res["limits"]  # orchestration only, Guaranteed
    env_from = {e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e}
    assert {"spatial-assets-dagster-spatial-assets-user-env", "spatial-assets-env"} <= env_from
    assert {e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e} >= {"spatial-assets-aws"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SPATIAL_ASSETS_EXECUTOR"] == "k8s" and env["DAGSTER_RUN_JOB_NAME"] == "__ASSET_JOB"
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 86400 and manifest["spec"]["backoffLimit"] == 0
    assert manifest["spec"]["template"]["spec"]["serviceAccountName"] == "dagster"
