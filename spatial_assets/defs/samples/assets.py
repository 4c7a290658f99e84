"""``spatial_cells`` and ``sample_panel``: one partition per sample.

``spatial_cells`` is the landed input as a validated AnnData, whichever way the sample landed:
a cell-level h5ad is read from the landing area (the landing sensor runs ``samples_job``); an
instrument output folder is segmented and QC'd first (``raw_sample`` → ``segmented_cells`` →
``cell_qc``, the sensor runs ``raw_samples_job``) and ``spatial_cells`` reads the QC'd cells, by
automation once ``cell_qc``'s blocking check passed. The kind comes from the landing listing; the
edge ``cell_qc → spatial_cells`` is declared (lineage, automation), and for a sample landed as an
h5ad ``cell_qc`` simply stays missing. Everything downstream is the same for both.

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
from spatial_assets.platform.raw_samples import RAW_UNS, SEGMENTATION_UNS, StaleRawSampleError
from spatial_assets.platform.registry import RAW, SampleUnreadableError, prefix_uri, scan_landing

CELL_QC = dg.AssetKey("cell_qc")


@dg.asset(
    partitions_def=samples_partitions,
    # a raw sample's cells come from cell_qc (read by lookup: a sample landed as h5ad has none)
    deps=[dg.AssetDep(CELL_QC)],
    # h5ad samples: run by the landing sensor; raw samples: here, once cell_qc passed its blocking check
    automation_condition=downstream_of_checked(),
    group_name="samples",
    owners=OWNERS,
    code_version="1",
    kinds={"anndata", STORAGE_KIND},
    description=(
        "A sample's cells with coordinates (obsm['spatial']), validated ids and coordinates: the landed h5ad, "
        "or for a raw instrument folder its QC'd segmented cells (cell_qc)."
    ),
)
def spatial_cells(context: dg.AssetExecutionContext, storage: StorageResource, settings: PlatformSettings) -> ad.AnnData:
    sample_id = context.partition_key
    store = storage.get_store()
    landed = {s.sample_id: s for s in scan_landing(store, settings.landing_prefix, sample_id=sample_id)[0]}
    if sample_id not in landed:
        raise FileNotFoundError(f"sample {sample_id!r}: nothing under {prefix_uri(store, settings.landing_prefix)}")
    sample = landed[sample_id]
    extra: dict = {"sample_kind": sample.kind}
    if sample.kind == RAW:
        source = store.uri(sample.folder.rstrip("/")) + "/"
        cells = context.load_asset_value(CELL_QC, partition_key=sample_id, python_type=ad.AnnData)
        recorded = str((cells.uns.get(RAW_UNS) or {}).get("landing_fingerprint", ""))
        if recorded != sample.fingerprint:
            raise StaleRawSampleError(
                f"sample {sample_id!r}: the raw folder {source} changed since cell_qc[{sample_id}] was computed "
                f"(landing fingerprint {sample.fingerprint} ≠ {recorded or 'none'}); raw_samples_job re-runs it "
                "(the landing sensor requests it), then this asset follows"
            )
        seg = dict(cells.uns.get(SEGMENTATION_UNS) or {})
        extra.update({"platform": str(seg.get("platform", "")), "segmentation_method": str(seg.get("method", "")),
                      "segmented_cells_sha256": str(seg.get("cells_sha256", ""))})
    else:
        key = sample.h5ad_key
        source = store.uri(key)
        try:
            cells = ad.read_h5ad(store.get_file(key))
        except OSError as exc:  # truncated / not HDF5: h5py's message does not name the file
            raise SampleUnreadableError(f"{store.uri(key)}: cannot read it as an .h5ad sample ({exc})") from exc
    adata = prepare_spatial_cells(cells, sample_id=sample_id, source=source)
    panel = panel_of_sample(adata, settings.panel_genes, sample_id=sample_id)
    adata.uns["landing_fingerprint"] = landed[sample_id].fingerprint  # the audit's landed file -> spatial_cells link
    context.add_output_metadata(
        {
            # asset-level names: `uri` / `sha256` are the IO manager's record of the stored object
            "landing_uri": dg.MetadataValue.path(source),
            "landing_fingerprint": sample.fingerprint,
            "content_sha256": adata.uns["content_sha256"],
            "n_cells": adata.n_obs,
            "n_genes": adata.n_vars,
            PANEL_ID_METADATA: panel.id,
            **extra,
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
