"""The ``settings.panel_genes`` override: every sample on the configured panel, or refused by name."""

import warnings
from pathlib import Path

import anndata as ad
import dagster as dg

from spatial_assets.core.spatial import panel_genes
from spatial_assets.definitions import build_definitions
from spatial_assets.defs.deployment import build_resources
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.panels import panel_id
from spatial_assets.platform.registry import land_sample

warnings.filterwarnings("ignore", category=dg.PreviewWarning)
warnings.filterwarnings("ignore", category=dg.BetaWarning)

MERFISH = Path(__file__).resolve().parents[2] / "data" / "mouse_POA_MERFISH_Moffitt2018.h5ad"


def test_configured_panel_puts_samples_on_it_and_refuses_a_sample_lacking_a_gene(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATIAL_ASSETS_HOME", str(tmp_path))
    merfish = ad.read_h5ad(MERFISH)
    configured = sorted(panel_genes(merfish))[:40]
    resources = {**build_resources("local"), "settings": PlatformSettings(panel_genes=configured)}
    defs = build_definitions(resources)
    store = resources["storage"].get_store()
    full = merfish[:400].copy()
    lacking = merfish[400:800, [g for g in merfish.var_names if g != configured[0]]].copy()
    for sid, adata in [("full", full), ("lacking", lacking)]:
        adata.write_h5ad(tmp_path / f"{sid}.h5ad")
        land_sample(store, sid, str(tmp_path / f"{sid}.h5ad"))
    job = defs.resolve_job_def("samples_job")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("samples", ["full", "lacking"])
        ok = job.execute_in_process(instance=instance, partition_key="full")
        assert ok.success
        refused = job.execute_in_process(instance=instance, partition_key="lacking", raise_on_error=False)
        checks = {e.check_name: e for e in refused.get_asset_check_evaluations()}
        overlap = checks["spatial_cells_gene_overlap"]
        assert not overlap.passed and overlap.metadata["missing_genes"].value == configured[0]
        assert configured[0] in overlap.description
        # the blocking check kept the sample off the panel: no sample_panel, nothing downstream
        materialized = {r.partition_key for r in instance.fetch_materializations(dg.AssetKey("sample_panel"), limit=10).records}
        assert materialized == {"full"}
        assert instance.get_dynamic_partitions("panels") == [panel_id(configured)]
        (record,) = instance.fetch_materializations(dg.AssetKey("sample_panel"), limit=1).records
        meta = record.asset_materialization.metadata
        assert meta["panel_source"].value == "configured" and meta["n_genes"].value == 40
