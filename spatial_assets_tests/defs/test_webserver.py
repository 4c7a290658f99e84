"""The UI as a user opens it: `dagster-webserver` on the workspace, queried through GraphQL.

Runs the reference → sample → panel model part of the graph through the named jobs into a real
on-disk instance (storage on the test S3 server, configured purely through environment variables
— the ``s3`` deployment), then starts the webserver on that instance and asks it what a user
would see: assets and their partitions, checks, jobs, sensors (running by default), automation
condition labels, and the metadata of the materializations.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anndata as ad
import dagster as dg
import pytest

from spatial_assets.platform.manifest import ReferenceEntry, dump_manifest
from spatial_assets.storage.seaweed import ensure_bucket, free_ports, settings_env

REPO = Path(__file__).resolve().parents[2]
REF = REPO / "data" / "mouse_POA_scRNA_ref_Moffitt2018.h5ad"
MERFISH = REPO / "data" / "mouse_POA_MERFISH_Moffitt2018.h5ad"

QUERY = """
{
  workspaceOrError { ... on Workspace { locationEntries { name loadStatus
      locationOrLoadError { __typename ... on PythonError { message } } } } }
  assetNodes {
    assetKey { path }
    isPartitioned
    automationCondition { label }
    assetChecksOrError { ... on AssetChecks { checks { name blocking
        executionForLatestMaterialization { status } } } }
  }
}
"""


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture()
def deployment_env(s3_settings, tmp_path, monkeypatch):
    bucket = "webserver-ui"
    ensure_bucket(s3_settings, bucket)
    home = tmp_path / "home"
    (home / "dagster_home").mkdir(parents=True)
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster_home" / "dagster.yaml")
    env = {
        **settings_env(s3_settings),
        "SPATIAL_ASSETS_DEPLOYMENT": "s3",
        "SPATIAL_ASSETS_BUCKET": bucket,
        "SPATIAL_ASSETS_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster_home"),
        "SPATIAL_ASSETS_CACHE": str(tmp_path / "cache"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def test_webserver_lists_assets_partitions_and_checks(deployment_env, tmp_path):
    from spatial_assets.definitions import build_definitions

    defs = build_definitions()
    store = defs.resources["storage"].get_store()
    store.put_file(REF, "raw/references/poa.h5ad")
    entry = ReferenceEntry(id="poa", uri=store.uri("raw/references/poa.h5ad"), label_column="cell_type",
                           placeholder_labels=["Ambiguous", "Unstable"])
    store.write_bytes("manifests/references.yaml", dump_manifest([entry]).encode())
    merfish = ad.read_h5ad(MERFISH)[:3000].copy()
    merfish.write_h5ad(tmp_path / "s1.h5ad")
    store.put_file(tmp_path / "s1.h5ad", "landing/samples/s1.h5ad")
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("references", ["poa"])
        instance.add_dynamic_partitions("samples", ["s1"])
        defs.resolve_job_def("references_job").execute_in_process(instance=instance, partition_key="poa")
        defs.resolve_job_def("samples_job").execute_in_process(instance=instance, partition_key="s1")
        (panel,) = instance.get_dynamic_partitions("panels")  # added by sample_panel
        defs.resolve_job_def("panel_models_job").execute_in_process(instance=instance, partition_key=panel)

    (port,) = free_ports(1)
    exe = Path(sys.executable).parent / "dagster-webserver"
    log = open(tmp_path / "webserver.log", "w")
    proc = subprocess.Popen(
        [str(exe), "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env={**os.environ, **deployment_env}, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 180
        data = None
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail("webserver exited: " + (tmp_path / "webserver.log").read_text()[-2000:])
            try:
                data = _graphql(port, QUERY)["data"]
                entries = data["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["loadStatus"] == "LOADED" and data["assetNodes"]:
                    break
            except Exception:
                pass
            time.sleep(1)
        assert data is not None, (tmp_path / "webserver.log").read_text()[-2000:]
        (location,) = data["workspaceOrError"]["locationEntries"]
        assert location["name"] == "spatial_assets"
        assert location["locationOrLoadError"]["__typename"] == "RepositoryLocation"
        nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
        assert {"reference_atlas", "training_set", "celltype_model", "spatial_cells", "cell_type_annotations",
                "spatial_domains", "domain_composition"} <= set(nodes)
        assert nodes["reference_atlas"]["isPartitioned"] and nodes["cell_type_annotations"]["isPartitioned"]
        assert nodes["celltype_model"]["isPartitioned"]  # one model per gene panel
        assert nodes["cell_type_annotations"]["automationCondition"]["label"] == "eager, on the model of the sample's own panel"
        assert nodes["reference_atlas"]["automationCondition"] is None  # driven by its sensor
        checks = {c["name"]: c for c in nodes["training_set"]["assetChecksOrError"]["checks"]}
        assert checks["balanced_training_set"]["blocking"]
        assert checks["balanced_training_set"]["executionForLatestMaterialization"]["status"] == "SUCCEEDED"
        assert checks["training_set_normalization"]["executionForLatestMaterialization"]["status"] == "SUCCEEDED"
        sample_checks = {c["name"] for c in nodes["spatial_cells"]["assetChecksOrError"]["checks"]}
        assert {"spatial_cells_normalization", "spatial_cells_gene_overlap"} <= sample_checks
        # materialization metadata is visible: the model's sha256 as recorded
        meta = _graphql(port, """{ assetOrError(assetKey: {path: ["celltype_model"]}) { ... on Asset {
              assetMaterializations(limit: 1) { metadataEntries { label } } } } }""")
        labels = {e["label"] for e in meta["data"]["assetOrError"]["assetMaterializations"][0]["metadataEntries"]}
        assert {"sha256", "uri", "n_classes", "panel_id", "model_genes", "library_versions"} <= labels
        ref = _graphql(port, """{ assetOrError(assetKey: {path: ["reference_atlas"]}) { ... on Asset {
              assetMaterializations(limit: 1) { metadataEntries { label } } } } }""")
        labels = {e["label"] for e in ref["data"]["assetOrError"]["assetMaterializations"][0]["metadataEntries"]}
        assert {"reference_sha256", "reference_uri", "sha256", "uri"} <= labels
        # the jobs and the sensors, running without anyone switching them on
        repo = '{repositoryLocationName: "spatial_assets", repositoryName: "__repository__"}'
        sensors = _graphql(port, "{ sensorsOrError(repositorySelector: %s) { ... on Sensors { results { name sensorState { status } } } } }" % repo)
        states = {s["name"]: s["sensorState"]["status"] for s in sensors["data"]["sensorsOrError"]["results"]}
        assert states == {"reference_manifest_sensor": "RUNNING", "sample_landing_sensor": "RUNNING",
                          "spot_landing_sensor": "RUNNING", "spatial_assets_automation": "RUNNING"}
        jobs = _graphql(port, "{ repositoryOrError(repositorySelector: %s) { ... on Repository { jobs { name } } } }" % repo)
        names = {j["name"] for j in jobs["data"]["repositoryOrError"]["jobs"]}
        assert {"references_job", "samples_job", "panel_models_job", "celltyping_job", "domain_model_job", "domains_job",
                "spot_samples_job", "spot_deconvolution_job"} <= names
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
