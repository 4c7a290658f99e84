"""Watch the sample landing prefix: new or changed sample → partition + run of ``samples_job``."""

import json

import dagster as dg

from spatial_assets.defs.history import latest_metadata_value
from spatial_assets.defs.jobs import samples_job
from spatial_assets.defs.partitions import samples_partitions
from spatial_assets.defs.resources import StorageResource
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.registry import prefix_uri, scan_landing

SPATIAL_CELLS = dg.AssetKey("spatial_cells")


@dg.sensor(
    job=samples_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Lists the landing prefix (no downloads): a new sample adds its `samples` partition and runs samples_job; "
        "a changed file re-runs it. Annotations, summary and domains follow by declarative automation."
    ),
)
def sample_landing_sensor(
    context: dg.SensorEvaluationContext, storage: StorageResource, settings: PlatformSettings
) -> dg.SensorResult | dg.SkipReason:
    store = storage.get_store()
    where = prefix_uri(store, settings.landing_prefix)
    samples, problems = scan_landing(store, settings.landing_prefix)
    for problem in problems:
        context.log.warning(f"skipped landing object under {where}: {problem}")
    if not samples:
        skipped = f" ({len(problems)} object(s) skipped: {problems[0]})" if problems else ""
        return dg.SkipReason(
            f"no samples under {where}{skipped}: land one with `spatial-assets sample land --id ID PATH` "
            "(a <id>.h5ad file or a <id>/ folder with one .h5ad)"
        )
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    existing = set(context.instance.get_dynamic_partitions(samples_partitions.name))
    new_keys = [s.sample_id for s in samples if s.sample_id not in existing]
    runs = [
        dg.RunRequest(partition_key=s.sample_id, run_key=f"sample:{s.sample_id}:{s.fingerprint}")
        for s in samples
        if seen.get(s.sample_id) != s.fingerprint
        and latest_metadata_value(context.instance, SPATIAL_CELLS, s.sample_id, "landing_fingerprint") != s.fingerprint
    ]
    if not runs and not new_keys:
        return dg.SkipReason(f"{len(samples)} sample(s) under {where}, none new or changed")
    cursor = {**seen, **{s.sample_id: s.fingerprint for s in samples}}
    return dg.SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=[samples_partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps(cursor, sort_keys=True),
    )
