"""Spot-level samples: ``spot_sample`` → ``spot_deconvolution`` → ``spot_domains`` → ``spot_domain_composition``.

Thin wrappers over :mod:`spatial_assets.platform.spots` (no science here). A spot sample is its own
partition space (``spot_samples``), landed under ``landing/spots/`` and registered by
``spot_landing_sensor``; it is deconvolved, not annotated cell by cell.

The reference is the one cell typing uses: every registered ``reference_atlas`` (declared with
``AllPartitionMapping``), combined on the spot sample's panel with the training set's rules
(ontology mapping, Cap & Fill) — so a changed reference refreshes every spot sample's
deconvolution, and a new spot sample runs only its own partitions.
"""

from pathlib import Path

import anndata as ad
import dagster as dg
import pandas as pd

from spatial_assets.core.lineage import library_versions
from spatial_assets.deconvolution import DOMINANT_PROPORTION, RESIDUAL
from spatial_assets.defs.automation import PANEL_ID_METADATA, downstream_of_checked, on_upstream_change
from spatial_assets.defs.execution import op_tags_for
from spatial_assets.defs.metadata import OWNERS, STORAGE_KIND, table_metadata
from spatial_assets.defs.partitions import by_partition, spot_samples_partitions
from spatial_assets.defs.plots import WithFigures, md_table, render_figures
from spatial_assets.defs.resources import StorageResource
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.panels import sample_panel as panel_of_sample
from spatial_assets.platform.registry import prefix_uri, scan_landing
from spatial_assets.platform.spots import (
    SPOT_DOMAIN,
    SPOT_DOMAIN_TOP_TYPE,
    deconvolve_spot_sample,
    dominant_counts,
    labels_table,
    prepare_spot_sample,
    read_landed_spots,
    spot_domain_composition as compose,
    spot_domains as assign_spot_domains,
    spot_size,
)
from spatial_assets.platform.workflow import build_training_set


@dg.asset(
    partitions_def=spot_samples_partitions,
    group_name="deconvolution",
    owners=OWNERS,
    code_version="1",
    kinds={"anndata", STORAGE_KIND},
    description=(
        "A spot-level sample (obs = Visium spots or Visium HD bins): raw integer counts checked, lattice indices "
        "obs['array_row'/'array_col'], uns['spot'] with the kind and spot diameter / bin size, coordinates."
    ),
)
def spot_sample(context: dg.AssetExecutionContext, storage: StorageResource, settings: PlatformSettings) -> ad.AnnData:
    sample_id = context.partition_key
    store = storage.get_store()
    landed = {s.sample_id: s for s in scan_landing(store, settings.spot_landing_prefix, sample_id=sample_id)[0]}
    if sample_id not in landed:
        raise FileNotFoundError(f"spot sample {sample_id!r}: nothing under {prefix_uri(store, settings.spot_landing_prefix)}")
    raw, uri = read_landed_spots(store, landed[sample_id], bin_size_um=settings.spot_bin_size_um)
    spots = prepare_spot_sample(raw, sample_id=sample_id, source=uri)
    panel = panel_of_sample(spots, settings.panel_genes, sample_id=sample_id)
    context.add_output_metadata(
        {
            "landing_uri": dg.MetadataValue.path(uri),
            "landing_fingerprint": landed[sample_id].fingerprint,
            "content_sha256": spots.uns["content_sha256"],
            "n_spots": spots.n_obs,
            "n_genes": spots.n_vars,
            **{f"spot_{k}" if k == "kind" else k: v for k, v in spot_size(spots).items()},
            PANEL_ID_METADATA: panel.id,
            "library_versions": library_versions(),
        }
    )
    return spots


