"""The demo graph on the production instance: ``deploy/dagster.postgres.yaml`` on a real Postgres.

The demo's own code path (``spatial_assets.defs.demo``: the sensors register the partitions, then
reference → training set → model → annotations for two samples), on the local-file deployment,
with every run, event and partition stored in Postgres; then ``spatial-assets audit`` must report
every link of both samples' lineage ok.
"""

from __future__ import annotations

import io
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import anndata as ad
import dagster as dg
import pytest

from spatial_assets.cli.audit import run_audit
from spatial_assets.defs.demo import materialize_all, register_with_sensors
from spatial_assets.platform.manifest import ReferenceEntry, dump_manifest
from spatial_assets_tests.deploy.postgres import PostgresServer

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
N_CELLS = 300  # per sample: the graph, not the science, is under test here


def _stage(store, settings, tmp: Path) -> list[str]:
    store.put_file(DATA / "mouse_POA_scRNA_ref_Moffitt2018.h5ad", "raw/references/poa.h5ad")
    entry = ReferenceEntry(id="poa_moffitt2018", uri=store.uri("raw/references/poa.h5ad"), label_column="cell_type",
                           organism="mouse", placeholder_labels=["Ambiguous", "Unstable"])
    store.write_bytes(settings.manifest_key, dump_manifest([entry]).encode())
    merfish = ad.read_h5ad(DATA / "mouse_POA_MERFISH_Moffitt2018.h5ad")
    samples = []
    for bregma in sorted(merfish.obs["Bregma"].unique()):
        sid = f"poa_bregma_{float(bregma):.2f}"
        merfish[merfish.obs["Bregma"] == bregma][:N_CELLS].copy().write_h5ad(tmp / f"{sid}.h5ad")
        store.put_file(tmp / f"{sid}.h5ad", f"{settings.landing_prefix.rstrip('/')}/{sid}.h5ad")
        samples.append(sid)
    return samples


def test_demo_graph_materializes_on_postgres_and_the_audit_is_all_ok(
    postgres_server: PostgresServer, pg_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spatial_assets.definitions import build_definitions
    from spatial_assets.defs.deployment import build_resources
    from spatial_assets.defs.settings import settings_from_env

    monkeypatch.setenv("SPATIAL_ASSETS_DEPLOYMENT", "local")
    monkeypatch.setenv("SPATIAL_ASSETS_HOME", str(tmp_path / "sa_home"))
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy/dagster.postgres.yaml", home / "dagster.yaml")
    resources = {**build_resources(), "settings": settings_from_env()}
    store = resources["storage"].get_store()
    samples = _stage(store, resources["settings"], tmp_path)
    defs = build_definitions(resources)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        register_with_sensors(defs, instance)
        assert instance.get_dynamic_partitions("references") == ["poa_moffitt2018"]
        assert sorted(instance.get_dynamic_partitions("samples")) == samples
        with redirect_stdout(io.StringIO()):
            materialize_all(defs, instance, samples, ["poa_moffitt2018"], with_domains=False)
        for sid in samples:
            mats = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("cell_type_annotations"), asset_partitions=[sid]), limit=5
            ).records
            assert len(mats) == 1
        runs = instance.get_runs()
        assert runs and {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
    # the runs really are in Postgres (not in a sqlite file beside the yaml)
    conn = postgres_server.connect(pg_env["DAGSTER_PG_DB"])
    try:
        with conn.cursor() as cur:
            cur.execute("select count(*) from runs where status = 'SUCCESS'")
            assert cur.fetchone()[0] == len(runs)
            cur.execute("select count(*) from event_logs where dagster_event_type = 'ASSET_MATERIALIZATION'")
            assert cur.fetchone()[0] >= 4 + 2 * len(samples)
    finally:
        conn.close()
    assert not list(home.glob("**/*.db"))
    for sid in samples:
        out = io.StringIO()
        with redirect_stdout(out):
            code = run_audit(sid, store=store, s3_settings=None)
        report = out.getvalue()
        assert code == 0, report
        assert "status: up to date" in report and "STALE" not in report, report
