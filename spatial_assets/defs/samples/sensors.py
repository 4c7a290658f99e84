"""Watch the sample landing prefix: new or changed sample → partition + run of its job.

A cell-level h5ad runs ``samples_job`` (``spatial_cells`` + ``sample_panel``); an instrument output
folder (its platform told by the file names: no download) runs ``raw_samples_job`` (read,
fingerprint, segment, QC), after which ``spatial_cells`` follows by automation.
"""

import json

import dagster as dg

from spatial_assets.defs.history import latest_metadata_value
from spatial_assets.defs.jobs import raw_samples_job, samples_job
from spatial_assets.defs.partitions import samples_partitions
from spatial_assets.defs.resources import StorageResource
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.registry import RAW, prefix_uri, scan_landing

SPATIAL_CELLS = dg.AssetKey("spatial_cells")
RAW_SAMPLE = dg.AssetKey("raw_sample")
#: sample kind → (job the sensor runs, asset whose latest materialization records the landing fingerprint)
TARGETS = {RAW: (raw_samples_job.name, RAW_SAMPLE)}
DEFAULT_TARGET = (samples_job.name, SPATIAL_CELLS)


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
    store = storage.get_store()
    where = prefix_uri(store, settings.landing_prefix)
    samples, problems = scan_landing(store, settings.landing_prefix)
    for problem in problems:
        context.log.warning(f"skipped landing object under {where}: {problem}")
    if not samples:
        skipped = f" ({len(problems)} object(s) skipped: {problems[0]})" if problems else ""
        return dg.SkipReason(
            f"no samples under {where}{skipped}: land one with `spatial-assets sample land --id ID PATH` "
            "(a <id>.h5ad file, or a <id>/ folder: an instrument's output folder or one .h5ad)"
        )
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    existing = set(context.instance.get_dynamic_partitions(samples_partitions.name))
    new_keys = [s.sample_id for s in samples if s.sample_id not in existing]
    runs = []
    for s in samples:
        job_name, recorded_on = TARGETS.get(s.kind, DEFAULT_TARGET)
        if seen.get(s.sample_id) == s.fingerprint:
            continue
        if latest_metadata_value(context.instance, recorded_on, s.sample_id, "landing_fingerprint") == s.fingerprint:
            continue
        if s.kind == RAW:
            context.log.info(f"sample {s.sample_id!r}: raw folder, platform {s.platform or 'not recognised from the file names'}")
        runs.append(dg.RunRequest(partition_key=s.sample_id, run_key=f"sample:{s.sample_id}:{s.fingerprint}", job_name=job_name))
    if not runs and not new_keys:
        return dg.SkipReason(f"{len(samples)} sample(s) under {where}, none new or changed")
    cursor = {**seen, **{s.sample_id: s.fingerprint for s in samples}}
    return dg.SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=[samples_partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps(cursor, sort_keys=True),
    )
