"""The platform end to end on a real S3 server (SeaweedFS) and real data, run by its own sensors.

The module fixture starts from an empty instance and lets the platform work as deployed: the
reference is added and three samples are landed with the same functions the CLI uses, then the
real sensors (reference manifest, sample landing, declarative automation) are ticked and every
run they request is launched, until nothing more is requested — no asset is materialized by
hand. Two samples are the POA MERFISH slices (one gene panel); the third measures 100 of their
genes (a second panel), so the fixture trains two models.

Each test only reads that state or changes it and lets the sensors bring it back to rest, so each
passes when run alone (``pytest path::test_name``) and in any order.
"""

import io
import json
import uuid
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import anndata as ad
import dagster as dg
import numpy as np
import pandas as pd
import pytest

from spatial_assets.cli.audit import run_audit
from spatial_assets.core.spatial import panel_genes
from spatial_assets.definitions import build_definitions
from dagster_aws.s3 import S3Resource

from spatial_assets.defs.io_managers import S3AssetIOManager
from spatial_assets.defs.resources import S3StorageResource
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.manifest import ReferenceEntry
from spatial_assets.platform.panels import panel_id
from spatial_assets.platform.registry import land_sample, register_reference
from spatial_assets.storage.seaweed import ensure_bucket
from spatial_assets_tests.defs.ticking import LocalDaemon

warnings.filterwarnings("ignore", category=dg.PreviewWarning)
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", message=r".*(signature genes absent|signatures dropped).*")

DATA = Path(__file__).resolve().parents[2] / "data"
REF = DATA / "mouse_POA_scRNA_ref_Moffitt2018.h5ad"
MERFISH = DATA / "mouse_POA_MERFISH_Moffitt2018.h5ad"
SLICES = ["poa_a", "poa_b"]  # the two POA MERFISH slices: one panel
SUBSET = "poa_b_genes100"  # 2,500 cells of poa_b measured on 100 of its genes: a second panel
REF_URI_KEY = "raw/references/poa.h5ad"


class Platform:
    def __init__(self, s3_settings, bucket: str, cache_dir: Path, instance: dg.DagsterInstance):
        s3 = S3Resource(
            endpoint_url=s3_settings.endpoint_url,
            aws_access_key_id=s3_settings.access_key_id,
            aws_secret_access_key=s3_settings.secret_access_key,
            region_name=s3_settings.region_name,
        )
        self.bucket = bucket
        self.storage = S3StorageResource(s3_resource=s3, bucket=bucket, cache_dir=str(cache_dir))
        # the deployed default threshold: each model's own (held-out reference cells reach 90 % precision)
        self.settings = PlatformSettings(n_domains=4)
        self.resources = {
            "s3": s3,
            "storage": self.storage,
            "io_manager": S3AssetIOManager(s3_resource=s3, s3_bucket=bucket, s3_prefix="assets", cache_dir=str(cache_dir)),
            "settings": self.settings,
        }
        self.defs = build_definitions(self.resources)
        self.store = self.storage.get_store()
        self.instance = instance
        self.daemon = LocalDaemon(self.defs, instance)

    def land(self, sample_id: str, adata: ad.AnnData, tmp: Path, replace: bool = False) -> dict:
        path = tmp / f"{sample_id}.h5ad"
        adata.write_h5ad(path)
        return land_sample(self.store, sample_id, str(path), replace=replace)

    def samples(self) -> list[str]:
        return sorted(self.instance.get_dynamic_partitions("samples"))

    def panel_of(self, sample_id: str) -> str:
        return json.loads(self.store.read_bytes(f"assets/sample_panel/{sample_id}.json"))["panel_id"]

    def card(self, panel: str) -> dict:
        return json.loads(self.store.read_bytes(f"assets/celltype_model/{panel}.pkl.card.json"))

    def annotations(self, sample_id: str) -> ad.AnnData:
        return ad.read_h5ad(self.store.get_file(f"assets/cell_type_annotations/{sample_id}.h5ad"))

    def counts(self, key: str) -> dict[str, int]:
        """partition → number of materializations so far."""
        out: dict[str, int] = {}
        for r in self.instance.fetch_materializations(dg.AssetKey(key), limit=10_000).records:
            out[r.partition_key] = out.get(r.partition_key, 0) + 1
        return out

    def latest_metadata(self, key: str, partition: str | None = None) -> dict:
        flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None)
        (record,) = self.instance.fetch_materializations(flt, limit=1).records
        return {k: v.value for k, v in record.asset_materialization.metadata.items()}

    def write_reference(self, adata: ad.AnnData, tmp: Path) -> None:
        path = tmp / "ref.h5ad"
        adata.write_h5ad(path)
        self.store.put_file(path, REF_URI_KEY)


