"""Blocking checks that guard a sample's panel and annotations."""

import anndata as ad
import dagster as dg

from spatial_assets.core.normalization import detect_normalization
from spatial_assets.core.spatial import panel_genes
from spatial_assets.defs.automation import CELLTYPE_MODEL, MODEL_GENES_METADATA
from spatial_assets.defs.history import latest_metadata_value
from spatial_assets.defs.partitions import samples_partitions
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.panels import missing_genes
from spatial_assets.platform.panels import sample_panel as panel_of_sample


@dg.asset_check(
    asset="spatial_cells",
    partitions_def=samples_partitions,
    blocking=True,
    description="Expression is usable: raw counts found, verified log1p(10k), or linear (e.g. counts per volume) — not CPM, not z-scored, not unknown.",
)
def spatial_cells_normalization(spatial_cells: ad.AnnData) -> dg.AssetCheckResult:
    status = detect_normalization(spatial_cells)
    return dg.AssetCheckResult(
        passed=bool(status.is_usable),
        metadata={"x_state": status.x_state, "raw_source": str(status.raw_source), **_numeric(status.to_dict())},
        description=None if status.is_usable else f"X is {status.x_state} and no raw counts were found",
    )


@dg.asset_check(
    asset="spatial_cells",
    partitions_def=samples_partitions,
    blocking=True,
    # The model's genes are what its materialization recorded (metadata `model_genes`), looked up
    # for the sample's own panel; not a declared dependency: the check blocks sample_panel, which
    # leads to celltype_model, so declaring it would make a cycle in any job holding the whole graph.
    description=(
        "Every gene of the model of the sample's own panel is measured (100% required); before that panel's "
        "model exists, every gene of the panel (all of them unless settings.panel_genes is configured)."
    ),
)
def spatial_cells_gene_overlap(
    context: dg.AssetCheckExecutionContext, spatial_cells: ad.AnnData, settings: PlatformSettings
) -> dg.AssetCheckResult:
    panel = panel_of_sample(spatial_cells, settings.panel_genes, sample_id=context.op_execution_context.partition_key)
    model_genes = latest_metadata_value(context.instance, CELLTYPE_MODEL, panel.id, MODEL_GENES_METADATA)
    if model_genes is not None:
        required, against = [str(g) for g in model_genes], f"celltype_model[{panel.id}]"
    else:
        required, against = list(panel.genes), f"panel {panel.id} (no model trained for it yet)"
    measured = panel_genes(spatial_cells)
    missing = missing_genes(required, measured)
    overlap = (len(required) - len(missing)) / max(len(required), 1)
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={
            "panel_id": panel.id,
            "compared_with": against,
            "required_genes": len(required),
            "genes_in_sample": len(required) - len(missing),
            "overlap_fraction": float(overlap),
            "missing_genes": ", ".join(missing[:50]),
        },
        description=None if not missing else f"{len(missing)} gene(s) of {against} not measured: {', '.join(missing[:10])}",
    )


def _numeric(d: dict) -> dict:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


#: what a sample must pass to be used by a shared asset (domain_model): every blocking check above
SPATIAL_CELLS_BLOCKING_CHECKS = tuple(
    sorted((spec.key for c in (spatial_cells_normalization, spatial_cells_gene_overlap) for spec in c.check_specs if spec.blocking),
           key=lambda k: k.name)
)
