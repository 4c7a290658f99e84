"""Blocking checks that guard a sample's annotations."""

import anndata as ad
import dagster as dg

from spatial_assets.defs.partitions import samples_partitions
from spatial_assets.core.normalization import detect_normalization
from spatial_assets.core.spatial import panel_genes


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
    additional_ins={"celltype_model": dg.AssetIn("celltype_model")},
    description="Every model gene is in the sample's panel (100% overlap required).",
)
def spatial_cells_gene_overlap(spatial_cells: ad.AnnData, celltype_model) -> dg.AssetCheckResult:
    panel = set(panel_genes(spatial_cells))
    genes = list(celltype_model.genes)
    missing = [g for g in genes if g not in panel]
    overlap = (len(genes) - len(missing)) / max(len(genes), 1)
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={
            "model_genes": len(genes),
            "genes_in_panel": len(genes) - len(missing),
            "overlap_fraction": float(overlap),
            "missing_genes": ", ".join(missing[:50]),
        },
    )


def _numeric(d: dict) -> dict:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
