"""The asset graph end to end on a real S3 server (SeaweedFS), with real data.

One platform per module (the steps build on each other, as in production): register through the
sensors → materialize reference → training set → model → annotations for 2 samples → audit;
then a tampered model, a new sample, a reference update and a sample that fails normalization.
"""

import io
import json
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import anndata as ad
import dagster as dg
import numpy as np
import pandas as pd
import pytest

from spatial_assets.cli.audit import run_audit
from spatial_assets.definitions import build_definitions
from dagster_aws.s3 import S3Resource

from spatial_assets.defs.io_managers import S3AssetIOManager
from spatial_assets.defs.resources import S3StorageResource
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.manifest import ReferenceEntry, dump_manifest
from spatial_assets.storage.seaweed import ensure_bucket

warnings.filterwarnings("ignore", category=dg.PreviewWarning)
warnings.filterwarnings("ignore", category=dg.BetaWarning)

DATA = Path(__file__).resolve().parents[2] / "data"
REF = DATA / "mouse_POA_scRNA_ref_Moffitt2018.h5ad"
MERFISH = DATA / "mouse_POA_MERFISH_Moffitt2018.h5ad"
SAMPLES = ["poa_a", "poa_b"]


class Platform:
    def __init__(self, s3_settings, bucket: str, cache_dir: Path):
        s3 = S3Resource(
            endpoint_url=s3_settings.endpoint_url,
            aws_access_key_id=s3_settings.access_key_id,
            aws_secret_access_key=s3_settings.secret_access_key,
            region_name=s3_settings.region_name,
        )
        self.storage = S3StorageResource(s3_resource=s3, bucket=bucket, cache_dir=str(cache_dir))
        self.settings = PlatformSettings(confidence_threshold=0.5, n_domains=4)
        self.resources = {
            "s3": s3,
            "storage": self.storage,
            "io_manager": S3AssetIOManager(s3_resource=s3, s3_bucket=bucket, s3_prefix="assets", cache_dir=str(cache_dir)),
            "settings": self.settings,
        }
        self.defs = build_definitions(self.resources)
        self.store = self.storage.get_store()
        self.assets = list(self.defs.assets) + list(self.defs.asset_checks)

    def materialize(self, keys, partition=None, raise_on_error=True):
        return dg.materialize(
            self.assets,
            selection=dg.AssetSelection.assets(*keys),
            partition_key=partition,
            instance=self.instance,
            resources=self.resources,
            raise_on_error=raise_on_error,
        )

    def tick(self, sensor_name: str, cursor=None):
        sensor = self.defs.resolve_sensor_def(sensor_name)
        with dg.build_sensor_context(instance=self.instance, resources=self.resources, cursor=cursor) as ctx:
            result = sensor(ctx)
        if isinstance(result, dg.SensorResult):
            for req in result.dynamic_partitions_requests or []:
                self.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        return result

    def evaluate(self) -> dict[str, set]:
        """One declarative-automation tick (as the daemon runs them): what would be requested."""
        ev = dg.evaluate_automation_conditions(defs=self.defs, instance=self.instance, cursor=self.cursor)
        self.cursor = ev.cursor
        out = {}
        for key in self.defs.resolve_asset_graph().get_all_asset_keys():
            parts = ev.get_requested_partitions(key)
            if parts:
                out[key.to_user_string()] = {p for p in parts if p is not None}
        return out

    def land(self, sample_id: str, adata: ad.AnnData, tmp: Path) -> None:
        path = tmp / f"{sample_id}.h5ad"
        adata.write_h5ad(path)
        self.store.put_file(path, f"landing/samples/{sample_id}.h5ad")

    def write_reference(self, adata: ad.AnnData, tmp: Path) -> None:
        path = tmp / "ref.h5ad"
        adata.write_h5ad(path)
        self.store.put_file(path, "raw/references/poa.h5ad")


@pytest.fixture(scope="module")
def platform(s3_settings, tmp_path_factory):
    bucket = "platform-e2e"
    ensure_bucket(s3_settings, bucket)
    tmp = tmp_path_factory.mktemp("platform")
    p = Platform(s3_settings, bucket, tmp / "cache")
    p.tmp = tmp
    p.cursor = None
    with dg.instance_for_test() as instance:
        p.instance = instance
        p.write_reference(ad.read_h5ad(REF), tmp)
        entry = ReferenceEntry(id="poa", uri=p.store.uri("raw/references/poa.h5ad"), label_column="cell_type")
        p.store.write_bytes("manifests/references.yaml", dump_manifest([entry]).encode())
        merfish = ad.read_h5ad(MERFISH)
        for sid, bregma in zip(SAMPLES, sorted(merfish.obs["Bregma"].unique())):
            p.land(sid, merfish[merfish.obs["Bregma"] == bregma].copy(), tmp)
        p.merfish = merfish
        yield p


