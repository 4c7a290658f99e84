"""Raw instrument folders on the platform, end to end on a real S3 server (SeaweedFS), run by its sensors.

The module fixture starts from an empty instance: the POA reference is registered and the real
MERSCOPE crop (``data/raw/merscope_mouse_brain_mini``) is landed as a folder with the function
``spatial-assets sample land`` uses; then the real sensors (reference manifest, sample landing,
declarative automation) are ticked and every run they request is launched until nothing more is
requested. Nothing is materialized by hand: the folder must flow raw_sample → segmented_cells
(+ cell_boundaries, transcript_assignments) → cell_qc → spatial_cells → annotations / domains by
itself. The expected numbers are computed in the test from the segmentation package on the local
copy of the folder (same reader, same method), not written down.

Each test reads that state or changes it and lets the sensors bring it back to rest, so each passes
when run alone and in any order. Samples land one at a time (one partition per automation tick).
"""

import hashlib
import io
import json
import shutil
import uuid
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import anndata as ad
import dagster as dg
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from dagster_aws.s3 import S3Resource

from spatial_assets.cli.audit import run_audit
from spatial_assets.definitions import build_definitions
from spatial_assets.defs.io_managers import S3AssetIOManager
from spatial_assets.defs.resources import S3StorageResource
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.manifest import ReferenceEntry
from spatial_assets.platform.panels import panel_id
from spatial_assets.platform.registry import land_sample, register_reference
from spatial_assets.core.spatial import panel_genes
from spatial_assets.segmentation.pipeline import segment
from spatial_assets.segmentation.qc import QCFilters, cell_qc
from spatial_assets.segmentation.readers import read_sample
from spatial_assets.storage.seaweed import ensure_bucket
from spatial_assets_tests.defs.ticking import LocalDaemon

warnings.filterwarnings("ignore", category=dg.PreviewWarning)
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", message=r".*(signature genes absent|signatures dropped).*")

DATA = Path(__file__).resolve().parents[2] / "data"
REF = DATA / "mouse_POA_scRNA_ref_Moffitt2018.h5ad"
MERSCOPE = DATA / "raw" / "merscope_mouse_brain_mini"
FIRST, SECOND = "merscope_a", "merscope_b"
REF_KEY = "raw/references/poa.h5ad"
RAW_ASSETS = ("raw_sample", "segmented_cells", "cell_boundaries", "transcript_assignments", "cell_qc")
DOWNSTREAM = ("spatial_cells", "sample_panel", "cell_type_annotations", "cell_type_summary",
              "spatial_domains", "domain_composition", "domain_markers")


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
        self.settings = PlatformSettings(confidence_threshold=0.5, n_domains=4)  # segmentation: the default (vendor)
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

    def counts(self, key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.instance.fetch_materializations(dg.AssetKey(key), limit=10_000).records:
            out[r.partition_key] = out.get(r.partition_key, 0) + 1
        return out

    def all_counts(self) -> dict[str, dict[str, int]]:
        keys = [k.to_user_string() for k in self.defs.resolve_asset_graph().get_all_asset_keys()]
        return {k: self.counts(k) for k in keys}

    def latest_metadata(self, key: str, partition: str | None = None) -> dict:
        flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None)
        (record,) = self.instance.fetch_materializations(flt, limit=1).records
        return {k: v.value for k, v in record.asset_materialization.metadata.items()}

    def h5ad(self, asset: str, sample_id: str) -> ad.AnnData:
        return ad.read_h5ad(self.store.get_file(f"assets/{asset}/{sample_id}.h5ad"))

    def audit(self, sample_id: str, check_files: bool = True) -> tuple[int, str]:
        buf = io.StringIO()
        with redirect_stdout(buf):
            code = run_audit(sample_id, store=self.store, s3_settings=self.storage.s3_settings(), check_files=check_files)
        return code, buf.getvalue()

    def upload_folder(self, folder: Path, sample_id: str) -> None:
        """A folder copied into the landing area by hand (as `aws s3 cp --recursive` would): no validation."""
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                self.store.put_file(p, f"landing/samples/{sample_id}/{p.relative_to(folder).as_posix()}")


