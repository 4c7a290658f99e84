"""Per panel: gene panel → training set → model; per sample: annotations with its own panel's model.

Thin wrappers: each asset gathers its inputs, calls the science in ``spatial_assets.*`` and
records what a user needs to audit the result (hashes, parameters, versions, counts, plots).

How a sample finds its model: ``sample_panel[sample]`` (an input) names the panel, and the
annotations asset loads ``celltype_model[panel]`` through the IO manager
(``context.load_asset_value``). The edge to ``celltype_model`` is declared with
``AllPartitionMapping`` because Dagster cannot map a sample to its panel itself (the pairing is
data); the automation condition (:func:`~spatial_assets.defs.automation.on_own_panel_model`)
makes sure only the sample's own panel's model triggers or blocks it.
"""

from pathlib import Path

import anndata as ad
import dagster as dg
import pandas as pd

from spatial_assets.core import schema
from spatial_assets.core.lineage import library_versions
from spatial_assets.defs.execution import op_tags_for
from spatial_assets.celltyping.training import TrainedModel
from spatial_assets.defs.automation import (
    CELLTYPE_MODEL,
    MODEL_GENES_METADATA,
    downstream_of_checked,
    on_new_panel,
    on_own_panel_model,
    on_upstream_change,
)
from spatial_assets.defs.history import latest_storage_ids
from spatial_assets.defs.metadata import OWNERS, STORAGE_KIND, table_metadata, table_value
from spatial_assets.defs.partitions import by_partition, one_partition, panels_partitions, samples_partitions
from spatial_assets.defs.plots import WithFigures, md_table, render_figures
from spatial_assets.defs.resources import StorageResource
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.panels import Panel, PanelError
from spatial_assets.platform.workflow import (
    annotate_sample,
    annotation_decisions,
    build_training_set,
    coverage_curve_table,
    cv_scores_table,
    summarize_annotations,
    train_celltype_model,
)


@dg.asset(
    partitions_def=panels_partitions,
    ins={
        "sample_panel": dg.AssetIn(
            partition_mapping=dg.AllPartitionMapping(), metadata={"allow_missing_partitions": True}
        )
    },
    automation_condition=on_new_panel(),
    group_name="celltyping",
    owners=OWNERS,
    code_version="1",
    kinds={"json", STORAGE_KIND},
    description=(
        "A gene panel (partition = p-<first 12 hex of sha256 of the sorted genes>): its readable name and "
        "genes, from the samples that measure it. The genes every model of this partition is trained on."
    ),
)
def gene_panel(context: dg.AssetExecutionContext, sample_panel: dict[str, dict]) -> dict:
    pid = context.partition_key
    sample_panel = by_partition(context, "sample_panel", sample_panel)
    records = {sid: rec for sid, rec in sample_panel.items() if rec.get("panel_id") == pid}
    if not records:
        raise PanelError(
            f"panel {pid}: no materialized sample_panel records it (samples: {sorted(sample_panel)}); "
            "it is added by sample_panel, not by hand"
        )
    panel = Panel.from_record(next(iter(records.values())))
    context.add_output_metadata(
        {
            "panel_name": panel.name,
            "panel_source": panel.source,
            "n_genes": panel.n_genes,
            "samples_at_creation": ", ".join(sorted(records)),
            "genes": dg.MetadataValue.md(", ".join(panel.genes)),
        }
    )
    return panel.to_record()


@dg.multi_asset(
    outs={
        "training_set": dg.AssetOut(
            kinds={"anndata", STORAGE_KIND},
            owners=OWNERS,
            code_version="1",
            automation_condition=on_upstream_change(),
            description="All references combined on the panel's genes, labels mapped to Cell Ontology, Cap & Fill balanced.",
        ),
        "label_mapping": dg.AssetOut(
            kinds={"parquet", STORAGE_KIND},
            owners=OWNERS,
            code_version="1",
            automation_condition=on_upstream_change(),
            description="Reference label → Cell Ontology id mapping (tier, score, cells per source) for the panel.",
        ),
    },
    ins={"reference_atlas": dg.AssetIn(partition_mapping=dg.AllPartitionMapping()), "gene_panel": dg.AssetIn()},
    partitions_def=panels_partitions,
    group_name="celltyping",
    pool="heavy",
    op_tags=op_tags_for("training_set"),
)
def training_set(
    context: dg.AssetExecutionContext,
    reference_atlas: dict,
    gene_panel: dict,
    storage: StorageResource,
    settings: PlatformSettings,
):
    panel = Panel.from_record(one_partition(context, "gene_panel", gene_panel))
    references = by_partition(context, "reference_atlas", reference_atlas)
    result = build_training_set(list(references.values()), panel, settings, s3_settings=storage.s3_settings())
    tset, mapping = result.training_set, result.mapping_table
    counts = tset.obs[schema.CELL_TYPE].value_counts()
    yield dg.Output(
        tset,
        output_name="training_set",
        metadata={
            "content_sha256": tset.uns["content_sha256"],
            "panel_id": panel.id,
            "panel_name": panel.name,
            "n_cells": tset.n_obs,
            "n_genes": tset.n_vars,
            "n_panel_genes": panel.n_genes,
            "n_classes": int(counts.size),
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
            "panel_id": panel.id,
            "n_labels": len(mapping),
            "n_mapped": int(mapping["ontology_term_id"].astype(str).str.startswith("CL:").sum()),
            "preview": dg.MetadataValue.md(mapping.head(50).to_markdown(index=False)),
            **table_metadata(mapping),
        },
    )


