"""Training set → model → per-sample annotations.

Thin wrappers: each asset gathers its inputs, calls the science in ``spatial_assets.*`` and
records what a user needs to audit the result (hashes, parameters, versions, counts, plots).
"""

from pathlib import Path

import anndata as ad
import dagster as dg
import pandas as pd

from spatial_assets.core import schema
from spatial_assets.defs.automation import downstream_of_checked, on_upstream_change
from spatial_assets.defs.execution import op_tags_for
from spatial_assets.defs.partitions import samples_partitions
from spatial_assets.celltyping.training import TrainedModel
from spatial_assets.defs.plots import WithFigures, md_table, render_figures
from spatial_assets.defs.resources import StorageResource
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.core.lineage import library_versions
from spatial_assets.platform.workflow import (
    annotate_sample,
    build_training_set,
    resolve_panel,
    summarize_annotations,
    train_celltype_model,
)


@dg.multi_asset(
    outs={
        "training_set": dg.AssetOut(
            kinds={"anndata"},
            automation_condition=on_upstream_change(),
            description="References combined on the panel genes, labels mapped to Cell Ontology, Cap & Fill balanced.",
        ),
        "label_mapping": dg.AssetOut(
            kinds={"parquet"},
            automation_condition=on_upstream_change(),
            description="Reference label → Cell Ontology id mapping (tier, score, cells per source).",
        ),
    },
    ins={"reference_atlas": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())},
    group_name="celltyping",
    pool="heavy",
    op_tags=op_tags_for("training_set"),
)
def training_set(context: dg.AssetExecutionContext, reference_atlas: dict, storage: StorageResource, settings: PlatformSettings):
    panel, panel_source = resolve_panel(storage.get_store(), settings, context.instance.get_dynamic_partitions("samples"))
    result = build_training_set(list(reference_atlas.values()), panel, settings, s3_settings=storage.s3_settings(), panel_source=panel_source)
    tset, mapping = result.training_set, result.mapping_table
    counts = tset.obs[schema.CELL_TYPE].value_counts()
    yield dg.Output(
        tset,
        output_name="training_set",
        metadata={
            "content_sha256": tset.uns["content_sha256"],
            "n_cells": tset.n_obs,
            "n_genes": tset.n_vars,
            "n_classes": int(counts.size),
            "panel_source": panel_source,
            "references": dg.MetadataValue.json(tset.uns["lineage_references"]),
            "class_counts": md_table(["class", "cells"], counts.items()),
            "parameters": dg.MetadataValue.json(tset.uns["training_parameters"]),
            "library_versions": library_versions(),
        },
    )
    yield dg.Output(
        mapping,
        output_name="label_mapping",
        metadata={
            "n_labels": len(mapping),
            "n_mapped": int(mapping["ontology_term_id"].astype(str).str.startswith("CL:").sum()),
            "preview": dg.MetadataValue.md(mapping.head(50).to_markdown(index=False)),
        },
    )


@dg.asset(
    automation_condition=on_upstream_change(),
    group_name="celltyping",
    pool="heavy",
    op_tags=op_tags_for("celltype_model"),
    kinds={"celltypist"},
    description="Panel-specific CellTypist model (celltypist.models.Model.load-able) with its model card; sha256 verified before every load.",
)
def celltype_model(context: dg.AssetExecutionContext, training_set: ad.AnnData, settings: PlatformSettings) -> TrainedModel:
    model = train_celltype_model(training_set, settings)
    context.add_output_metadata(
        {
            "n_classes": len(model.classes),
            "n_genes": len(model.genes),
            "classes": ", ".join(model.classes),
            "training_set_content_sha256": training_set.uns["content_sha256"],
            "parameters": dg.MetadataValue.json(model.card.get("parameters", {})),
            "library_versions": library_versions(),
        }
    )
    return model


@dg.asset(
    partitions_def=samples_partitions,
    automation_condition=downstream_of_checked(),
    group_name="celltyping",
    pool="heavy",
    op_tags=op_tags_for("cell_type_annotations"),
    kinds={"anndata", "celltypist"},
    description="Per-cell CellTypist calls with calibrated confidence, Unassigned below threshold, CL ids, and uns['provenance'].",
)
def cell_type_annotations(
    context: dg.AssetExecutionContext,
    spatial_cells: ad.AnnData,
    celltype_model: TrainedModel,
    settings: PlatformSettings,
) -> WithFigures:
    annotated = annotate_sample(spatial_cells, celltype_model, settings, run_id=context.run.run_id, sample_id=context.partition_key)
    obs = annotated.obs
    unassigned = float((obs[schema.CELL_TYPE] == schema.UNASSIGNED).mean())
    metadata = {
        "n_cells": annotated.n_obs,
        "mean_confidence": float(obs[schema.CONFIDENCE].mean()),
        "unassigned_fraction": unassigned,
        "confidence_threshold": settings.confidence_threshold,
        "model_sha256": annotated.uns[schema.PROVENANCE_UNS]["model"]["sha256"],
        "provenance": dg.MetadataValue.json(annotated.uns[schema.PROVENANCE_UNS]),
        "cells_per_type": md_table(["cell type", "cells"], obs[schema.CELL_TYPE].value_counts().items()),
    }
    context.add_output_metadata(metadata)
    # the IO manager stores the PNGs beside the annotations (<sample>.plots/) with thumbnails in the metadata
    return WithFigures(annotated, render_figures(lambda out_dir: _celltyping_plots(annotated, out_dir, settings), context.log))


def _celltyping_plots(annotated: ad.AnnData, out_dir: Path, settings: PlatformSettings) -> dict:
    from spatial_assets.celltyping.plots import write_celltyping_plots

    return write_celltyping_plots(annotated, out_dir, confidence_threshold=settings.confidence_threshold)


@dg.asset(
    partitions_def=samples_partitions,
    automation_condition=on_upstream_change(),
    group_name="celltyping",
    kinds={"parquet"},
    description="Per-sample summary: cells, fraction and mean confidence per cell type.",
)
def cell_type_summary(context: dg.AssetExecutionContext, cell_type_annotations: ad.AnnData) -> pd.DataFrame:
    table = summarize_annotations(cell_type_annotations, sample_id=context.partition_key)
    context.add_output_metadata({"table": dg.MetadataValue.md(table.to_markdown(index=False))})
    return table
