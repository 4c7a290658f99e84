"""Watch the spot landing prefix: new or changed spot sample → partition + run of ``spot_samples_job``."""

import json

import dagster as dg

from spatial_assets.defs.history import latest_metadata_value
from spatial_assets.defs.jobs import spot_samples_job
from spatial_assets.defs.partitions import spot_samples_partitions
from spatial_assets.defs.resources import StorageResource
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.registry import prefix_uri, scan_landing

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
    store = storage.get_store()
    where = prefix_uri(store, settings.spot_landing_prefix)
    samples, problems = scan_landing(store, settings.spot_landing_prefix)
    for problem in problems:
        context.log.warning(f"skipped spot landing object under {where}: {problem}")
    if not samples:
        return dg.SkipReason(f"no spot samples under {where}")
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    existing = set(context.instance.get_dynamic_partitions(spot_samples_partitions.name))
    new_keys = [s.sample_id for s in samples if s.sample_id not in existing]
    runs = [
        dg.RunRequest(partition_key=s.sample_id, run_key=f"spot_sample:{s.sample_id}:{s.fingerprint}")
        for s in samples
        if seen.get(s.sample_id) != s.fingerprint
        and latest_metadata_value(context.instance, SPOT_SAMPLE, s.sample_id, "landing_fingerprint") != s.fingerprint
    ]
    if not runs and not new_keys:
        return dg.SkipReason(f"{len(samples)} spot sample(s) under {where}, none new or changed")
    cursor = {**seen, **{s.sample_id: s.fingerprint for s in samples}}
    return dg.SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=[spot_samples_partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps(cursor, sort_keys=True),
    )