def _subset_sample(merfish: ad.AnnData) -> ad.AnnData:
    b = merfish[merfish.obs["Bregma"] == sorted(merfish.obs["Bregma"].unique())[1]]
    genes = sorted(np.random.default_rng(0).choice(panel_genes(b), size=100, replace=False))
    return b[:2500, genes].copy()


@pytest.fixture(scope="module")
def platform(s3_settings, tmp_path_factory):
    bucket = f"platform-{uuid.uuid4().hex[:12]}"
    ensure_bucket(s3_settings, bucket)
    tmp = tmp_path_factory.mktemp("platform")
    with dg.instance_for_test() as instance:
        p = Platform(s3_settings, bucket, tmp / "cache", instance)
        p.tmp = tmp
        # the daemon has been running since the deployment: its first ticks see an empty platform
        assert p.daemon.run_until_quiet() == []
        p.empty_skips = dict(p.daemon.skips)
        # bring your own data, as `spatial-assets reference add` / `sample land` do
        p.write_reference(ad.read_h5ad(REF), tmp)
        entry = ReferenceEntry(id="poa", uri=p.store.uri(REF_URI_KEY), label_column="cell_type")
        p.reference_added = register_reference(p.store, entry, s3_settings=p.storage.s3_settings())
        merfish = ad.read_h5ad(MERFISH)
        p.merfish = merfish
        for sid, bregma in zip(SLICES, sorted(merfish.obs["Bregma"].unique())):
            p.land(sid, merfish[merfish.obs["Bregma"] == bregma].copy(), tmp)
        p.land(SUBSET, _subset_sample(merfish), tmp)
        p.initial_runs = p.daemon.run_until_quiet()
        for r in p.initial_runs:
            print(f"{r.seconds:6.1f}s {r.sensor:28s} {r.job:18s} {r.partition}  {','.join(r.assets)}")
        yield p


def test_empty_platform_sensors_say_where_they_looked(platform):
    skips = platform.empty_skips
    manifest = f"s3://{platform.bucket}/manifests/references.yaml"
    landing = f"s3://{platform.bucket}/landing/samples/"
    assert manifest in skips["reference_manifest_sensor"] and "does not exist" in skips["reference_manifest_sensor"]
    assert "spatial-assets reference add" in skips["reference_manifest_sensor"]
    assert skips["sample_landing_sensor"].startswith(f"no samples under {landing}")
    assert "spatial-assets sample land" in skips["sample_landing_sensor"]


def test_sensors_launch_the_named_jobs_and_automation_does_the_rest(platform):
    runs = platform.initial_runs
    assert all(r.success for r in runs), [r for r in runs if not r.success]
    by_sensor = {}
    for r in runs:
        by_sensor.setdefault(r.sensor, []).append(r)
    assert [(r.job, r.partition) for r in by_sensor["reference_manifest_sensor"]] == [("references_job", "poa")]
    assert sorted((r.job, r.partition) for r in by_sensor["sample_landing_sensor"]) == [
        ("samples_job", s) for s in sorted([*SLICES, SUBSET])
    ]
    automated = {(a, r.partition) for r in by_sensor["spatial_assets_automation"] for a in r.assets}
    panels = sorted(platform.instance.get_dynamic_partitions("panels"))
    for pid in panels:
        assert {("gene_panel", pid), ("training_set", pid), ("label_mapping", pid), ("celltype_model", pid)} <= automated
    for sid in [*SLICES, SUBSET]:
        for key in ("cell_type_annotations", "cell_type_summary", "spatial_domains", "domain_composition", "domain_markers",
                    "spatially_variable_genes"):
            assert (key, sid) in automated, (key, sid)
    assert ("domain_model", None) in automated
    # nothing was computed twice on the way
    for key in ("celltype_model", "cell_type_annotations", "spatial_domains", "domain_model"):
        assert all(n == 1 for n in platform.counts(key).values()), (key, platform.counts(key))