@dg.asset(
    partitions_def=panels_partitions,
    automation_condition=downstream_of_checked(),
    group_name="celltyping",
    owners=OWNERS,
    code_version="1",
    pool="heavy",
    op_tags=op_tags_for("celltype_model"),
    kinds={"celltypist", STORAGE_KIND},
    description=(
        "The panel's CellTypist model (celltypist.models.Model.load-able) with its model card; sha256 verified "
        "before every load. Annotates every sample on this panel, and no other."
    ),
)
def celltype_model(context: dg.AssetExecutionContext, training_set: ad.AnnData, settings: PlatformSettings) -> WithFigures:
    model = train_celltype_model(training_set, settings)
    panel = dict(training_set.uns.get("panel", {}))
    decisions = model.card["decisions"]
    curve = coverage_curve_table(model.card)
    metadata = {
        "panel_id": str(panel.get("id", context.partition_key)),
        "panel_name": str(panel.get("name", "")),
        "n_classes": len(model.classes),
        "n_genes": len(model.genes),
        "classes": ", ".join(model.classes),
        # what the gene-overlap check of each sample on this panel compares with
        MODEL_GENES_METADATA: dg.MetadataValue.json(list(model.genes)),
        "training_set_content_sha256": training_set.uns["content_sha256"],
        "parameters": dg.MetadataValue.json(model.card.get("parameters", {})),
        **_model_decision_metadata(decisions),
        "cv_scores": table_value(cv_scores_table(model.card)),
        "coverage_accuracy_curve": table_value(curve),
        "decisions": dg.MetadataValue.json(decisions),
        "library_versions": library_versions(),
    }
    context.add_output_metadata(metadata)
    # the IO manager stores the plot beside the model (<panel>.plots/) with a thumbnail in the metadata
    return WithFigures(model, render_figures(lambda out_dir: _model_plots(model.card, out_dir), context.log))


def _model_decision_metadata(decisions: dict) -> dict:
    """Flat, typed entries for the UI: regularisation chosen per regime, threshold per regime, rare classes."""
    reg = decisions["regularization"]
    out: dict = {
        "reg_per_cell_requested": str(reg["requested"]),
        "cv_grid": dg.MetadataValue.text(", ".join(f"{r:g}" for r in reg["cv_grid"])),
        "cv_criterion": str(reg["cv_criterion"]),
    }
    why = []
    for regime, chosen in reg["chosen"].items():
        value = chosen["reg_per_cell"]
        if isinstance(value, (int, float)):
            out[f"reg_per_cell_{regime}"] = dg.MetadataValue.float(float(value))
        else:
            out[f"reg_per_cell_{regime}"] = dg.MetadataValue.text(str(value))
        why.append(f"- **{regime}**: {chosen['why']}")
    out["regularization_why"] = dg.MetadataValue.md("\n".join(why))
    for regime, thr in decisions["thresholds"].items():
        out[f"confidence_threshold_{regime}"] = dg.MetadataValue.float(thr["threshold"])
        out[f"expected_coverage_{regime}"] = dg.MetadataValue.float(thr["expected_coverage"])
        out[f"threshold_verified_{regime}"] = dg.MetadataValue.bool(thr["verified"])
        out[f"target_reached_{regime}"] = dg.MetadataValue.bool(thr["target_reached"])
    targets = {thr["target_precision"] for thr in decisions["thresholds"].values()}
    out["target_precision"] = dg.MetadataValue.float(float(next(iter(targets))) if len(targets) == 1 else float("nan"))
    out["rare_classes"] = dg.MetadataValue.text(", ".join(decisions["rare_classes"]) or "none")
    out["n_rare_classes"] = dg.MetadataValue.int(len(decisions["rare_classes"]))
    out["rare_class_rule"] = dg.MetadataValue.text(decisions["rare_class_rule"])
    return out


def _model_plots(card: dict, out_dir: Path) -> dict:
    from spatial_assets.celltyping.plots import plot_model_coverage_accuracy

    return {"coverage_accuracy": plot_model_coverage_accuracy(card, out_dir / "coverage_accuracy.png")}