def _failure_messages(instance: dg.DagsterInstance, run_id: str) -> str:
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    return " ".join(str(e.dagster_event.event_specific_data.error) for e in events)


def _check_evaluations(instance: dg.DagsterInstance, run_id: str) -> dict[str, dg.AssetCheckEvaluation]:
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    return {e.dagster_event.event_specific_data.check_name: e.dagster_event.event_specific_data for e in events}


@pytest.fixture(scope="module")
def expected():
    """What the segmentation package gives on the local folder (the platform must give the same)."""
    sample = read_sample(MERSCOPE)
    result = segment(sample)  # the default method: the vendor's cells (the folder has them)
    qc, report = cell_qc(result.cells, QCFilters())
    return {"sample": sample, "result": result, "qc": qc, "report": report}


@pytest.fixture(scope="module")
def platform(s3_settings, tmp_path_factory):
    bucket = f"segplat-{uuid.uuid4().hex[:12]}"
    ensure_bucket(s3_settings, bucket)
    tmp = tmp_path_factory.mktemp("segplat")
    with dg.instance_for_test() as instance:
        p = Platform(s3_settings, bucket, tmp / "cache", instance)
        p.tmp = tmp
        assert p.daemon.run_until_quiet() == []
        ref_path = tmp / "ref.h5ad"
        shutil.copyfile(REF, ref_path)
        p.store.put_file(ref_path, REF_KEY)
        register_reference(p.store, ReferenceEntry(id="poa", uri=p.store.uri(REF_KEY), label_column="cell_type"),
                           s3_settings=p.storage.s3_settings())
        p.landed = land_sample(p.store, FIRST, str(MERSCOPE))  # what `spatial-assets sample land --id merscope_a DIR` does
        p.initial_runs = p.daemon.run_until_quiet()
        for r in p.initial_runs:
            print(f"{r.seconds:6.1f}s {r.sensor:28s} {r.job:18s} {r.partition}  {','.join(r.assets)}")
        yield p


def test_landing_a_folder_uploads_it_as_is(platform):
    landed = platform.landed
    assert landed["kind"] == "raw" and landed["platform"] == "merscope"
    assert landed["uri"] == f"s3://{platform.bucket}/landing/samples/{FIRST}/"
    local = sorted(p.relative_to(MERSCOPE).as_posix() for p in MERSCOPE.rglob("*") if p.is_file())
    stored = sorted(o.key[len(f"landing/samples/{FIRST}/"):] for o in platform.store.list(f"landing/samples/{FIRST}/"))
    assert stored == local and landed["n_files"] == len(local)
    for rel in local:
        assert platform.store.read_bytes(f"landing/samples/{FIRST}/{rel}") == (MERSCOPE / rel).read_bytes()


def test_raw_folder_flows_to_annotations_and_domains_by_itself(platform):
    runs = platform.initial_runs
    assert all(r.success for r in runs), [r for r in runs if not r.success]
    landing = [r for r in runs if r.sensor == "sample_landing_sensor"]
    assert [(r.job, r.partition) for r in landing] == [("raw_samples_job", FIRST)]
    assert set(landing[0].assets) == set(RAW_ASSETS)
    automated = {(a, r.partition) for r in runs if r.sensor == "spatial_assets_automation" for a in r.assets}
    for key in DOWNSTREAM:
        assert (key, FIRST) in automated, key
    panel = json.loads(platform.store.read_bytes(f"assets/sample_panel/{FIRST}.json"))["panel_id"]
    for key in ("gene_panel", "training_set", "celltype_model"):
        assert (key, panel) in automated, key
    assert ("domain_model", None) in automated
    # each step once: nothing was computed twice on the way
    for key in (*RAW_ASSETS, *DOWNSTREAM, "celltype_model", "domain_model"):
        assert all(n == 1 for n in platform.counts(key).values()), (key, platform.counts(key))


