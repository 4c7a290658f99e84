"""Keep ``reference_atlas`` partitions in step with the manifest and the files it points to.

The sensor diffs (manifest entry, ETag) fingerprints against its cursor; the nightly schedule
diffs them against what the last materialization recorded, which catches edits made in S3 outside
the platform even if the sensor was off. Both only HEAD the files.
"""

import json

import dagster as dg

from spatial_assets.defs.history import latest_metadata_value
from spatial_assets.defs.jobs import references_job
from spatial_assets.defs.partitions import references_partitions
from spatial_assets.defs.resources import StorageResource
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets.platform.registry import entry_fingerprint, read_manifest


def _fingerprints(context, storage: StorageResource, settings: PlatformSettings) -> dict[str, str]:
    out = {}
    for entry in read_manifest(storage.get_store(), settings.manifest_key):
        try:
            out[entry.id] = entry_fingerprint(entry, s3_settings=storage.s3_settings(), allowed=storage.allowed())
        except Exception as exc:  # one unreachable file must not hide the others
            context.log.warning(f"reference {entry.id!r}: cannot read {entry.uri}: {exc}")
    return out


REFERENCE_ATLAS = dg.AssetKey("reference_atlas")


@dg.sensor(
    job=references_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Reads the references manifest and HEADs each file: a new entry adds its `references` partition and runs "
        "references_job; a changed file or entry re-runs it. Training sets and models follow by automation."
    ),
)
def reference_manifest_sensor(
    context: dg.SensorEvaluationContext, storage: StorageResource, settings: PlatformSettings
) -> dg.SensorResult | dg.SkipReason:
    store = storage.get_store()
    where = store.uri(settings.manifest_key)
    current = _fingerprints(context, storage, settings)
    if not current:
        state = "lists no reference" if store.exists(settings.manifest_key) else "does not exist"
        return dg.SkipReason(
            f"no references: {where} {state} (or none of its files is reachable); add one with "
            "`spatial-assets reference add --id ID --uri URI --label-column COL`"
        )
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    existing = set(context.instance.get_dynamic_partitions(references_partitions.name))
    new_keys = [rid for rid in current if rid not in existing]
    # without a cursor entry, the last materialization decides (e.g. after the demo ran them)
    runs = [
        dg.RunRequest(partition_key=rid, run_key=f"reference:{rid}:{fp}")
        for rid, fp in current.items()
        if seen.get(rid) != fp and _recorded_fingerprint(context.instance, rid) != fp
    ]
    if not runs and not new_keys:
        return dg.SkipReason(f"{len(current)} reference(s) in {where}, none new or changed")
    return dg.SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=[references_partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps({**seen, **current}, sort_keys=True),
    )


@dg.schedule(
    cron_schedule="0 2 * * *",
    job=references_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Nightly re-observation of every reference file against its last materialization.",
)
def nightly_reference_reobservation(
    context: dg.ScheduleEvaluationContext, storage: StorageResource, settings: PlatformSettings
):
    """Changed files of registered references; new entries are the sensor's job (it adds partitions)."""
    current = _fingerprints(context, storage, settings)
    existing = set(context.instance.get_dynamic_partitions(references_partitions.name))
    requests = [
        dg.RunRequest(partition_key=rid, tags={"trigger": "nightly_reobservation"})
        for rid, fp in current.items()
        if rid in existing and _recorded_fingerprint(context.instance, rid) != fp
    ]
    where = storage.get_store().uri(settings.manifest_key)
    return requests or dg.SkipReason(f"all {len(current)} reference(s) of {where} unchanged since their last materialization")


def _recorded_fingerprint(instance: dg.DagsterInstance, rid: str):
    return latest_metadata_value(instance, REFERENCE_ATLAS, rid, "fingerprint")
