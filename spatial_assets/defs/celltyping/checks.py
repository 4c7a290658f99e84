"""Checks on the training set and on every sample's annotations."""

import anndata as ad
import dagster as dg

from spatial_assets.defs.partitions import panels_partitions, samples_partitions
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.core.normalization import detect_normalization
from spatial_assets.platform.validation import check_balanced_set, check_confidence_invariants


@dg.asset_check(
    asset="training_set",
    partitions_def=panels_partitions,
    blocking=True,
    description="The training set is log1p of 10k-normalized data (what the model and the query preparation assume).",
)
def training_set_normalization(training_set: ad.AnnData) -> dg.AssetCheckResult:
    status = detect_normalization(training_set)
    return dg.AssetCheckResult(
        passed=status.x_state == "log1p_10k",
        metadata={"x_state": status.x_state, "raw_source": str(status.raw_source)},
    )


@dg.asset_check(
    asset="training_set",
    partitions_def=panels_partitions,
    blocking=True,
    description="Per-class counts ≤ cap, per-source shares match the strategy, target proportions honoured.",
)
def balanced_training_set(training_set: ad.AnnData, settings: PlatformSettings) -> dg.AssetCheckResult:
    report = check_balanced_set(training_set, tolerance=settings.balance_share_tolerance)
    return dg.AssetCheckResult(passed=report.passed, metadata=report.metadata, description=report.summary)


@dg.asset_check(
    asset="cell_type_annotations",
    partitions_def=samples_partitions,
    description="Confidence in [0, 1] without NaN; Unassigned exactly below the threshold; ontology ids are CL: ids or the unassigned marker.",
)
def confidence_invariants(cell_type_annotations: ad.AnnData) -> dg.AssetCheckResult:
    report = check_confidence_invariants(cell_type_annotations)
    return dg.AssetCheckResult(passed=report.passed, metadata=report.metadata, description=report.summary)


@dg.asset_check(
    asset="cell_type_annotations",
    partitions_def=samples_partitions,
    description="Warns when the Unassigned fraction exceeds the configured limit (a sign of a reference/panel mismatch).",
)
def unassigned_fraction(cell_type_annotations: ad.AnnData, settings: PlatformSettings) -> dg.AssetCheckResult:
    frac = float((cell_type_annotations.obs["cell_type"] == "Unassigned").mean())
    return dg.AssetCheckResult(
        passed=frac <= settings.unassigned_warn_fraction,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"unassigned_fraction": frac, "limit": settings.unassigned_warn_fraction},
    )