def test_segmented_cells_boundaries_and_transcripts_are_the_segmentations(platform, expected):
    result = expected["result"]
    cells = platform.h5ad("segmented_cells", FIRST)
    assert list(cells.obs_names) == list(result.cells.obs_names)
    assert (cells.X != result.cells.X).nnz == 0
    np.testing.assert_allclose(cells.obsm["spatial"], result.cells.obsm["spatial"])
    assert {"area_um2", "nucleus_area_um2", "n_transcripts", "n_genes"} <= set(cells.obs.columns)
    seg = cells.uns["segmentation"]
    assert (seg["platform"], seg["method"]) == ("merscope", "vendor")
    assert seg["versions"]["sopa"] and seg["cells_sha256"]
    raw = cells.uns["raw_sample"]
    local = {p.relative_to(MERSCOPE).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in MERSCOPE.rglob("*") if p.is_file()}
    assert dict(zip(raw["files"]["path"], raw["files"]["sha256"])) == local
    meta = platform.latest_metadata("segmented_cells", FIRST)
    assert meta["n_cells"] == cells.n_obs and meta["method"] == "vendor" and meta["format"] == "h5ad"
    assert meta["assigned_fraction"] == pytest.approx(result.summary["assigned_fraction"])
    # the outlines, as GeoParquet, one per cell
    key = f"assets/cell_boundaries/{FIRST}.parquet"
    boundaries = gpd.read_parquet(platform.store.get_file(key))
    assert isinstance(boundaries, gpd.GeoDataFrame) and list(boundaries.columns) == ["cell_id", "geometry"]
    assert set(boundaries["cell_id"]) == set(cells.obs_names)
    np.testing.assert_allclose(boundaries.set_index("cell_id").loc[cells.obs_names].area.to_numpy(), cells.obs["area_um2"].to_numpy())
    assert platform.latest_metadata("cell_boundaries", FIRST)["format"] == "geoparquet"
    # one row per input transcript, its cell an obs name or null
    tx = pd.read_parquet(platform.store.get_file(f"assets/transcript_assignments/{FIRST}.parquet"))
    assert len(tx) == len(expected["sample"].transcripts) and (tx["transcript_index"].to_numpy() == np.arange(len(tx))).all()
    assigned = tx["cell_id"].dropna().astype(str)
    assert set(assigned) <= set(cells.obs_names)
    assert len(assigned) / len(tx) == pytest.approx(result.summary["assigned_fraction"])
    per_cell = assigned.value_counts().reindex(cells.obs_names, fill_value=0)
    assert (per_cell.to_numpy() == cells.obs["n_transcripts"].to_numpy()).all()
    meta = platform.latest_metadata("transcript_assignments", FIRST)
    assert meta["dagster/row_count"] == len(tx)
    assert [c.name for c in meta["dagster/column_schema"].columns] == list(tx.columns)


def test_cell_qc_filters_and_checks_then_spatial_cells_reads_it(platform, expected):
    qc = platform.h5ad("cell_qc", FIRST)
    report = expected["report"]
    assert list(qc.obs_names) == list(expected["qc"].obs_names)
    assert qc.n_obs == report["n_cells_out"] < report["n_cells_in"] == platform.h5ad("segmented_cells", FIRST).n_obs
    assert qc.obs["qc_pass"].all() and (qc.obs["total_counts"] >= QCFilters().min_counts).all()
    meta = platform.latest_metadata("cell_qc", FIRST)
    assert meta["n_cells_in"] == report["n_cells_in"] and meta["n_cells_out"] == report["n_cells_out"]
    assert meta["control_fraction"] == pytest.approx(report["control_fraction"])
    for name in ("qc_histograms", "segmentation_overlay"):  # figures beside the object, thumbnails in the metadata
        png = platform.store.read_bytes(f"assets/cell_qc/{FIRST}.plots/{name}.png")
        assert png.startswith(b"\x89PNG") and len(png) > 5000
        assert f"plot_{name}" in meta
    (run,) = [r for r in platform.initial_runs if r.job == "raw_samples_job"]
    checks = _check_evaluations(platform.instance, run.run_id)
    assert checks["cell_qc_invariants"].passed and checks["cell_qc_invariants"].metadata["no_empty_cells"].value == 0
    fractions = checks["cell_qc_fractions"]
    assert fractions.passed and fractions.severity == dg.AssetCheckSeverity.WARN
    assert fractions.metadata["assigned_fraction"].value == pytest.approx(expected["result"].summary["assigned_fraction"])
    assert fractions.metadata["control_fraction"].value == pytest.approx(report["control_fraction"])
    spatial = platform.h5ad("spatial_cells", FIRST)
    assert list(spatial.obs_names) == list(qc.obs_names) and (spatial.X != qc.X).nnz == 0
    sc_meta = platform.latest_metadata("spatial_cells", FIRST)
    assert sc_meta["sample_kind"] == "raw" and sc_meta["segmentation_method"] == "vendor"
    assert sc_meta["landing_uri"] == f"s3://{platform.bucket}/landing/samples/{FIRST}/"