@dg.asset(
    partitions_def=samples_partitions,
    ins={"spatial_cells": dg.AssetIn(), "sample_panel": dg.AssetIn()},
    # declared so the graph, lineage and blocking-check rules see it; read by lookup (own panel only)
    deps=[dg.AssetDep(CELLTYPE_MODEL, partition_mapping=dg.AllPartitionMapping())],
    automation_condition=on_own_panel_model(),
    group_name="celltyping",
    owners=OWNERS,
    code_version="1",
    pool="heavy",
    op_tags=op_tags_for("cell_type_annotations"),
    kinds={"anndata", "celltypist", STORAGE_KIND},
    description=(
        "Per-cell CellTypist calls with the model of the sample's own panel: calibrated confidence, Unassigned "
        "below threshold, CL ids, and uns['provenance'] (references → training set → model → panel → sample)."
    ),
)
def cell_type_annotations(
    context: dg.AssetExecutionContext,
    spatial_cells: ad.AnnData,
    sample_panel: dict,
    settings: PlatformSettings,
) -> WithFigures:
    sample_id = context.partition_key
    panel = Panel.from_record(one_partition(context, "sample_panel", sample_panel))
    if panel.id not in latest_storage_ids(context.instance, CELLTYPE_MODEL, [panel.id]):
        raise PanelError(
            f"sample {sample_id!r} is on panel {panel.id} ({panel.name}), which has no celltype_model yet: "
            f"materialize panel_models_job for partition {panel.id} (automation does so by itself)"
        )
    model = context.load_asset_value(CELLTYPE_MODEL, partition_key=panel.id, python_type=TrainedModel)
    annotated = annotate_sample(spatial_cells, model, settings, run_id=context.run.run_id, sample_id=sample_id, panel=panel)
    obs = annotated.obs
    unassigned = float((obs[schema.CELL_TYPE] == schema.UNASSIGNED).mean())
    decisions = annotation_decisions(annotated)
    metadata = {
        "n_cells": annotated.n_obs,
        "panel_id": panel.id,
        "panel_name": panel.name,
        "mean_confidence": float(obs[schema.CONFIDENCE].mean()),
        "unassigned_fraction": unassigned,
        **_annotation_decision_metadata(decisions),
        "model_sha256": annotated.uns[schema.PROVENANCE_UNS]["model"]["sha256"],
        "provenance": dg.MetadataValue.json(annotated.uns[schema.PROVENANCE_UNS]),
        "cells_per_type": md_table(["cell type", "cells"], obs[schema.CELL_TYPE].value_counts().items()),
    }
    context.add_output_metadata(metadata)
    # the IO manager stores the PNGs beside the annotations (<sample>.plots/) with thumbnails in the metadata
    return WithFigures(annotated, render_figures(lambda out_dir: _celltyping_plots(annotated, out_dir, settings), context.log))


def _annotation_decision_metadata(d: dict) -> dict:
    """Shift index → regime → alignment → threshold, each typed for the UI, and the reasons."""
    return {
        "shift_index": dg.MetadataValue.float(float(d["shift_index"])),
        "shift_index_threshold": dg.MetadataValue.float(float(d["shift_index_threshold"])),
        "platform_shift": dg.MetadataValue.bool(bool(d["platform_shift"])),
        "regime": dg.MetadataValue.text(str(d["regime"])),
        "regime_reason": dg.MetadataValue.text(str(d["regime_reason"])),
        "alignment_requested": dg.MetadataValue.text(str(d["alignment_requested"])),
        "alignment": dg.MetadataValue.text(str(d["alignment"])),
        "reg_per_cell": dg.MetadataValue.text(str(d["reg_per_cell"])),
        "confidence_threshold": dg.MetadataValue.float(float(d["confidence_threshold"])),
        "threshold_source": dg.MetadataValue.text(str(d["threshold_source"])),
        "threshold_target_precision": dg.MetadataValue.float(float(d["threshold_target_precision"])),
        "threshold_expected_coverage": dg.MetadataValue.float(float(d["threshold_expected_coverage"])),
        "threshold_verified": dg.MetadataValue.bool(bool(d["threshold_verified"])),
        "threshold_note": dg.MetadataValue.text(str(d["threshold_note"])),
        "rare_classes": dg.MetadataValue.text(", ".join(d["rare_classes"]) or "none"),
    }


def _celltyping_plots(annotated: ad.AnnData, out_dir: Path, settings: PlatformSettings) -> dict:
    from spatial_assets.celltyping.plots import write_celltyping_plots

    threshold = float(annotated.uns[schema.CELLTYPING_UNS]["confidence_threshold"])
    return write_celltyping_plots(annotated, out_dir, confidence_threshold=threshold)


@dg.asset(
    partitions_def=samples_partitions,
    automation_condition=on_upstream_change(),
    group_name="celltyping",
    owners=OWNERS,
    code_version="1",
    kinds={"parquet", STORAGE_KIND},
    description="Per-sample summary: cells, fraction and mean confidence per cell type.",
)
def cell_type_summary(context: dg.AssetExecutionContext, cell_type_annotations: ad.AnnData) -> pd.DataFrame:
    table = summarize_annotations(cell_type_annotations, sample_id=context.partition_key)
    context.add_output_metadata({"table": dg.MetadataValue.md(table.to_markdown(index=False)), **table_metadata(table)})
    return table