def _materialized_partitions(instance, key: str) -> dict[str, int]:
    """partition → number of materializations so far."""
    records = instance.fetch_materializations(dg.AssetKey(key), limit=1000).records
    out: dict[str, int] = {}
    for r in records:
        out[r.partition_key] = out.get(r.partition_key, 0) + 1
    return out


def test_sensors_register_partitions(platform):
    ref = platform.tick("reference_manifest_sensor")
    assert [r.partition_key for r in ref.run_requests] == ["poa"]
    assert platform.instance.get_dynamic_partitions("references") == ["poa"]
    samples = platform.tick("sample_landing_sensor")
    assert sorted(r.partition_key for r in samples.run_requests) == SAMPLES
    assert sorted(platform.instance.get_dynamic_partitions("samples")) == SAMPLES
    # a second tick with the cursor sees nothing new
    again = platform.tick("sample_landing_sensor", cursor=samples.cursor)
    assert isinstance(again, dg.SkipReason)


def test_full_graph_on_s3(platform):
    platform.materialize(["reference_atlas"], "poa")
    result = platform.materialize(["training_set", "label_mapping", "celltype_model"])
    assert all(e.passed for e in result.get_asset_check_evaluations())
    for sid in SAMPLES:
        result = platform.materialize(["spatial_cells", "cell_type_annotations", "cell_type_summary"], sid)
        evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert evaluations["spatial_cells_normalization"].passed
        assert evaluations["spatial_cells_gene_overlap"].passed
        assert evaluations["spatial_cells_gene_overlap"].metadata["overlap_fraction"].value == 1.0
        assert evaluations["confidence_invariants"].passed
    client = platform.store
    card = json.loads(client.read_bytes("assets/celltype_model.pkl.card.json"))
    for sid in SAMPLES:
        assert client.exists(f"assets/cell_type_annotations/{sid}.h5ad")
        assert client.exists(f"assets/cell_type_summary/{sid}.parquet")
        annotated = ad.read_h5ad(client.get_file(f"assets/cell_type_annotations/{sid}.h5ad"))
        prov = annotated.uns["provenance"]
        assert prov["model"]["sha256"] == card["sha256"]
        assert prov["training_set"]["content_sha256"] == card["training_set"]["content_sha256"]
        assert set(prov["references"]) == {"poa"}
        assert prov["sample"]["id"] == sid
        conf = annotated.obs["cell_type_confidence"].to_numpy()
        assert np.all((conf >= 0) & (conf <= 1))
        assert ((annotated.obs["cell_type"] == "Unassigned") == (conf < 0.5)).all()


def test_domains_as_partitioned_assets(platform):
    platform.materialize(["domain_model"])
    record = json.loads(platform.store.read_bytes("assets/domain_model.zip.card.json"))  # written by the IO manager
    fitted = platform.instance.get_latest_materialization_event(dg.AssetKey("domain_model")).asset_materialization.metadata
    assert fitted["fitted_on"].value == ", ".join(SAMPLES) and record["metadata"]["n_domains"] == 4
    assert fitted["sha256"].value == record["sha256"]
    for sid in SAMPLES:
        result = platform.materialize(["spatial_domains", "domain_composition", "domain_markers"], sid)
        (check,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "domain_invariants"]
        assert check.passed, check.metadata
        domains = ad.read_h5ad(platform.store.get_file(f"assets/spatial_domains/{sid}.h5ad"))
        assert domains.uns["domain_model_sha256"] == record["sha256"]
        assert set(domains.obs["domain"].astype(str)) <= {f"L4_D{i}" for i in range(4)}
        assert "domain_cell_type" in domains.obs
        composition = pd.read_parquet(platform.store.get_file(f"assets/domain_composition/{sid}.parquet"))
        sums = composition.groupby(["sample_id", "domain"])["fraction"].sum()
        assert np.allclose(sums.to_numpy(), 1.0)
        assert composition["n_cells"].sum() == domains.n_obs
        assert platform.store.exists(f"assets/domain_markers/{sid}.parquet")
        assert any(k.startswith(f"assets/spatial_domains/{sid}.plots/") for k in (o.key for o in platform.store.list("assets/spatial_domains/")))


def test_audit_shows_chain(platform):
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = run_audit("poa_a", store=platform.store, s3_settings=platform.storage.s3_settings(), check_files=True)
    text = buf.getvalue()
    assert code == 0, text
    assert "reference poa" in text and "model" in text and "up to date" in text
    assert "(file at s3://platform-e2e/raw/references/poa.h5ad)" in text


def test_tampered_model_is_refused(platform):
    key = "assets/celltype_model.pkl"
    original = platform.store.read_bytes(key)
    platform.store.write_bytes(key, original[:-1] + bytes([original[-1] ^ 1]))
    try:
        result = platform.materialize(["cell_type_annotations"], "poa_a", raise_on_error=False)
        assert not result.success
        messages = " ".join(
            str(e.event_specific_data.error) for e in result.all_events if e.is_step_failure  # type: ignore[union-attr]
        )
        assert "sha256" in messages
    finally:
        platform.store.write_bytes(key, original)