def test_two_panels_two_models(platform):
    panel_a, panel_b, panel_subset = (platform.panel_of(s) for s in [*SLICES, SUBSET])
    assert panel_a == panel_b != panel_subset
    assert sorted(platform.instance.get_dynamic_partitions("panels")) == sorted({panel_a, panel_subset})
    subset = ad.read_h5ad(platform.store.get_file(f"assets/spatial_cells/{SUBSET}.h5ad"))
    assert panel_subset == panel_id(subset.var_names) and len(subset.var_names) == 100
    cards = {pid: platform.card(pid) for pid in (panel_a, panel_subset)}
    assert cards[panel_a]["sha256"] != cards[panel_subset]["sha256"]
    assert cards[panel_subset]["panel"]["id"] == panel_subset and cards[panel_subset]["panel"]["n_genes"] == 100
    assert set(cards[panel_subset]["genes"]) <= set(subset.var_names)
    assert len(cards[panel_a]["genes"]) > 100
    for sid, pid in [(SLICES[0], panel_a), (SLICES[1], panel_a), (SUBSET, panel_subset)]:
        prov = platform.annotations(sid).uns["provenance"]
        assert prov["panel"]["id"] == pid
        assert prov["model"]["sha256"] == cards[pid]["sha256"]
        assert platform.latest_metadata("cell_type_annotations", sid)["panel_id"] == pid
    # the readable name of each panel is on its gene_panel partition and on the samples
    meta = platform.latest_metadata("gene_panel", panel_subset)
    assert meta["n_genes"] == 100 and meta["panel_name"].startswith("100 genes (")
    assert platform.latest_metadata("spatial_cells", SUBSET)["panel_id"] == panel_subset
    # the 100-gene model annotates the same cells as the full-panel one, mostly alike
    full = platform.annotations(SLICES[1]).obs["cell_type_predicted"]
    small = platform.annotations(SUBSET).obs["cell_type_predicted"]
    agreement = float((small.astype(str) == full.loc[small.index].astype(str)).mean())
    print(f"same cells, 100-gene panel model vs full panel model: {agreement:.3f} agreement")
    assert agreement > 0.5


def _check_evaluations(instance: dg.DagsterInstance, run_id: str) -> dict[str, dg.AssetCheckEvaluation]:
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    return {e.dagster_event.event_specific_data.check_name: e.dagster_event.event_specific_data for e in events}


def test_gene_overlap_compares_with_the_own_panels_model(platform):
    panel = platform.panel_of(SUBSET)
    # when the sample landed its panel had no model yet: the check compared with the panel's genes
    (landing_run,) = [r for r in platform.initial_runs if r.job == "samples_job" and r.partition == SUBSET]
    first = _check_evaluations(platform.instance, landing_run.run_id)["spatial_cells_gene_overlap"]
    assert first.passed and first.metadata["compared_with"].value == f"panel {panel} (no model trained for it yet)"
    # now the check compares with that panel's model (run alone: the asset is not re-materialized)
    key = dg.AssetCheckKey(dg.AssetKey("spatial_cells"), "spatial_cells_gene_overlap")
    job = platform.defs.resolve_job_def("samples_job").get_subset(asset_selection=set(), asset_check_selection={key})
    result = job.execute_in_process(instance=platform.instance, partition_key=SUBSET)
    (check,) = result.get_asset_check_evaluations()
    assert check.passed
    assert check.metadata["compared_with"].value == f"celltype_model[{panel}]"
    assert check.metadata["required_genes"].value == len(platform.card(panel)["genes"])
    assert check.metadata["overlap_fraction"].value == 1.0


