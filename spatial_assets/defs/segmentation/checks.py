"""Checks on every raw sample's QC'd cells (the invariants of :func:`spatial_assets.segmentation.qc.qc_invariants`).

Two checks because the invariants have two severities: ``cell_qc_invariants`` (ERROR, blocking: no
cell left, or an empty cell after filtering — nothing downstream may use such cells) and
``cell_qc_fractions`` (WARN, not blocking: the control-probe fraction and the assigned-transcript
fraction, reported always and failed above / below the settings' limits). One check with a
severity chosen per run would not do: automation waits for every *blocking* check to pass, so a
WARN on a blocking check would hold the sample back as an ERROR does.
"""

import anndata as ad
import dagster as dg

from spatial_assets.defs.partitions import samples_partitions
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.raw_samples import QC_UNS, qc_limits
from spatial_assets.segmentation.qc import qc_invariants


def _evaluate(cell_qc: ad.AnnData, settings: PlatformSettings, severity: str) -> dg.AssetCheckResult:
    items = [i for i in qc_invariants(cell_qc, dict(cell_qc.uns.get(QC_UNS, {})), qc_limits(settings)) if i["severity"] == severity]
    failed = [i for i in items if not i["passed"]]
    metadata = {i["name"]: float(i["value"]) for i in items}
    metadata.update({f"{i['name']}_ok": bool(i["passed"]) for i in items})
    return dg.AssetCheckResult(
        passed=not failed,
        severity=dg.AssetCheckSeverity.ERROR if severity == "ERROR" else dg.AssetCheckSeverity.WARN,
        metadata=metadata,
        description="; ".join(i["message"] for i in (failed or items)),
    )


@dg.asset_check(
    asset="cell_qc",
    partitions_def=samples_partitions,
    blocking=True,
    description="After the QC filters at least one cell is left and no cell is empty (no panel transcript); blocks spatial_cells otherwise.",
)
def cell_qc_invariants(cell_qc: ad.AnnData, settings: PlatformSettings) -> dg.AssetCheckResult:
    return _evaluate(cell_qc, settings, "ERROR")


@dg.asset_check(
    asset="cell_qc",
    partitions_def=samples_partitions,
    description=(
        "Control-probe fraction of the transcripts in cells (WARN above settings.qc_warn_control_fraction) and "
        "fraction of transcripts assigned to cells (WARN below settings.qc_warn_assigned_fraction)."
    ),
)
def cell_qc_fractions(cell_qc: ad.AnnData, settings: PlatformSettings) -> dg.AssetCheckResult:
    return _evaluate(cell_qc, settings, "WARN")
