"""Watch the spot landing prefix: new or changed spot sample → partition + run of ``spot_samples_job``."""

import dagster as dg

from spatial_assets.defs.jobs import spot_samples_job
from spatial_assets.defs.landing import landing_tick
from spatial_assets.defs.partitions import spot_samples_partitions
from spatial_assets.defs.resources import StorageResource
from spatial_assets.defs.settings import PlatformSettings

SPOT_SAMPLE = dg.AssetKey("spot_sample")


@dg.sensor(
    job=spot_samples_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Lists the spot landing prefix (no downloads): a new spot sample (<id>.h5ad marked uns['spot'], or a "
        "<id>/ SpaceRanger Visium HD folder) adds its `spot_samples` partition and runs spot_samples_job; a "
        "changed one re-runs it. Deconvolution and domains follow by declarative automation."
    ),
)
def spot_landing_sensor(
    context: dg.SensorEvaluationContext, storage: StorageResource, settings: PlatformSettings
) -> dg.SensorResult | dg.SkipReason:
    return landing_tick(
        context,
        storage.get_store(),
        settings.spot_landing_prefix,
        spot_samples_partitions,
        target=lambda s: (None, SPOT_SAMPLE),
        noun="spot sample",
        empty_hint=lambda where, problems: f"no spot samples under {where}",
        run_key_prefix="spot_sample",
    )
