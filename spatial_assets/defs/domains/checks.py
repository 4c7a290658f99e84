"""Checks on every sample's domains."""

import anndata as ad
import dagster as dg

from spatial_assets.defs.partitions import samples_partitions
from spatial_assets.platform.validation import check_domains


@dg.asset_check(
    asset="spatial_domains",
    partitions_def=samples_partitions,
    description="Every cell has a domain (or is a flagged island); each level defines exactly k domains; no domain id leaks between levels.",
)
def domain_invariants(spatial_domains: ad.AnnData) -> dg.AssetCheckResult:
    report = check_domains(spatial_domains)
    return dg.AssetCheckResult(passed=report.passed, metadata=report.metadata, description=report.summary)
