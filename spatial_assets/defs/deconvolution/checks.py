"""The blocking check on every spot sample's proportions (what domains and downstream rely on)."""

import anndata as ad
import dagster as dg

from spatial_assets.deconvolution import check_proportions
from spatial_assets.defs.partitions import spot_samples_partitions


@dg.asset_check(
    asset="spot_deconvolution",
    partitions_def=spot_samples_partitions,
    blocking=True,
    description="Every spot's proportions sum to 1, none is negative or NaN.",
)
def proportions_valid(spot_deconvolution: ad.AnnData) -> dg.AssetCheckResult:
    report = check_proportions(spot_deconvolution)
    return dg.AssetCheckResult(
        passed=bool(report.passed),
        metadata={
            "n_spots": report.n_spots,
            "n_rows_not_summing_to_1": report.n_rows_not_summing_to_1,
            "n_negative": report.n_negative,
            "n_nan": report.n_nan,
            "max_row_sum_error": float(report.max_row_sum_error),
        },
        description=None if report.passed else "; ".join(report.problems)[:500],
    )
