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
from spatial_assets.platform.manifest import ParsedManifest
from spatial_assets.platform.registry import entry_fingerprint, read_manifest_entries


def _fingerprints(context, storage: StorageResource, settings: PlatformSettings) -> tuple[dict[str, str], ParsedManifest, list[str]]:
    """Fingerprint of every valid, reachable entry; the manifest as parsed; one problem per bad entry.

    Each problem (invalid YAML in an entry, duplicate id, unknown URI scheme, unreachable file)
    names its entry and is logged on the tick; the other entries keep working.
    """
    parsed = read_manifest_entries(storage.get_store(), settings.manifest_key)
    problems = list(parsed.problems)
    out = {}
    for entry in parsed.entries:
        try:
            out[entry.id] = entry_fingerprint(entry, s3_settings=storage.s3_settings(), allowed=storage.allowed())
        except Exception as exc:  # one unreachable file must not hide the others
            problems.append(f"reference {entry.id!r}: cannot read {entry.uri}: {exc}")
    for problem in problems:
        context.log.warning(problem)
    return out, parsed, problems


def _problems_note(problems: list[str]) -> str:
    if not problems:
        return ""
    return f"; {len(problems)} manifest problem(s), those entries are skipped: " + " | ".join(problems)


REFERENCE_ATLAS = dg.AssetKey("reference_atlas")


@dg.sensor(
    job=references_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Reads the references manifest and HEADs each file: a new entry adds its `references` partition and runs "
        "references_job; a changed file or entry re-runs it; a removed entry removes its partition. A bad entry "
        "(invalid YAML, duplicate id, unknown URI scheme, unreachable file) is reported and skipped, the others "
        "keep working. Training sets and models follow by automation."
    ),
)
def reference_manifest_sensor(
    context: dg.SensorEvaluationContext, storage: StorageResource, settings: PlatformSettings
) -> dg.SensorResult | dg.SkipReason:
    store = storage.get_store()
    where = store.uri(settings.manifest_key)
    current, parsed, problems = _fingerprints(context, storage, settings)
    existing = set(context.instance.get_dynamic_partitions(references_partitions.name))
    # an entry removed from the manifest leaves the graph: its partition is deleted (only when the
    # whole manifest could be read: an unreadable part might be the entry itself)
    gone = sorted(existing - parsed.mentioned_ids) if parsed.complete else []
    if not current and not gone:
        state = "lists no usable reference" if store.exists(settings.manifest_key) else "does not exist"
        return dg.SkipReason(
            f"no references: {where} {state} (or none of its files is reachable); add one with "
            "`spatial-assets reference add --id ID --uri URI --label-column COL`" + _problems_note(problems)
        )
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    new_keys = [rid for rid in current if rid not in existing]
    # without a cursor entry, the last materialization decides (e.g. after the demo ran them)
    runs = [
        dg.RunRequest(partition_key=rid, run_key=f"reference:{rid}:{fp}")
        for rid, fp in current.items()
        if seen.get(rid) != fp and _recorded_fingerprint(context.instance, rid) != fp
    ]
    if not runs and not new_keys and not gone:
        return dg.SkipReason(f"{len(current)} reference(s) in {where}, none new or changed" + _problems_note(problems))
    if gone:
        context.log.info(f"reference(s) {gone} no longer in {where}: removing their partition(s)")
    requests = []
    if new_keys:
        requests.append(references_partitions.build_add_request(new_keys))
    if gone:
        requests.append(references_partitions.build_delete_request(gone))
    return dg.SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=requests,
        cursor=json.dumps({**{k: v for k, v in seen.items() if k not in gone}, **current}, sort_keys=True),
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
    current, _, _ = _fingerprints(context, storage, settings)
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
