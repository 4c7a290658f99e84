"""Spatial domains: one shared model → per-sample domains → composition and markers."""

from pathlib import Path

import anndata as ad
import dagster as dg
import pandas as pd

from spatial_assets.defs.automation import downstream_of_checked, fit_once_when_samples_exist, on_upstream_change
from spatial_assets.defs.execution import op_tags_for
from spatial_assets.defs.metadata import OWNERS, STORAGE_KIND, table_metadata
from spatial_assets.defs.partitions import by_partition, samples_partitions
from spatial_assets.defs.plots import WithFigures, md_table, render_figures
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.domains.engine import DomainModel
from spatial_assets.platform.domains import (
    annotate_domains_with_signatures,
    fit_domain_model,
    mark_islands,
    spatially_variable_genes_table,
)
from spatial_assets.core.lineage import library_versions


def _engine_config(settings: PlatformSettings) -> dict:
    return {"pretrained_dir": settings.domain_model_dir} if settings.domain_engine == "novae" and settings.domain_model_dir else {}


@dg.asset(
    ins={"spatial_cells": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())},
    # Fitted once when missing, then reused: a new sample must not refit (and so relabel) the
    # others. Materialize it by hand (domain_model_job) to refit on every registered sample.
    automation_condition=fit_once_when_samples_exist(),
    group_name="domains",
    owners=OWNERS,
    code_version="1",
    pool="heavy",
    op_tags=op_tags_for("domain_model"),
    kinds={"numpy", STORAGE_KIND},
    description="The shared domain model (one embedding for all samples, hierarchical levels), stored by the IO manager as npz+json in a zip with its sha256.",
)
def domain_model(context: dg.AssetExecutionContext, spatial_cells: dict, settings: PlatformSettings) -> DomainModel:
    spatial_cells = by_partition(context, "spatial_cells", spatial_cells)
    samples = [spatial_cells[k] for k in sorted(spatial_cells)]
    model = fit_domain_model(
        samples,
        engine=settings.domain_engine,
        n_domains=settings.n_domains,
        levels=settings.domain_levels,
        seed=settings.seed,
        engine_config=_engine_config(settings),
    )
    meta = model.metadata()
    fitted_on = sorted(spatial_cells)
    context.add_output_metadata(
        {
            "engine": meta.get("engine", ""),
            "levels": ", ".join(str(int(k)) for k in model.levels),
            "n_domains": int(model.n_domains),
            "fitted_on": ", ".join(fitted_on),
            "fitted_on_content_sha256": dg.MetadataValue.json(
                {k: str(spatial_cells[k].uns.get("content_sha256", "")) for k in fitted_on}
            ),
            "model_metadata": dg.MetadataValue.json(meta),
            "library_versions": library_versions(),
        }
    )
    return model  # the IO manager packs it (zip + card with its sha256) and verifies it on load


@dg.asset(
    partitions_def=samples_partitions,
    automation_condition=downstream_of_checked(),
    group_name="domains",
    owners=OWNERS,
    code_version="1",
    pool="heavy",
    op_tags=op_tags_for("spatial_domains"),
    kinds={"anndata", STORAGE_KIND},
    description="Per-sample domains at every level (obs domain_level_{k}, obs domain) with domain-level cell-type calls (signature enrichment + elbow gap).",
)
def spatial_domains(
    context: dg.AssetExecutionContext,
    spatial_cells: ad.AnnData,
    domain_model: DomainModel,
    settings: PlatformSettings,
) -> WithFigures:
    model_sha256 = domain_model.sha256  # set by the IO manager after verifying the stored zip
    assigned = mark_islands(domain_model.assign(spatial_cells), min_size=settings.island_min_size, exclude=settings.exclude_islands)
    annotated, assignment = annotate_domains_with_signatures(assigned, settings.domain_signatures)
    annotated.uns["domain_model_sha256"] = model_sha256
    counts = annotated.obs["domain"].value_counts()
    calls = dict(zip(assignment["domain"], assignment["assigned_cell_types"]))
    metadata = {
        "n_cells": annotated.n_obs,
        "n_island_cells": int(annotated.obs["is_island"].sum()),
        "engine": domain_model.metadata().get("engine", ""),
        "domain_model_sha256": model_sha256,
        "spatial_cells_content_sha256": str(spatial_cells.uns.get("content_sha256", "")),
        "signatures_scored": len(annotated.uns["signature_scoring"]["signatures"]),
        "signature_genes_used": int(len(annotated.uns["signature_scoring"]["genes_used"])),
        "signature_genes_missing_from_panel": int(len(annotated.uns["signature_scoring"]["missing_genes"])),
        "parameters": dg.MetadataValue.json(
            {"signatures": settings.domain_signatures, "island_min_size": settings.island_min_size,
             "exclude_islands": settings.exclude_islands, "levels": [int(k) for k in domain_model.levels]}
        ),
        "library_versions": library_versions(),
        "domains": md_table(["domain", "cells", "domain-level call"], ((d, n, calls.get(d, "")) for d, n in counts.items())),
    }
    context.add_output_metadata(metadata)
    return WithFigures(annotated, render_figures(lambda d: _domain_plots(annotated, assignment, d), context.log))