def test_metadata_keys_do_not_collide(platform):
    ref = platform.latest_metadata("reference_atlas", "poa")
    record = json.loads(platform.store.read_bytes("assets/reference_atlas/poa.json"))
    prov = platform.annotations(SLICES[0]).uns["provenance"]
    assert ref["reference_sha256"] == record["sha256"] == prov["references"]["poa"]["sha256"]
    assert ref["reference_uri"] == platform.store.uri(REF_URI_KEY)
    # `sha256` / `uri` are the IO manager's: the JSON record it stored
    import hashlib

    assert ref["sha256"] == hashlib.sha256(platform.store.read_bytes("assets/reference_atlas/poa.json")).hexdigest()
    assert ref["sha256"] != ref["reference_sha256"]
    # the domain model zip is the IO manager's object: its sha256 is in the card beside it
    dm = platform.latest_metadata("domain_model")
    card = json.loads(platform.store.read_bytes("assets/domain_model.zip.card.json"))
    assert dm["sha256"] == card["sha256"] == hashlib.sha256(platform.store.read_bytes("assets/domain_model.zip")).hexdigest()
    # the cell-typing model: the IO manager's sha256 / format beside the asset's decision entries
    panel = platform.panel_of(SLICES[0])
    model_meta = platform.latest_metadata("celltype_model", panel)
    assert model_meta["format"] == "model" and model_meta["sha256"] == platform.card(panel)["sha256"]
    assert {"confidence_threshold_same_platform", "cv_scores", "coverage_accuracy_curve", "plot_coverage_accuracy"} <= set(model_meta)


def test_parquet_assets_carry_column_schema_and_row_count(platform):
    panel = platform.panel_of(SLICES[0])
    for key, partition in [("label_mapping", panel), ("cell_type_summary", SLICES[0]),
                           ("domain_composition", SLICES[0]), ("domain_markers", SLICES[0]),
                           ("spatially_variable_genes", SLICES[0])]:
        meta = platform.latest_metadata(key, partition)
        table = pd.read_parquet(platform.store.get_file(f"assets/{key}/{partition}.parquet"))
        schema = meta["dagster/column_schema"]
        assert [c.name for c in schema.columns] == list(table.columns), key
        assert meta["dagster/row_count"] == len(table) > 0, key


def test_audit_shows_chain(platform):
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = run_audit(SLICES[0], store=platform.store, s3_settings=platform.storage.s3_settings(), check_files=True)
    text = buf.getvalue()
    assert code == 0, text
    assert "reference poa" in text and f"panel {platform.panel_of(SLICES[0])}" in text and "up to date" in text
    assert f"(file at s3://{platform.bucket}/{REF_URI_KEY})" in text


def test_tampered_model_is_refused(platform):
    key = f"assets/celltype_model/{platform.panel_of(SLICES[0])}.pkl"
    original = platform.store.read_bytes(key)
    platform.store.write_bytes(key, original[:-1] + bytes([original[-1] ^ 1]))
    try:
        result = platform.defs.resolve_job_def("celltyping_job").execute_in_process(
            instance=platform.instance, partition_key=SLICES[0], raise_on_error=False
        )
        assert not result.success
        messages = " ".join(str(e.event_specific_data.error) for e in result.all_events if e.is_step_failure)
        assert "sha256" in messages
    finally:
        platform.store.write_bytes(key, original)


def test_one_panels_model_change_reannotates_only_its_samples(platform):
    subset_panel = platform.panel_of(SUBSET)
    before = platform.counts("cell_type_annotations")
    old_sha = platform.card(subset_panel)["sha256"]
    # a really different model of that panel: retrained with another seed (same training set)
    reseeded = build_definitions({**platform.resources, "settings": PlatformSettings(n_domains=4, seed=1)})
    reseeded.resolve_job_def("panel_models_job").execute_in_process(
        instance=platform.instance, partition_key=subset_panel, asset_selection=[dg.AssetKey("celltype_model")]
    )
    assert platform.card(subset_panel)["sha256"] != old_sha
    on_subset_panel = {s for s in platform.samples() if platform.counts("sample_panel").get(s) and platform.panel_of(s) == subset_panel}
    # the audit compares each sample with the model of its own panel: only the subset's calls are stale
    with redirect_stdout(io.StringIO()):
        assert run_audit(SLICES[0], store=platform.store, check_files=False) == 0
        assert run_audit(SUBSET, store=platform.store, check_files=False) == 3
    runs = platform.daemon.run_until_quiet()
    annotated = {r.partition for r in runs if "cell_type_annotations" in r.assets}
    assert annotated == on_subset_panel == {SUBSET}
    after = platform.counts("cell_type_annotations")
    assert {s: n for s, n in after.items() if s != SUBSET} == {s: n for s, n in before.items() if s != SUBSET}
    assert after[SUBSET] == before[SUBSET] + 1
    assert all(r.success for r in runs)
    with redirect_stdout(io.StringIO()):
        assert run_audit(SUBSET, store=platform.store, check_files=False) == 0


