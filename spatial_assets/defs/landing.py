"""What both landing sensors do: list a landing prefix, add new partitions, request runs for new or
changed objects. The sample and spot sensors differ only in their prefix, partitions, job per object
and the words of their skip messages (kept in one place so the two cannot drift apart)."""

import json
from collections.abc import Callable

import dagster as dg

from spatial_assets.defs.history import latest_metadata_value
from spatial_assets.platform.registry import LandedSample, prefix_uri, scan_landing
from spatial_assets.storage.stores import ObjectStore


def landing_tick(
    context: dg.SensorEvaluationContext,
    store: ObjectStore,
    prefix: str,
    partitions: dg.DynamicPartitionsDefinition,
    *,
    target: Callable[[LandedSample], tuple[str | None, dg.AssetKey]],
    noun: str,
    empty_hint: Callable[[str, list[str]], str],
    run_key_prefix: str,
    describe: Callable[[LandedSample], str | None] = lambda s: None,
) -> dg.SensorResult | dg.SkipReason:
    """One tick. ``target(sample)`` gives (job name or None for the sensor's own job, the asset whose
    latest materialization records the landing fingerprint); a sample is re-run when its fingerprint
    differs from both the cursor and that record (so a re-created instance does not re-run everything).
    ``describe(sample)`` may give a line to log for each sample that gets a run."""
    where = prefix_uri(store, prefix)
    samples, problems = scan_landing(store, prefix)
    for problem in problems:
        context.log.warning(f"skipped {noun} landing object under {where}: {problem}")
    if not samples:
        return dg.SkipReason(empty_hint(where, problems))
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    existing = set(context.instance.get_dynamic_partitions(partitions.name))
    new_keys = [s.sample_id for s in samples if s.sample_id not in existing]
    runs = []
    for s in samples:
        job_name, recorded_on = target(s)
        if seen.get(s.sample_id) == s.fingerprint:
            continue
        if latest_metadata_value(context.instance, recorded_on, s.sample_id, "landing_fingerprint") == s.fingerprint:
            continue
        line = describe(s)
        if line:
            context.log.info(line)
        runs.append(dg.RunRequest(partition_key=s.sample_id, run_key=f"{run_key_prefix}:{s.sample_id}:{s.fingerprint}", job_name=job_name))
    if not runs and not new_keys:
        return dg.SkipReason(f"{len(samples)} {noun}(s) under {where}, none new or changed")
    cursor = {**seen, **{s.sample_id: s.fingerprint for s in samples}}
    return dg.SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=[partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps(cursor, sort_keys=True),
    )