def test_annotated_with_its_own_panels_model_and_given_domains(platform):
    spatial = platform.h5ad("spatial_cells", FIRST)
    panel = json.loads(platform.store.read_bytes(f"assets/sample_panel/{FIRST}.json"))
    assert panel["panel_id"] == panel_id(panel_genes(spatial))
    card = json.loads(platform.store.read_bytes(f"assets/celltype_model/{panel['panel_id']}.pkl.card.json"))
    reference = ad.read_h5ad(REF, backed="r")
    shared = set(reference.var_names) & set(panel_genes(spatial))
    assert set(card["genes"]) == shared and len(shared) > 20  # the POA reference shares part of this panel
    annotations = platform.h5ad("cell_type_annotations", FIRST)
    assert annotations.n_obs == spatial.n_obs
    calls = annotations.obs["cell_type"].astype(str)
    assert calls.nunique() >= 3, calls.value_counts()
    domains = platform.h5ad("spatial_domains", FIRST)
    assert domains.n_obs == spatial.n_obs and domains.obs["domain"].nunique() >= 2


def test_lineage_raw_files_to_annotations_and_audit(platform):
    prov = platform.annotations_prov = platform.h5ad("cell_type_annotations", FIRST).uns["provenance"]
    assert prov["raw"]["platform"] == "merscope" and prov["segmentation"]["method"] == "vendor"
    assert prov["segmentation"]["cells_sha256"] == platform.h5ad("segmented_cells", FIRST).uns["segmentation"]["cells_sha256"]
    record = json.loads(platform.store.read_bytes(f"assets/raw_sample/{FIRST}.json"))
    assert dict(zip(prov["raw"]["files"]["path"], prov["raw"]["files"]["sha256"])) == {
        rel: f["sha256"] for rel, f in record["files"].items()
    }
    assert prov["cell_qc"]["n_cells_out"] == platform.h5ad("cell_qc", FIRST).n_obs
    code, text = platform.audit(FIRST)
    assert code == 0, text
    assert f"raw folder s3://{platform.bucket}/landing/samples/{FIRST}/ (merscope, {len(record['files'])} files)" in text
    assert "-> segmentation  method=vendor platform=merscope" in text and "-> cell QC" in text
    assert "[ok] raw file detected_transcripts.csv (registered)" in text
    assert "[ok] segmentation (segmented_cells)" in text and "up to date" in text
    # a raw file re-landed with other bytes: STALE before anything is re-run, naming the file
    key = f"landing/samples/{FIRST}/images/micron_to_mosaic_pixel_transform.csv"
    original = platform.store.read_bytes(key)
    platform.store.write_bytes(key, original + b"\n")
    try:
        code, text = platform.audit(FIRST)
        assert code == 3, text
        stale = [line for line in text.splitlines() if line.lstrip().startswith("[STALE]")]
        assert len(stale) == 1 and "raw file images/micron_to_mosaic_pixel_transform.csv (file at s3://" in stale[0], stale
        assert platform.audit(FIRST, check_files=False)[0] == 0  # the registered record has not changed (yet)
    finally:
        platform.store.write_bytes(key, original)  # same bytes, same ETag: nothing for the sensor to do
    assert platform.audit(FIRST)[0] == 0
    assert platform.daemon.run_until_quiet() == []