@dg.asset(
    partitions_def=spot_samples_partitions,
    ins={"spot_sample": dg.AssetIn(), "reference_atlas": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())},
    automation_condition=downstream_of_checked(),
    group_name="deconvolution",
    owners=OWNERS,
    code_version="1",
    pool="heavy",
    op_tags=op_tags_for("spot_deconvolution"),
    kinds={"anndata", STORAGE_KIND},
    description=(
        "Cell-type proportions of every spot (obsm['cell_type_proportions'], one column per reference label; "
        "labels' CL ids in uns['deconvolution']['labels']), obs dominant_cell_type (+ its CL id and share), "
        "deconvolution_residual, with the registered references balanced as for training."
    ),
)
def spot_deconvolution(
    context: dg.AssetExecutionContext,
    spot_sample: ad.AnnData,
    reference_atlas: dict,
    storage: StorageResource,
    settings: PlatformSettings,
) -> WithFigures:
    sample_id = context.partition_key
    references = by_partition(context, "reference_atlas", reference_atlas)
    panel = panel_of_sample(spot_sample, settings.panel_genes, sample_id=sample_id)
    tset = build_training_set(list(references.values()), panel, settings, s3_settings=storage.s3_settings()).training_set
    source = str(spot_sample.uns.get("source_uri", sample_id))
    out = deconvolve_spot_sample(
        spot_sample,
        tset,
        method=settings.deconvolution_method,
        seed=settings.seed,
        max_cells_per_type=settings.max_cells_per_type,
        name=source,
    )
    info = out.uns["deconvolution"]
    labels = labels_table(out)
    context.add_output_metadata(
        {
            "method": info["method"],
            "units": info["units"],
            "n_spots": out.n_obs,
            "n_spots_fitted": int(info["n_spots_fitted"]),
            "n_genes_used": len(info["genes"]),
            "n_classes": len(labels),
            "mean_residual": float(out.obs[RESIDUAL].mean()),
            "mean_dominant_proportion": float(out.obs[DOMINANT_PROPORTION].mean()),
            "panel_id": panel.id,
            "spot_sample_content_sha256": str(spot_sample.uns.get("content_sha256", "")),
            "reference_content_sha256": tset.uns["content_sha256"],
            "references": dg.MetadataValue.json(tset.uns["lineage_references"]),
            "labels": md_table(
                ["cell type", "CL id", "reference cells", "mean proportion"],
                ((r.cell_type, r.cell_type_ontology_term_id, r.n_reference_cells, f"{r.mean_proportion:.4f}") for r in labels.itertuples()),
            ),
            "dominant_types": md_table(["dominant cell type", "spots"], dominant_counts(out).items()),
            "parameters": dg.MetadataValue.json(
                {"method": settings.deconvolution_method, "seed": settings.seed, "max_cells_per_type": settings.max_cells_per_type,
                 "panel_genes": list(settings.panel_genes)}
            ),
            "library_versions": library_versions(),
        }
    )
    return WithFigures(out, render_figures(lambda d: _plots(out, d, settings.seed), context.log))


def _plots(out: ad.AnnData, out_dir: Path, seed: int) -> dict:
    from spatial_assets.deconvolution.plots import deconvolution_plots

    return deconvolution_plots(out, out_dir, seed=seed)


@dg.asset(
    partitions_def=spot_samples_partitions,
    automation_condition=downstream_of_checked(),
    group_name="deconvolution",
    owners=OWNERS,
    code_version="1",
    kinds={"anndata", STORAGE_KIND},
    description=(
        "Domains of a spot sample from its proportions: k-means (settings.n_domains) of the proportions averaged "
        "over each spot's lattice neighbours (obsp = the grid); obs domain and domain_top_cell_type."
    ),
)
def spot_domains(context: dg.AssetExecutionContext, spot_deconvolution: ad.AnnData, settings: PlatformSettings) -> WithFigures:
    out = assign_spot_domains(spot_deconvolution, n_domains=settings.n_domains, seed=settings.seed)
    counts = out.obs[SPOT_DOMAIN].value_counts()
    top = out.obs.groupby(SPOT_DOMAIN, observed=True)[SPOT_DOMAIN_TOP_TYPE].first().astype(str).to_dict()
    context.add_output_metadata(
        {
            "n_spots": out.n_obs,
            "n_domains": int(out.uns["spot_domains"]["n_domains"]),
            "graph_edges": int(out.uns["spot_domains"]["n_edges"]),
            "domains": md_table(["domain", "spots", "top cell type"], ((d, n, top.get(d, "")) for d, n in counts.items())),
        }
    )

    def _plot(out_dir: Path) -> dict:
        from spatial_assets.domains import plots

        return {"domains": plots.plot_domains(out, out_dir / "domains.png", level_keys=[SPOT_DOMAIN])}

    return WithFigures(out, render_figures(_plot, context.log))


@dg.asset(
    partitions_def=spot_samples_partitions,
    automation_condition=on_upstream_change(),
    group_name="deconvolution",
    owners=OWNERS,
    code_version="1",
    kinds={"parquet", STORAGE_KIND},
    description="Mean cell-type proportion per spot domain (long table; fractions sum to 1 per domain), with CL ids.",
)
def spot_domain_composition(context: dg.AssetExecutionContext, spot_domains: ad.AnnData) -> pd.DataFrame:
    table = compose(spot_domains, sample_id=context.partition_key)
    context.add_output_metadata({"preview": dg.MetadataValue.md(table.head(40).to_markdown(index=False)), **table_metadata(table)})
    return table
