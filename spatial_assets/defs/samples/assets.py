"""``spatial_cells``: one partition per sample, the landed input as a validated AnnData.

This is the seam for the segmentation issue: today the landing area holds cell-level h5ad files;
later ``segmented_cells`` (transcripts + image → cells, with QC) will produce this asset's input
and ``spatial_cells`` will read that instead, with the graph downstream unchanged.
"""

import anndata as ad
import dagster as dg

from spatial_assets.defs.partitions import samples_partitions
from spatial_assets.defs.resources import StorageResource
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.core.lineage import library_versions
from spatial_assets.platform.registry import scan_landing
from spatial_assets.core.spatial import prepare_spatial_cells


@dg.asset(
    partitions_def=samples_partitions,
    group_name="samples",
    kinds={"anndata", "s3"},
    description="A sample's cells with coordinates (obsm['spatial']), validated ids and coordinates.",
)
def spatial_cells(context: dg.AssetExecutionContext, storage: StorageResource, settings: PlatformSettings) -> ad.AnnData:
    sample_id = context.partition_key
    store = storage.get_store()
    landed = {s.sample_id: s for s in scan_landing(store, settings.landing_prefix, sample_id=sample_id)[0]}
    if sample_id not in landed:
        raise FileNotFoundError(f"sample {sample_id!r}: nothing under {store.uri(settings.landing_prefix)}")
    key = landed[sample_id].h5ad_key
    adata = prepare_spatial_cells(ad.read_h5ad(store.get_file(key)), sample_id=sample_id, source=store.uri(key))
    context.add_output_metadata(
        {
            "source_uri": store.uri(key),
            "landing_fingerprint": landed[sample_id].fingerprint,
            "content_sha256": adata.uns["content_sha256"],
            "n_cells": adata.n_obs,
            "n_genes": adata.n_vars,
            "library_versions": library_versions(),
        }
    )
    return adata