def test_new_sample_runs_only_its_partitions(platform):
    platform.evaluate()  # the daemon's previous tick: everything is up to date
    extra = platform.merfish[platform.merfish.obs["Bregma"] == platform.merfish.obs["Bregma"].max()][:2000].copy()
    platform.land("poa_c", extra, platform.tmp)
    result = platform.tick("sample_landing_sensor")
    assert [r.partition_key for r in result.run_requests] == ["poa_c"]
    platform.materialize(["spatial_cells"], "poa_c")
    before = _materialized_partitions(platform.instance, "cell_type_annotations")
    requested = platform.evaluate()
    assert requested.get("cell_type_annotations") == {"poa_c"}
    assert "training_set" not in requested and "celltype_model" not in requested
    assert requested.get("spatial_domains") == {"poa_c"}
    assert "domain_model" not in requested  # the shared model is reused, not refitted
    domains_before = _materialized_partitions(platform.instance, "spatial_domains")
    platform.materialize(["cell_type_annotations"], "poa_c")
    platform.materialize(["spatial_domains"], "poa_c")
    after = _materialized_partitions(platform.instance, "cell_type_annotations")
    assert {k: v for k, v in after.items() if k != "poa_c"} == before
    domains_after = _materialized_partitions(platform.instance, "spatial_domains")
    assert {k: v for k, v in domains_after.items() if k != "poa_c"} == domains_before
    # same model → the new sample's cells get the domains the same cells got in their own slice
    new = ad.read_h5ad(platform.store.get_file("assets/spatial_domains/poa_c.h5ad"))
    old = ad.read_h5ad(platform.store.get_file("assets/spatial_domains/poa_b.h5ad"))
    assert new.uns["domain_model_sha256"] == old.uns["domain_model_sha256"]
    agreement = float((new.obs["domain"].astype(str) == old.obs.loc[new.obs_names, "domain"].astype(str)).mean())
    print(f"domain agreement of re-landed cells: {agreement:.3f}")
    assert agreement >= 0.7


def test_reference_update_reruns_model_and_all_annotations(platform):
    ref = ad.read_h5ad(REF)
    platform.write_reference(ref[ref.obs["cell_type"] != "Fibroblast"].copy(), platform.tmp)
    result = platform.tick("reference_manifest_sensor", cursor=json.dumps({}))
    assert [r.partition_key for r in result.run_requests] == ["poa"]
    # the nightly schedule catches the same change (an edit made outside the platform)
    schedule = platform.defs.resolve_schedule_def("nightly_reference_reobservation")
    with dg.build_schedule_context(instance=platform.instance, resources=platform.resources) as ctx:
        nightly = schedule(ctx)
    assert [r.partition_key for r in nightly] == ["poa"]
    old_card = json.loads(platform.store.read_bytes("assets/celltype_model.pkl.card.json"))
    platform.evaluate()
    platform.materialize(["reference_atlas"], "poa")
    # one tick plans the whole unpartitioned chain; annotations wait until the model is fresh
    keys = platform.evaluate()
    assert {"training_set", "label_mapping", "celltype_model"} <= set(keys)
    assert "cell_type_annotations" not in keys and "spatial_cells" not in keys
    platform.materialize(["training_set", "label_mapping", "celltype_model"])
    # the old calls are now stale
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert run_audit("poa_a", store=platform.store, check_files=False) == 3
    assert "STALE" in buf.getvalue()
    keys = platform.evaluate()
    assert keys.get("cell_type_annotations") == {"poa_a", "poa_b", "poa_c"}
    new_card = json.loads(platform.store.read_bytes("assets/celltype_model.pkl.card.json"))
    assert new_card["sha256"] != old_card["sha256"]
    assert "Fibroblast" not in new_card["classes"]


def test_failing_normalization_check_blocks_annotations(platform):
    zscored = platform.merfish[:1500].copy()
    X = np.log1p(zscored.X.toarray() if hasattr(zscored.X, "toarray") else zscored.X)
    zscored.X = ((X - X.mean(0)) / (X.std(0) + 1e-6)).astype(np.float32)
    platform.land("poa_zscored", zscored, platform.tmp)
    platform.tick("sample_landing_sensor")
    result = platform.materialize(["spatial_cells", "cell_type_annotations"], "poa_zscored", raise_on_error=False)
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["spatial_cells_normalization"].passed
    assert checks["spatial_cells_normalization"].metadata["x_state"].value == "negative"
    assert not platform.store.exists("assets/cell_type_annotations/poa_zscored.h5ad")
    assert "poa_zscored" not in _materialized_partitions(platform.instance, "cell_type_annotations")