def test_new_sample_flows_by_itself_on_its_panels_model(platform):
    panel = platform.panel_of(SLICES[1])
    models_before = platform.counts("celltype_model")
    domain_model_before = platform.counts("domain_model")
    extra = platform.merfish[platform.merfish.obs["Bregma"] == platform.merfish.obs["Bregma"].max()][:2000].copy()
    landed = platform.land("poa_c", extra, platform.tmp, replace=True)
    assert landed["panel_id"] == panel
    runs = platform.daemon.run_until_quiet()
    assert {r.partition for r in runs} == {"poa_c"}, runs
    assert {a for r in runs for a in r.assets} >= {"spatial_cells", "sample_panel", "cell_type_annotations",
                                                   "cell_type_summary", "spatial_domains", "domain_composition",
                                                   "spatially_variable_genes"}
    assert platform.counts("celltype_model") == models_before  # its panel's model is reused
    assert platform.counts("domain_model") == domain_model_before  # the shared domain model too
    assert platform.annotations("poa_c").uns["provenance"]["model"]["sha256"] == platform.card(panel)["sha256"]
    new = ad.read_h5ad(platform.store.get_file("assets/spatial_domains/poa_c.h5ad"))
    old = ad.read_h5ad(platform.store.get_file(f"assets/spatial_domains/{SLICES[1]}.h5ad"))
    assert new.uns["domain_model_sha256"] == old.uns["domain_model_sha256"]
    agreement = float((new.obs["domain"].astype(str) == old.obs.loc[new.obs_names, "domain"].astype(str)).mean())
    print(f"domain agreement of re-landed cells: {agreement:.3f}")
    assert agreement >= 0.7


def test_reference_update_flows_to_models_annotations_summaries_and_domains(platform):
    ref = ad.read_h5ad(REF)
    platform.write_reference(ref[ref.obs["cell_type"] != "Fibroblast"].copy(), platform.tmp)
    # the nightly schedule sees the same change (an edit made outside the platform)
    schedule = platform.defs.resolve_schedule_def("nightly_reference_reobservation")
    with dg.build_schedule_context(instance=platform.instance, resources=platform.resources) as ctx:
        assert [r.partition_key for r in schedule(ctx)] == ["poa"]
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert run_audit(SLICES[0], store=platform.store, s3_settings=platform.storage.s3_settings()) == 3
    assert "STALE" in buf.getvalue()
    spatial_domains_before = platform.counts("spatial_domains")
    runs = platform.daemon.run_until_quiet()
    assert all(r.success for r in runs)
    touched = {(a, r.partition) for r in runs for a in r.assets}
    annotated = {s for s in platform.samples() if platform.counts("sample_panel").get(s)}
    assert ("reference_atlas", "poa") in touched
    for pid in platform.instance.get_dynamic_partitions("panels"):
        assert {("training_set", pid), ("celltype_model", pid)} <= touched
        assert "Fibroblast" not in platform.card(pid)["classes"]
    for sid in annotated:
        for key in ("cell_type_annotations", "cell_type_summary", "domain_composition"):
            assert (key, sid) in touched, (key, sid)
    assert platform.counts("spatial_domains") == spatial_domains_before  # domains do not depend on the reference
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert run_audit(SLICES[0], store=platform.store, s3_settings=platform.storage.s3_settings()) == 0


def test_failing_normalization_check_blocks_the_sample(platform):
    zscored = platform.merfish[:1500].copy()
    X = np.log1p(zscored.X.toarray() if hasattr(zscored.X, "toarray") else zscored.X)
    zscored.X = ((X - X.mean(0)) / (X.std(0) + 1e-6)).astype(np.float32)
    platform.land("poa_zscored", zscored, platform.tmp, replace=True)
    panels_before = set(platform.instance.get_dynamic_partitions("panels"))
    runs = platform.daemon.run_until_quiet()
    assert {r.partition for r in runs} == {"poa_zscored"}
    (landing_run,) = [r for r in runs if r.job == "samples_job"]
    check = _check_evaluations(platform.instance, landing_run.run_id)["spatial_cells_normalization"]
    assert not check.passed and check.metadata["x_state"].value == "negative"
    assert "poa_zscored" in platform.counts("spatial_cells")  # a blocking check still writes the asset it checks
    assert "poa_zscored" not in platform.counts("sample_panel")
    assert "poa_zscored" not in platform.counts("cell_type_annotations")
    assert not platform.store.exists("assets/cell_type_annotations/poa_zscored.h5ad")
    assert set(platform.instance.get_dynamic_partitions("panels")) == panels_before


