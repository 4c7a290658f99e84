"""The ``dagster.yaml`` the official Helm chart generates from ``deploy/helm/values.yaml``, offline.

No ``helm`` binary (and no cluster) here, so this ports, for the values this project sets, what the
chart's ``templates/configmap-instance.yaml`` and ``templates/helpers/instance/*.tpl`` render
(dagster/dagster 1.13: storage on external Postgres, K8sRunLauncher, QueuedRunCoordinator,
S3ComputeLogManager, run monitoring / retries, ``additionalInstanceConfig`` appended verbatim). It
fails loudly on a value it does not port instead of guessing. ``helm template`` on a machine with
helm is the authoritative rendering (deploy/README.md).
"""

from __future__ import annotations

from typing import Any

DEFAULT_DAGSTER_HOME = "/opt/dagster/dagster_home"
DEFAULT_PG_SECRET = "dagster-postgresql-secret"


def _fullname(release: str) -> str:
    return release if "dagster" in release else f"{release}-dagster"


def _postgres(values: dict[str, Any]) -> dict[str, Any]:
    pg = values["postgresql"]
    if pg.get("enabled"):
        raise NotImplementedError("the chart's bundled Postgres is not ported; use an external one")
    db: dict[str, Any] = {
        "username": pg["postgresqlUsername"],
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "hostname": pg["postgresqlHost"],
        "db_name": pg["postgresqlDatabase"],
        "port": pg["service"]["port"],
        "params": pg.get("postgresqlParams") or {},
    }
    if pg.get("postgresqlScheme"):
        db["scheme"] = pg["postgresqlScheme"]
    return {"postgres_db": db}


def _k8s_run_launcher(values: dict[str, Any], release: str, namespace: str) -> dict[str, Any]:
    launcher = values["runLauncher"]
    if launcher["type"] != "K8sRunLauncher":
        raise NotImplementedError(f"run launcher {launcher['type']!r} is not ported")
    c = launcher["config"]["k8sRunLauncher"]
    glob = values.get("global", {})
    out: dict[str, Any] = {"load_incluster_config": c["loadInclusterConfig"]}
    if c.get("kubeconfigFile"):
        out["kubeconfig_file"] = c["kubeconfigFile"]
    out["job_namespace"] = c.get("jobNamespace") or namespace
    out["image_pull_policy"] = c["imagePullPolicy"]
    if values.get("imagePullSecrets"):
        out["image_pull_secrets"] = values["imagePullSecrets"]
    out["service_account_name"] = glob.get("serviceAccountName") or f"{_fullname(release)}"
    if "image" in c:
        img = c["image"]
        out["job_image"] = f"{img['repository']}:{img['tag']}"
    out["dagster_home"] = glob.get("dagsterHome", DEFAULT_DAGSTER_HOME)
    out["instance_config_map"] = f"{_fullname(release)}-instance"
    out["postgres_password_secret"] = glob.get("postgresqlSecretName", DEFAULT_PG_SECRET)
    if c.get("envConfigMaps"):
        out["env_config_maps"] = [m["name"] for m in c["envConfigMaps"] if "name" in m]
    if c.get("envSecrets"):
        out["env_secrets"] = [s["name"] for s in c["envSecrets"] if "name" in s]
    for key, dest in (("envVars", "env_vars"), ("volumeMounts", "volume_mounts"), ("volumes", "volumes"),
                      ("labels", "labels"), ("resources", "resources"), ("securityContext", "security_context")):
        if c.get(key):
            out[dest] = c[key]
    if c.get("failPodOnRunFailure"):
        out["fail_pod_on_run_failure"] = True
    if c.get("schedulerName"):
        out["scheduler_name"] = c["schedulerName"]
    if c.get("runK8sConfig"):
        names = {"containerConfig": "container_config", "podSpecConfig": "pod_spec_config",
                 "podTemplateSpecMetadata": "pod_template_spec_metadata", "jobSpecConfig": "job_spec_config",
                 "jobMetadata": "job_metadata"}
        unknown = set(c["runK8sConfig"]) - set(names)
        if unknown:
            raise NotImplementedError(f"runK8sConfig keys not in the chart: {sorted(unknown)}")
        out["run_k8s_config"] = {names[k]: v for k, v in c["runK8sConfig"].items() if v}
    return {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": out}


def _run_coordinator(values: dict[str, Any]) -> dict[str, Any] | None:
    daemon = values["dagsterDaemon"]
    rc = daemon.get("runCoordinator", {})
    if not (daemon.get("enabled") and rc.get("enabled")):
        return None
    if rc["type"] != "QueuedRunCoordinator":
        raise NotImplementedError(f"run coordinator {rc['type']!r} is not ported")
    q = rc.get("config", {}).get("queuedRunCoordinator") or {}
    config: dict[str, Any] = {}
    for key, dest in (("maxConcurrentRuns", "max_concurrent_runs"), ("tagConcurrencyLimits", "tag_concurrency_limits"),
                      ("dequeueIntervalSeconds", "dequeue_interval_seconds")):
        if q.get(key):
            config[dest] = q[key]
    out: dict[str, Any] = {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}
    if config:
        out["config"] = config
    return out


def _compute_logs(values: dict[str, Any]) -> dict[str, Any]:
    clm = values["computeLogManager"]
    if clm["type"] != "S3ComputeLogManager":
        raise NotImplementedError(f"compute log manager {clm['type']!r} is not ported")
    c = clm["config"]["s3ComputeLogManager"]
    names = {"bucket": "bucket", "localDir": "local_dir", "prefix": "prefix", "useSsl": "use_ssl", "verify": "verify",
             "verifyCertPath": "verify_cert_path", "endpointUrl": "endpoint_url", "skipEmptyFiles": "skip_empty_files",
             "uploadInterval": "upload_interval", "uploadExtraArgs": "upload_extra_args", "showUrlOnly": "show_url_only",
             "region": "region"}
    unknown = set(c) - set(names)
    if unknown:
        raise NotImplementedError(f"s3ComputeLogManager keys not in the chart: {sorted(unknown)}")
    return {"module": "dagster_aws.s3.compute_log_manager", "class": "S3ComputeLogManager",
            "config": {names[k]: v for k, v in c.items() if v not in (None, "")}}


def render_instance(values: dict[str, Any], *, release: str = "spatial-assets", namespace: str = "spatial-assets") -> dict[str, Any]:
    """The instance config (as a dict) the chart would put in ``<fullname>-instance``'s dagster.yaml."""
    pg = _postgres(values)
    inst: dict[str, Any] = {
        "scheduler": {"module": "dagster.core.scheduler", "class": "DagsterDaemonScheduler"},
        "schedule_storage": {"module": "dagster_postgres.schedule_storage", "class": "PostgresScheduleStorage", "config": pg},
        "run_launcher": _k8s_run_launcher(values, release, namespace),
        "run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage", "config": pg},
        "event_log_storage": {"module": "dagster_postgres.event_log", "class": "PostgresEventLogStorage", "config": pg},
    }
    rc = _run_coordinator(values)
    if rc:
        inst["run_coordinator"] = rc
    inst["compute_logs"] = _compute_logs(values)
    daemon = values["dagsterDaemon"]
    mon = daemon.get("runMonitoring") or {}
    if daemon.get("enabled") and mon.get("enabled"):
        m: dict[str, Any] = {"enabled": mon["enabled"], "start_timeout_seconds": mon["startTimeoutSeconds"]}
        if mon.get("cancelTimeoutSeconds") is not None:
            m["cancel_timeout_seconds"] = mon["cancelTimeoutSeconds"]
        if mon.get("maxResumeRunAttempts") is not None:
            m["max_resume_run_attempts"] = mon["maxResumeRunAttempts"]
        m["poll_interval_seconds"] = mon["pollIntervalSeconds"]
        m["free_slots_after_run_end_seconds"] = mon["freeSlotsAfterRunEndSeconds"]
        inst["run_monitoring"] = m
    retries = daemon.get("runRetries") or {}
    if daemon.get("enabled") and retries.get("enabled"):
        inst["run_retries"] = {"enabled": True, **({"max_retries": retries["maxRetries"]} if retries.get("maxRetries") else {})}
    inst["telemetry"] = {"enabled": values.get("telemetry", {}).get("enabled", True)}
    extra = values.get("additionalInstanceConfig") or {}
    clash = set(extra) & set(inst)
    if clash:
        raise ValueError(f"additionalInstanceConfig repeats keys the chart already renders: {sorted(clash)}")
    inst.update(extra)
    return inst


