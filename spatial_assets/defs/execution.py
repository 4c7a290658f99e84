"""Where and how big each step runs: the one place per-asset resources and the executor are chosen.

Heavy assets (raw-folder reading, segmentation and QC, training, the model, annotations, the domain
model and domains) each run as their
own pod / task when the deployment says so (``SPATIAL_ASSETS_EXECUTOR``), sized here per asset:

* Kubernetes (``k8s``, :func:`dagster_k8s.k8s_job_executor`): the ``dagster-k8s/config`` op tag sets
  the step pod's container resources with requests == limits for CPU and memory, i.e. the
  *Guaranteed* QoS class — the kubelet never evicts such a pod for node memory pressure before
  best-effort ones, and the step gets the cores it was planned with.
* ECS (``ecs``, :func:`dagster_aws.ecs.ecs_executor`): ``ecs/cpu`` / ``ecs/memory`` (CPU units and MiB,
  a valid Fargate combination: 2 vCPU supports 4-16 GiB).
* anything else (the default, local and the test suite): Dagster's multiprocess executor; the tags
  are inert and the ``heavy`` pool (limit 1, ``dagster.yaml``) keeps two heavy steps apart.

The run worker itself stays small: it only orchestrates (``deploy/helm/values.yaml``).
Memory figures are planning defaults for the bundled data's scale (tens of thousands of cells,
a few hundred genes); raise them here, nowhere else, for larger atlases.
"""

import os
from typing import Any, Optional

#: asset name → (CPU cores, memory in MiB) of its step
HEAVY_STEPS: dict[str, tuple[int, int]] = {
    # raw samples: reading a folder holds its transcript table in memory; segmentation adds one
    # image patch (400 µm) at a time and the transcript-to-cell join
    "raw_sample": (1, 4096),
    "segmented_cells": (2, 8192),
    "cell_qc": (1, 4096),
    "training_set": (2, 8192),
    "celltype_model": (2, 8192),
    "cell_type_annotations": (2, 6144),
    "domain_model": (2, 12288),
    "spatial_domains": (2, 6144),
    "spot_deconvolution": (2, 8192),
}

EXECUTOR_ENV = "SPATIAL_ASSETS_EXECUTOR"
EXECUTORS = ("multiprocess", "k8s", "ecs")


def _k8s_resources(cpu: int, memory_mib: int) -> dict[str, Any]:
    amount = {"cpu": str(cpu), "memory": f"{memory_mib}Mi"}
    return {"container_config": {"resources": {"requests": dict(amount), "limits": dict(amount)}}}


def op_tags_for(asset_name: str) -> dict[str, Any]:
    """The op tags of a heavy asset's step (both the Kubernetes and the ECS sizing)."""
    if asset_name not in HEAVY_STEPS:
        raise KeyError(f"{asset_name!r} is not a heavy asset; heavy assets: {sorted(HEAVY_STEPS)}")
    cpu, memory_mib = HEAVY_STEPS[asset_name]
    return {
        "dagster-k8s/config": _k8s_resources(cpu, memory_mib),
        "ecs/cpu": str(cpu * 1024),
        "ecs/memory": str(memory_mib),
    }


def executor_from_env() -> Optional[Any]:
    """The executor ``SPATIAL_ASSETS_EXECUTOR`` names (``k8s`` | ``ecs``), or None for Dagster's default."""
    name = os.environ.get(EXECUTOR_ENV, "") or "multiprocess"
    if name not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV}={name!r} is not one of {list(EXECUTORS)}")
    if name == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if name == "ecs":
        from dagster_aws.ecs import ecs_executor

        return ecs_executor
    return None