def _domain_plots(adata: ad.AnnData, assignment: pd.DataFrame, out_dir: Path) -> dict:
    from spatial_assets.domains import plots

    level_keys = sorted(k for k in adata.obs.columns if k.startswith("domain_level_"))
    return {
        "domains": plots.plot_domains(adata, out_dir / "domains.png", level_keys=level_keys),
        "elbows": plots.plot_elbows(assignment, out_dir / "elbows.png"),
        "islands": plots.plot_islands(adata, out_dir / "islands.png"),
    }


@dg.asset(
    partitions_def=samples_partitions,
    automation_condition=on_upstream_change(),
    group_name="domains",
    owners=OWNERS,
    code_version="1",
    kinds={"parquet", STORAGE_KIND},
    description="Cells per predicted cell type per domain for one sample (long table).",
)
def domain_composition(
    context: dg.AssetExecutionContext,
    spatial_domains: ad.AnnData,
    cell_type_annotations: ad.AnnData,
) -> WithFigures:
    from spatial_assets.domains.annotation import domain_composition as compose

    merged = spatial_domains.copy()
    merged.obs["cell_type"] = cell_type_annotations.obs["cell_type"].reindex(merged.obs_names).astype(str).to_numpy()
    table = compose(merged, domain_key="domain", cell_type_key="cell_type", sample_key="sample_id")
    meta = {"preview": dg.MetadataValue.md(table.head(40).to_markdown(index=False)), **table_metadata(table)}

    def _plot(out_dir: Path) -> dict:
        from spatial_assets.domains import plots

        return {"proportions": plots.plot_domain_proportions(table, out_dir / "proportions.png")}

    context.add_output_metadata(meta)
    return WithFigures(table, render_figures(_plot, context.log))


@dg.asset(
    partitions_def=samples_partitions,
    automation_condition=on_upstream_change(),
    group_name="domains",
    owners=OWNERS,
    code_version="1",
    kinds={"parquet", STORAGE_KIND},
    description="Top marker genes per domain (one-vs-rest Wilcoxon) for one sample.",
)
def domain_markers(context: dg.AssetExecutionContext, spatial_domains: ad.AnnData) -> pd.DataFrame:
    from spatial_assets.domains.annotation import domain_marker_genes

    table = domain_marker_genes(spatial_domains, domain_key="domain", n_genes=10)
    context.add_output_metadata({"preview": dg.MetadataValue.md(table.head(40).to_markdown(index=False)), **table_metadata(table)})
    return table


#: genes listed in the materialization metadata (the whole table is the asset)
SVG_PREVIEW_GENES = 25


@dg.asset(
    partitions_def=samples_partitions,
    # refreshed whenever the sample's cells change, once their normalization check passed
    automation_condition=downstream_of_checked(),
    group_name="domains",
    owners=OWNERS,
    code_version="1",
    kinds={"parquet", STORAGE_KIND},
    description=(
        "Per-sample spatially variable genes: Moran's I of every gene over the sample's spatial graph "
        "(k-NN for cells, lattice for spots), one-sided normal p-value, BH q-value, rank; the highest "
        "svg_n_top flagged (the genes the domain engine adds on whole-transcriptome data)."
    ),
)
def spatially_variable_genes(
    context: dg.AssetExecutionContext, spatial_cells: ad.AnnData, settings: PlatformSettings
) -> pd.DataFrame:
    table = spatially_variable_genes_table(spatial_cells, n_top=settings.svg_n_top)
    table.insert(0, "sample_id", context.partition_key)
    top = table.sort_values("moranI_rank", kind="stable").head(SVG_PREVIEW_GENES)
    context.add_output_metadata(
        {
            "n_genes_tested": dg.MetadataValue.int(len(table)),
            "n_spatially_variable": dg.MetadataValue.int(int(table["spatially_variable"].sum())),
            "n_significant_q05": dg.MetadataValue.int(int((table["qval"] < 0.05).sum())),
            "n_top": dg.MetadataValue.int(int(settings.svg_n_top)),
            "top_genes": dg.MetadataValue.text(", ".join(top["gene"].head(10))),
            "top_genes_table": md_table(
                ["rank", "gene", "Moran's I", "q-value"],
                ((int(r.moranI_rank), r.gene, f"{r.moranI:.3f}", f"{r.qval:.2g}") for r in top.itertuples()),
            ),
            "spatial_cells_content_sha256": str(spatial_cells.uns.get("content_sha256", "")),
            "library_versions": library_versions(),
            **table_metadata(table),
        }
    )
    return table
