"""The per-sample ``spatially_variable_genes`` asset on a real S3 server (SeaweedFS), through the IO manager.

Synthetic tissue made in the test: two genes with a spatial pattern (a patch, a gradient), one gene
with the patch's very values shuffled over the cells (same distribution, no pattern) and pure
noise genes. The asset must rank the patterned genes first and not call the shuffled one.
"""

import warnings

import anndata as ad
import dagster as dg
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.defs.domains.assets import spatially_variable_genes
from spatial_assets.defs.io_managers import S3AssetIOManager
from spatial_assets.defs.partitions import samples_partitions
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.storage.stores import S3Store

warnings.filterwarnings("ignore", category=dg.PreviewWarning)
warnings.filterwarnings("ignore", category=dg.BetaWarning)

SAMPLE = "synth_svg"
N_NOISE = 40


def _tissue(seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    side = 30
    gx, gy = np.meshgrid(np.arange(side, dtype=float), np.arange(side, dtype=float))
    xy = np.column_stack([gx.ravel(), gy.ravel()]) * 10.0 + rng.normal(0, 1.5, (side * side, 2))
    n = xy.shape[0]
    depth = rng.lognormal(0, 0.3, n)  # library sizes vary, as in real cells
    centre = np.array([100.0, 180.0])
    patch = np.where(np.linalg.norm(xy - centre, axis=1) < 80, 8.0, 0.5)
    gradient = 0.3 + 6.0 * xy[:, 0] / xy[:, 0].max()
    counts = {
        "Patch": rng.poisson(patch * depth),
        "Gradient": rng.poisson(gradient * depth),
    }
    counts["Shuffled"] = rng.permutation(counts["Patch"])
    for i in range(N_NOISE):
        counts[f"Noise{i:02d}"] = rng.poisson(rng.uniform(0.5, 5.0) * depth)
    X = sp.csr_matrix(np.column_stack(list(counts.values())).astype(np.float32))
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), var=pd.DataFrame(index=list(counts)))
    a.obsm["spatial"] = xy
    a.uns["content_sha256"] = "synthetic"
    return a


@dg.asset(name="spatial_cells", partitions_def=samples_partitions)
def _spatial_cells() -> ad.AnnData:
    return _tissue()


@pytest.fixture()
def materialized(s3_resource, s3_bucket, s3_settings, tmp_path):
    io_manager = S3AssetIOManager(s3_resource=s3_resource, s3_bucket=s3_bucket, s3_prefix="p/assets", cache_dir=str(tmp_path / "cache"))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("samples", [SAMPLE])
        result = dg.materialize(
            [_spatial_cells, spatially_variable_genes],
            partition_key=SAMPLE,
            instance=instance,
            resources={"io_manager": io_manager, "settings": PlatformSettings(svg_n_top=5)},
        )
        assert result.success
        (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey("spatially_variable_genes")]
        meta = {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}
    store = S3Store(s3_bucket, "p", s3_settings, cache_dir=tmp_path / "store")
    table = pd.read_parquet(store.get_file(f"assets/spatially_variable_genes/{SAMPLE}.parquet"))
    return meta, table


def test_patterned_genes_rank_above_shuffled_and_noise(materialized):
    _, table = materialized
    by_gene = table.set_index("gene")
    assert set(by_gene.loc[["Patch", "Gradient"], "moranI_rank"]) == {1, 2}
    assert (by_gene.loc[["Patch", "Gradient"], "qval"] < 1e-6).all()
    assert by_gene.loc[["Patch", "Gradient"], "moranI"].min() > 0.3
    # the same values without their positions: no spatial signal
    assert by_gene.loc["Shuffled", "moranI_rank"] > 2 and by_gene.loc["Shuffled", "qval"] > 0.05
    noise = by_gene[by_gene.index.str.startswith("Noise")]
    assert (noise["qval"] < 0.05).mean() <= 0.1
    assert noise["moranI"].abs().max() < 0.1
    assert table["spatially_variable"].sum() == 5 and set(by_gene.index[by_gene["spatially_variable"]]) >= {"Patch", "Gradient"}
    assert (table["sample_id"] == SAMPLE).all() and len(table) == N_NOISE + 3


def test_table_metadata_describes_the_stored_parquet(materialized):
    meta, table = materialized
    assert [c.name for c in meta["dagster/column_schema"].columns] == list(table.columns)
    assert meta["dagster/row_count"] == len(table) == meta["n_genes_tested"]
    assert meta["n_spatially_variable"] == 5 and meta["n_top"] == 5
    assert meta["n_significant_q05"] == int((table["qval"] < 0.05).sum()) >= 2
    assert set(meta["top_genes"].split(", ")[:2]) == {"Patch", "Gradient"}
    assert "| 1 |" in meta["top_genes_table"] and "Patch" in meta["top_genes_table"]
    # the IO manager's own entries are there too, not overwritten
    assert meta["format"] == "parquet" and meta["n_rows"] == len(table)
    assert meta["uri"].endswith(f"/p/assets/spatially_variable_genes/{SAMPLE}.parquet")