def _table_rows(value) -> list[dict]:
    return [dict(r.data) for r in value.records]


def test_model_materialization_records_regularisation_thresholds_rare_classes_and_curve(platform):
    for panel in sorted(platform.instance.get_dynamic_partitions("panels")):
        meta = platform.latest_metadata("celltype_model", panel)
        card = platform.card(panel)
        decisions = card["decisions"]
        assert meta["decisions"] == json.loads(json.dumps(decisions))  # the card and the UI say the same
        # regularisation: requested auto, chosen by CV among the values the CV table shows
        assert meta["reg_per_cell_requested"] == "auto" == decisions["regularization"]["requested"]
        cv = _table_rows(meta["cv_scores"])
        assert len(cv) == len(card["cross_validation"]["grid"]) >= 2
        top = max(cv, key=lambda r: r["held_out_balanced_accuracy"])
        tied = [r for r in cv if r["held_out_balanced_accuracy"] >= top["held_out_balanced_accuracy"] - top["held_out_balanced_accuracy_se"]]
        best = min(tied, key=lambda r: r["held_out_nll_class_balanced"])
        assert "same_platform" in best["chosen_for"]
        assert decisions["regularization"]["chosen"]["same_platform"]["cv_reg_per_cell"] == best["reg_per_cell"]
        assert meta["reg_per_cell_same_platform"] > 0 and meta["reg_per_cell_shifted"] > 0
        assert "stratified CV" in meta["regularization_why"] and "one-standard-error" in meta["regularization_why"]
        assert meta["cv_grid"] and float(meta["cv_grid"].split(", ")[0]) >= float(meta["cv_grid"].split(", ")[-1])
        # threshold per model with its expected coverage and target precision
        assert meta["target_precision"] == 0.9
        for regime in ("same_platform", "shifted"):
            assert 0.0 < meta[f"confidence_threshold_{regime}"] < 1.0
            assert 0.0 <= meta[f"expected_coverage_{regime}"] <= 1.0
            assert meta[f"confidence_threshold_{regime}"] == card["regimes"][regime]["threshold"]["threshold"]
        assert meta["threshold_verified_same_platform"] and not meta["threshold_verified_shifted"]
        # rare classes flagged (names and count agree with the card's per-class counts)
        rare = sorted(k for k, n in card["n_cells_per_class"].items() if n < 10)
        assert meta["n_rare_classes"] == len(rare) and meta["rare_classes"] == (", ".join(rare) or "none")
        # the coverage-accuracy curve as a table, and as a plot stored beside the model
        curve = _table_rows(meta["coverage_accuracy_curve"])
        assert {r["regime"] for r in curve} == {"same_platform", "shifted"}
        assert all(0 <= r["unassigned_fraction"] <= 1 and 0 <= r["assigned_accuracy"] <= 1 for r in curve)
        same = sorted((r for r in curve if r["regime"] == "same_platform"), key=lambda r: r["threshold"])
        assert [r["unassigned_fraction"] for r in same] == sorted(r["unassigned_fraction"] for r in same)
        assert "data:image/png;base64," in meta["plot_coverage_accuracy"]
        print(f"model {panel}: reg_per_cell same_platform {meta['reg_per_cell_same_platform']:g} / shifted "
              f"{meta['reg_per_cell_shifted']:g}; thresholds {meta['confidence_threshold_same_platform']:.3f} "
              f"(coverage {meta['expected_coverage_same_platform']:.3f}) / {meta['confidence_threshold_shifted']:.3f} "
              f"(coverage {meta['expected_coverage_shifted']:.3f}); rare: {meta['rare_classes']}")
        png = platform.store.read_bytes(f"assets/celltype_model/{panel}.plots/coverage_accuracy.png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_annotation_materialization_records_the_shift_decision(platform):
    for sid in [*SLICES, SUBSET]:
        meta = platform.latest_metadata("cell_type_annotations", sid)
        adata = platform.annotations(sid)
        info, prov = adata.uns["celltyping"], adata.uns["provenance"]
        card = platform.card(platform.panel_of(sid))
        # the index is recorded and the regime / alignment follow it
        assert np.isfinite(meta["shift_index"]) and meta["shift_index"] == pytest.approx(float(info["shift_index"]))
        assert meta["platform_shift"] == (meta["shift_index"] > meta["shift_index_threshold"])
        assert meta["regime"] == ("shifted" if meta["platform_shift"] else "same_platform") == info["regime"]
        assert meta["alignment_requested"] == "auto"
        assert meta["alignment"] == ("recenter" if meta["platform_shift"] else "none") == info["alignment"]
        assert meta["regime_reason"].startswith(f"shift index {meta['shift_index']:.3f}")
        # the model's threshold for that regime, flagged unverified when a shift was detected
        expected = card["regimes"][meta["regime"]]["threshold"]
        assert 0.0 < meta["confidence_threshold"] < 1.0 and meta["confidence_threshold"] == expected["threshold"]
        assert meta["threshold_expected_coverage"] == expected["expected_coverage"]
        assert meta["threshold_target_precision"] == 0.9
        assert meta["threshold_verified"] == (not meta["platform_shift"] and expected["target_reached"])
        if meta["platform_shift"]:
            assert "unverified" in meta["threshold_note"]
        # the same decisions in the AnnData's uns (provenance) as in the UI
        assert prov["decisions"]["regime"] == meta["regime"] and bool(prov["threshold_verified"]) == meta["threshold_verified"]
        assert float(prov["shift_index"]) == pytest.approx(meta["shift_index"])
        unassigned = float((adata.obs["cell_type"] == "Unassigned").mean())
        assert meta["unassigned_fraction"] == pytest.approx(unassigned)
        print(f"{sid}: shift index {meta['shift_index']:.3f} -> {meta['regime']}, alignment {meta['alignment']}, "
              f"threshold {meta['confidence_threshold']:.3f} (expected coverage {meta['threshold_expected_coverage']:.3f}, "
              f"verified {meta['threshold_verified']}), Unassigned {unassigned:.3f}")
    # the POA scRNA-seq reference against MERFISH slices: a platform shift (index ~0.4)
    assert platform.latest_metadata("cell_type_annotations", SLICES[0])["platform_shift"]


def test_reg_per_cell_and_alignment_settings_reach_the_assets(platform):
    """Run last in this module: it retrains one panel's model with other settings, then restores it."""
    panel = platform.panel_of(SUBSET)
    other = build_definitions({**platform.resources, "settings": PlatformSettings(n_domains=4, reg_per_cell="0.02", alignment="none")})
    try:
        other.resolve_job_def("panel_models_job").execute_in_process(
            instance=platform.instance, partition_key=panel, asset_selection=[dg.AssetKey("celltype_model")]
        )
        meta = platform.latest_metadata("celltype_model", panel)
        assert meta["reg_per_cell_requested"] == "[0.02]" and platform.card(panel)["platform_settings"]["reg_per_cell"] == "0.02"
        assert "given by the caller" in meta["regularization_why"]
        other.resolve_job_def("celltyping_job").execute_in_process(
            instance=platform.instance, partition_key=SUBSET, asset_selection=[dg.AssetKey("cell_type_annotations")]
        )
        ann = platform.latest_metadata("cell_type_annotations", SUBSET)
        assert ann["alignment_requested"] == "none" and ann["alignment"] == "none"
        assert ann["reg_per_cell"] == "[0.02]"
        assert platform.annotations(SUBSET).uns["provenance"]["settings"]["alignment"] == "none"
    finally:  # back to the deployment's settings, and let the sensors bring the platform to rest
        # a tick first: the hand-made annotation run must be seen as handled before the model changes again
        assert all(r.success for r in platform.daemon.run_until_quiet())
        platform.defs.resolve_job_def("panel_models_job").execute_in_process(
            instance=platform.instance, partition_key=panel, asset_selection=[dg.AssetKey("celltype_model")]
        )
        assert all(r.success for r in platform.daemon.run_until_quiet())
    assert platform.latest_metadata("celltype_model", panel)["reg_per_cell_requested"] == "auto"
    assert platform.latest_metadata("cell_type_annotations", SUBSET)["alignment_requested"] == "auto"