def user_deployment(values: dict[str, Any], name: str) -> dict[str, Any]:
    for d in values["dagster-user-deployments"]["deployments"]:
        if d["name"] == name:
            return d
    raise KeyError(f"no user deployment {name!r} in the values")


def user_deployment_image(values: dict[str, Any], name: str) -> str:
    """``DAGSTER_CURRENT_IMAGE`` of the code server: the image every run and step pod uses."""
    image = user_deployment(values, name)["image"]
    return f"{image['repository']}:{image['tag']}"


def user_deployment_container_context(
    values: dict[str, Any], name: str, *, release: str = "spatial-assets", namespace: str = "spatial-assets"
) -> dict[str, Any]:
    """``DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT`` of the code server (``includeConfigInLaunchedRuns``),

    as the user-deployments subchart's ``dagsterUserDeployments.k8sContainerContext`` helper renders it.
    """
    d = user_deployment(values, name)
    if not (d.get("includeConfigInLaunchedRuns") or {}).get("enabled", True):
        return {}
    k8s: dict[str, Any] = {"image_pull_policy": d["image"]["pullPolicy"]}
    if values.get("imagePullSecrets"):
        k8s["image_pull_secrets"] = values["imagePullSecrets"]
    k8s["env_config_maps"] = [f"{_fullname(release)}-{name}-user-env"] + [m["name"] for m in d.get("envConfigMaps") or [] if "name" in m]
    if d.get("envSecrets"):
        k8s["env_secrets"] = [s["name"] for s in d["envSecrets"] if "name" in s]
    for key, dest in (("volumeMounts", "volume_mounts"), ("volumes", "volumes"), ("labels", "labels"),
                      ("resources", "resources"), ("schedulerName", "scheduler_name")):
        if d.get(key):
            k8s[dest] = d[key]
    k8s["namespace"] = namespace
    k8s["service_account_name"] = values.get("global", {}).get("serviceAccountName") or f"{_fullname(release)}-user-deployments"
    if isinstance(d.get("env"), list) and d["env"]:
        k8s["env"] = d["env"]
    return {"k8s": k8s}