def _ensure_landed(platform, sample_id: str) -> None:
    if sample_id not in platform.counts("raw_sample"):
        land_sample(platform.store, sample_id, str(MERSCOPE))
        assert all(r.success for r in platform.daemon.run_until_quiet())


def test_second_raw_sample_runs_only_its_own_partitions(platform):
    # SECOND, unless the re-landing test landed it already (each test passes alone and in any order)
    sid = SECOND if SECOND not in platform.counts("raw_sample") else SECOND + "_fresh"
    before = platform.all_counts()
    land_sample(platform.store, sid, str(MERSCOPE))
    runs = platform.daemon.run_until_quiet()
    assert all(r.success for r in runs), [r for r in runs if not r.success]
    assert {r.partition for r in runs} == {sid}, runs
    assert {a for r in runs for a in r.assets} >= {*RAW_ASSETS, *DOWNSTREAM}
    after = platform.all_counts()
    for key, parts in after.items():
        # the first sample, the panel's model and the shared domain model: not re-materialized
        assert {p: n for p, n in parts.items() if p != sid} == before.get(key, {}), key
    for key in (*RAW_ASSETS, *DOWNSTREAM):
        assert after[key][sid] == 1, key
    # same bytes, same cells: the segmentation is deterministic across samples
    a, b = platform.h5ad("spatial_cells", FIRST), platform.h5ad("spatial_cells", sid)
    assert a.uns["content_sha256"] == b.uns["content_sha256"]
    assert (platform.h5ad("cell_type_annotations", FIRST).obs["cell_type"].astype(str).to_numpy()
            == platform.h5ad("cell_type_annotations", sid).obs["cell_type"].astype(str).to_numpy()).all()


def test_a_relanded_folder_with_other_bytes_is_stale_then_runs_again(platform, tmp_path):
    _ensure_landed(platform, SECOND)
    old = json.loads(platform.store.read_bytes(f"assets/raw_sample/{SECOND}.json"))
    changed = tmp_path / "relanded"
    shutil.copytree(MERSCOPE, changed)
    rel = "images/micron_to_mosaic_pixel_transform.csv"
    (changed / rel).write_bytes((MERSCOPE / rel).read_bytes() + b"\n")  # same transform, other bytes
    with pytest.raises(Exception, match="has already landed"):
        land_sample(platform.store, SECOND, str(changed))  # not without --replace
    before = platform.all_counts()
    land_sample(platform.store, SECOND, str(changed), replace=True)
    code, text = platform.audit(SECOND)  # before any run: the file in the landing area differs from the record
    assert code == 3, text
    stale = [line for line in text.splitlines() if line.lstrip().startswith("[STALE]")]
    assert len(stale) == 1 and f"raw file {rel} (file at s3://{platform.bucket}/landing/samples/{SECOND}/{rel})" in stale[0], stale
    runs = platform.daemon.run_until_quiet()
    assert all(r.success for r in runs), [r for r in runs if not r.success]
    assert {r.partition for r in runs} == {SECOND}, runs
    assert [(r.job, r.sensor) for r in runs if r.sensor == "sample_landing_sensor"] == [("raw_samples_job", "sample_landing_sensor")]
    after = platform.all_counts()
    for key in (*RAW_ASSETS, *DOWNSTREAM):
        assert after[key][SECOND] == before[key][SECOND] + 1, key
    for key, parts in after.items():
        assert {p: n for p, n in parts.items() if p != SECOND} == {p: n for p, n in before.get(key, {}).items() if p != SECOND}, key
    new = json.loads(platform.store.read_bytes(f"assets/raw_sample/{SECOND}.json"))
    assert new["files"][rel]["sha256"] == hashlib.sha256((changed / rel).read_bytes()).hexdigest() != old["files"][rel]["sha256"]
    assert new["landing_fingerprint"] != old["landing_fingerprint"]
    assert {k: v["sha256"] for k, v in new["files"].items() if k != rel} == {k: v["sha256"] for k, v in old["files"].items() if k != rel}
    # the annotations now carry the new file's hash: up to date again
    prov = platform.h5ad("cell_type_annotations", SECOND).uns["provenance"]
    assert dict(zip(prov["raw"]["files"]["path"], prov["raw"]["files"]["sha256"]))[rel] == new["files"][rel]["sha256"]
    code, text = platform.audit(SECOND)
    assert code == 0, text


