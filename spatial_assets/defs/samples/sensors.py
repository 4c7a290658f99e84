"""Watch the sample landing prefix: new or changed sample → partition + run of its job.

A cell-level h5ad runs ``samples_job`` (``spatial_cells`` + ``sample_panel``); an instrument output
folder (its platform told by the file names: no download) runs ``raw_samples_job`` (read,
fingerprint, segment, QC), after which ``spatial_cells`` follows by automation.
"""

import dagster as dg

from spatial_assets.defs.jobs import raw_samples_job, samples_job
from spatial_assets.defs.landing import landing_tick
from spatial_assets.defs.partitions import samples_partitions
from spatial_assets.defs.resources import StorageResource
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.registry import RAW, LandedSample

SPATIAL_CELLS = dg.AssetKey("spatial_cells")
RAW_SAMPLE = dg.AssetKey("raw_sample")
#: sample kind → (job the sensor runs, asset whose latest materialization records the landing fingerprint)
TARGETS = {RAW: (raw_samples_job.name, RAW_SAMPLE)}
DEFAULT_TARGET = (samples_job.name, SPATIAL_CELLS)


def _empty_hint(where: str, problems: list[str]) -> str:
    skipped = f" ({len(problems)} object(s) skipped: {problems[0]})" if problems else ""
    return (
        f"no samples under {where}{skipped}: land one with `spatial-assets sample land --id ID PATH` "
        "(a <id>.h5ad file, or a <id>/ folder: an instrument's output folder or one .h5ad)"
    )


def _describe(s: LandedSample) -> str | None:
    if s.kind != RAW:
        return None
    return f"sample {s.sample_id!r}: raw folder, platform {s.platform or 'not recognised from the file names'}"


@dg.sensor(
    jobs=[samples_job, raw_samples_job],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Lists the landing prefix (no downloads): a new sample adds its `samples` partition and runs samples_job "
        "(a cell-level .h5ad) or raw_samples_job (an instrument output folder, platform from its file names); a "
        "changed file re-runs it. Everything downstream follows by declarative automation."
    ),
)
def sample_landing_sensor(
    context: dg.SensorEvaluationContext, storage: StorageResource, settings: PlatformSettings
) -> dg.SensorResult | dg.SkipReason:
    return landing_tick(
        context,
        storage.get_store(),
        settings.landing_prefix,
        samples_partitions,
        target=lambda s: TARGETS.get(s.kind, DEFAULT_TARGET),
        noun="sample",
        empty_hint=_empty_hint,
        run_key_prefix="sample",
        describe=_describe,
    )
