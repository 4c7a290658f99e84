"""``spatial_cells`` and ``sample_panel``: one partition per sample.

``spatial_cells`` is the landed input as a validated AnnData. It is the seam for the segmentation
issue: today the landing area holds cell-level h5ad files; later ``segmented_cells`` (transcripts
+ image → cells, with QC) will produce this asset's input, with the graph downstream unchanged.

``sample_panel`` records which gene panel the sample is annotated with. It is the declared form of
what used to be a hidden input (the training set read the landing files of the registered
samples to find the panel): the graph now shows that the panel comes from ``spatial_cells``, and a
gene list no earlier sample had adds a ``panels`` partition, which gets its own model.
"""

import anndata as ad
import dagster as dg

from spatial_assets.core.lineage import library_versions
from spatial_assets.core.spatial import prepare_spatial_cells
from spatial_assets.defs.automation import PANEL_ID_METADATA, downstream_of_checked
from spatial_assets.defs.metadata import OWNERS, STORAGE_KIND
from spatial_assets.defs.partitions import add_partitions, panels_partitions, samples_partitions
from spatial_assets.defs.resources import StorageResource
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.panels import sample_panel as panel_of_sample
from spatial_assets.platform.registry import SampleUnreadableError, prefix_uri, scan_landing


@dg.asset(
    partitions_def=samples_partitions,
    group_name="samples",
    owners=OWNERS,
    code_version="1",
    kinds={"anndata", STORAGE_KIND},
    description="A sample's cells with coordinates (obsm['spatial']), validated ids and coordinates.",
)
def spatial_cells(context: dg.AssetExecutionContext, storage: StorageResource, settings: PlatformSettings) -> ad.AnnData:
    sample_id = context.partition_key
    store = storage.get_store()
    landed = {s.sample_id: s for s in scan_landing(store, settings.landing_prefix, sample_id=sample_id)[0]}
    if sample_id not in landed:
        raise FileNotFoundError(f"sample {sample_id!r}: nothing under {prefix_uri(store, settings.landing_prefix)}")
    key = landed[sample_id].h5ad_key
    try:
        raw = ad.read_h5ad(store.get_file(key))
    except OSError as exc:  # truncated / not HDF5: h5py's message does not name the file
        raise SampleUnreadableError(f"{store.uri(key)}: cannot read it as an .h5ad sample ({exc})") from exc
    adata = prepare_spatial_cells(raw, sample_id=sample_id, source=store.uri(key))
    panel = panel_of_sample(adata, settings.panel_genes, sample_id=sample_id)
    adata.uns["landing_fingerprint"] = landed[sample_id].fingerprint  # the audit's landed file -> spatial_cells link
    context.add_output_metadata(
        {
            # asset-level names: `uri` / `sha256` are the IO manager's record of the stored object
            "landing_uri": dg.MetadataValue.path(store.uri(key)),
            "landing_fingerprint": landed[sample_id].fingerprint,
            "content_sha256": adata.uns["content_sha256"],
            "n_cells": adata.n_obs,
            "n_genes": adata.n_vars,
            PANEL_ID_METADATA: panel.id,
            "library_versions": library_versions(),
        }
    )
    return adata


@dg.asset(
    partitions_def=samples_partitions,
    automation_condition=downstream_of_checked(),
    group_name="samples",
    owners=OWNERS,
    code_version="1",
    kinds={"json", STORAGE_KIND},
    description=(
        "The sample's gene panel: the id (p-<hash of the sorted genes>) of the panel whose model annotates it, "
        "its readable name and genes. A gene list no earlier sample had adds a `panels` partition."
    ),
)
def sample_panel(context: dg.AssetExecutionContext, spatial_cells: ad.AnnData, settings: PlatformSettings) -> dict:
    sample_id = context.partition_key
    panel = panel_of_sample(spatial_cells, settings.panel_genes, sample_id=sample_id)
    new = add_partitions(context.instance, panels_partitions, [panel.id])
    if new:
        context.log.info(f"sample {sample_id!r} brings a new gene panel {panel.id} ({panel.name}): partition added")
    record = {**panel.to_record(), "sample_id": sample_id, "spatial_cells_content_sha256": str(spatial_cells.uns.get("content_sha256", ""))}
    context.add_output_metadata(
        {
            PANEL_ID_METADATA: panel.id,
            "panel_name": panel.name,
            "panel_source": panel.source,
            "n_genes": panel.n_genes,
            "new_panel": bool(new),
            "genes": dg.MetadataValue.md(", ".join(panel.genes)),
        }
    )
    return record