def _bad_folders(tmp: Path) -> dict[str, tuple[Path, str]]:
    """sample id → (folder, what the failure must say)."""
    unknown = tmp / "unknown"
    unknown.mkdir()
    (unknown / "notes.txt").write_text("not an instrument folder")
    (unknown / "counts.csv").write_text("a,b\n1,2\n")
    no_transform = tmp / "no_transform"
    shutil.copytree(MERSCOPE, no_transform)
    (no_transform / "images" / "micron_to_mosaic_pixel_transform.csv").unlink()
    empty = tmp / "empty"
    shutil.copytree(MERSCOPE, empty)
    (empty / "detected_transcripts.csv").write_text(",gene,global_x,global_y,global_z\n")
    no_image = tmp / "no_image"
    shutil.copytree(MERSCOPE, no_image)
    (no_image / "images" / "mosaic_PolyT_z1.tif").unlink()
    return {
        "bad_image": (no_image, "images: mosaic_PolyT_z1.tif is missing"),
        "bad_unknown": (unknown, "no known platform"),
        "bad_transform": (no_transform, "missing transform file"),
        "bad_empty": (empty, "detected_transcripts.csv: the transcript table is empty"),
    }


def test_bad_raw_folders_fail_only_their_own_partition(platform, expected, tmp_path):
    before = platform.all_counts()
    bad = _bad_folders(tmp_path)
    for sid, (folder, _) in bad.items():
        platform.upload_folder(folder, sid)
    # and, at the same time, the crop segmented offline (`spatial-assets segment`) landed as a cell-level h5ad
    cells_path = tmp_path / "cells.h5ad"
    expected["result"].cells.write_h5ad(cells_path)
    land_sample(platform.store, "merscope_cells", str(cells_path))
    runs = platform.daemon.run_until_quiet()
    by_partition: dict[str, list] = {}
    for r in runs:
        by_partition.setdefault(r.partition, []).append(r)
    for sid, (_, message) in bad.items():
        (run,) = by_partition[sid]
        assert run.job == "raw_samples_job" and not run.success
        error = _failure_messages(platform.instance, run.run_id)
        assert message in error, error
        assert f"s3://{platform.bucket}/landing/samples/{sid}" in error, error  # the file in storage, not a temp copy
        assert platform.store.list(f"assets/raw_sample/{sid}") == []
        written = [o.key for o in platform.store.list("assets/") if o.key.count("/") >= 2 and o.key.split("/")[2].startswith(sid)]
        assert written == [], written
    assert "micron_to_mosaic_pixel_transform.csv" in _failure_messages(platform.instance, by_partition["bad_transform"][0].run_id)
    assert "Each platform needs: xenium:" in _failure_messages(platform.instance, by_partition["bad_unknown"][0].run_id)
    good = by_partition["merscope_cells"]
    assert all(r.success for r in good) and good[0].job == "samples_job"
    assert {a for r in good for a in r.assets} >= set(DOWNSTREAM)
    assert "merscope_cells" not in platform.counts("raw_sample")  # an h5ad is not segmented again
    after = platform.all_counts()
    for key, parts in after.items():
        assert {p: n for p, n in parts.items() if p not in {*bad, "merscope_cells"}} == before.get(key, {}), key
    # the failed ones are not retried in a loop: the next ticks request nothing
    assert platform.daemon.run_until_quiet() == []
