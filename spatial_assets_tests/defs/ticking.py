"""The daemon's loop, in the test process: tick the real sensors, launch what they request, repeat.

Every sensor of the definitions is ticked as the Dagster daemon ticks it (same definition, same
cursor handling, dynamic-partition requests applied); every run request is executed in process
on the same instance — sensor runs through the job they target, automation runs through the
implicit asset job with the requested asset selection and partition, as the daemon's run
launcher would. Nothing is materialized by hand, so what ends up materialized is what the
platform does by itself.

The automation sensor emits backfills (``emit_backfills=True``): a request carrying an
``asset_graph_subset`` (``RunRequest.requires_backfill_daemon()``) is what the asset daemon
hands to the backfill daemon. :meth:`LocalDaemon.launch` executes it the way the backfill
daemon does: the backfill is recorded on the instance, then in iterations, every targeted asset
partition whose targeted parents have materialized is requested, grouped into one run per
(partitions definition, partition key) — an asset partition joins its parent's run when they
share that partition, as the daemon's breadth-first pass does — and whatever is downstream of a
failure is not requested. Each of those runs carries the ``dagster/backfill`` tag and is
recorded as a launched run (``LaunchedRun.backfill_id``). One run per partition is the daemon's
behaviour for assets without a backfill policy (every asset of the platform); a multi-partition
backfill policy is not emulated.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.storage.tags import BACKFILL_ID_TAG
from dagster._core.utils import make_new_backfill_id


@dataclass
class LaunchedRun:
    sensor: str
    job: str
    partition: str | None
    assets: tuple[str, ...]
    success: bool
    run_id: str
    seconds: float
    backfill_id: str | None = None


def requested_asset_partitions(request: dg.RunRequest) -> list[tuple[str, str | None]]:
    """(asset, partition) pairs a run request targets, whether a plain run or a backfill."""
    if request.requires_backfill_daemon():
        return sorted(
            ((ap.asset_key.to_user_string(), ap.partition_key) for ap in request.asset_graph_subset.iterate_asset_partitions()),
            key=lambda p: (p[0], p[1] or ""),
        )
    return [(k.to_user_string(), request.partition_key) for k in request.asset_selection or []]


@dataclass
class LocalDaemon:
    defs: dg.Definitions
    instance: dg.DagsterInstance
    cursors: dict[str, str | None] = field(default_factory=dict)
    launched: list[LaunchedRun] = field(default_factory=list)
    skips: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.repo = self.defs.get_repository_def()

    @property
    def sensor_names(self) -> list[str]:
        return [s.name for s in self.repo.sensor_defs]

    def tick(self, name: str) -> dg.SensorResult | dg.SkipReason:
        """One tick of sensor ``name``: partition requests applied, runs returned (not launched)."""
        sensor = self.repo.get_sensor_def(name)
        with dg.build_sensor_context(
            instance=self.instance, cursor=self.cursors.get(name), repository_def=self.repo,
            resources=self.defs.resources, sensor_name=name,
        ) as ctx:
            result = sensor(ctx)
        if isinstance(result, dg.SkipReason):
            self.skips[name] = result.skip_message or ""
            return result
        if isinstance(result, dg.SensorResult):
            for req in result.dynamic_partitions_requests or []:
                if isinstance(req, dg.AddDynamicPartitionsRequest):
                    self.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
            if result.cursor is not None:
                self.cursors[name] = result.cursor
            if not result.run_requests and result.skip_reason is not None:
                self.skips[name] = result.skip_reason.skip_message or ""
        return result

    def launch(self, name: str, request: dg.RunRequest) -> list[LaunchedRun]:
        """Execute a run request: one run, or every run of the backfill it requests."""
        if request.requires_backfill_daemon():
            return self._backfill(name, request)
        sensor = self.repo.get_sensor_def(name)
        job_name = request.job_name or (sensor.job_name if sensor.has_jobs else None)
        tags = {**(request.tags or {}), "dagster/sensor_name": name}
        if job_name:
            job = self.defs.resolve_job_def(job_name)
            selection = list(request.asset_selection) if request.asset_selection else None
        else:
            job = self.defs.resolve_implicit_global_asset_job_def()
            selection = list(request.asset_selection or [])
        run, _ = self._execute(name, job, request.partition_key, selection, tags)
        return [run]

    def _execute(self, name: str, job, partition_key: str | None, selection: list[dg.AssetKey] | None,
                 tags: dict[str, str], backfill_id: str | None = None) -> tuple[LaunchedRun, set[AssetKeyPartitionKey]]:
        t0 = time.perf_counter()
        result = job.execute_in_process(
            instance=self.instance, partition_key=partition_key, asset_selection=selection,
            tags=tags, raise_on_error=False,
        )
        planned = selection or [k for k in job.asset_layer.executable_asset_keys]
        run = LaunchedRun(name, job.name, partition_key, tuple(sorted(k.to_user_string() for k in planned)),
                          result.success, result.run_id, time.perf_counter() - t0, backfill_id)
        self.launched.append(run)
        materialized = {
            AssetKeyPartitionKey(e.event_specific_data.materialization.asset_key, e.event_specific_data.materialization.partition)
            for e in result.all_events if e.is_step_materialization
        }
        return run, materialized

    def _backfill(self, name: str, request: dg.RunRequest) -> list[LaunchedRun]:
        """The backfill daemon's iterations over ``request.asset_graph_subset``, in process."""
        subset = request.asset_graph_subset
        graph = self.repo.asset_graph
        job = self.defs.resolve_implicit_global_asset_job_def()
        backfill_id = make_new_backfill_id()
        tags = {**(request.tags or {}), "dagster/sensor_name": name}
        with dg.partition_loading_context(dynamic_partitions_store=self.instance):
            backfill = PartitionBackfill.from_asset_graph_subset(
                backfill_id=backfill_id, backfill_timestamp=time.time(), tags=tags, dynamic_partitions_store=self.instance,
                asset_graph_subset=subset, title=f"automation backfill from {name}", description=None, run_config=None,
            )
            self.instance.add_backfill(backfill)
            target = set(subset.iterate_asset_partitions())
            parents = {
                ap: {p for p in graph.get_parents_partitions(ap.asset_key, ap.partition_key).parent_partitions
                     if p in target and p != ap}
                for ap in target
            }

        def unit(ap: AssetKeyPartitionKey) -> tuple[str, str]:
            partitions_def = graph.get(ap.asset_key).partitions_def
            return (getattr(partitions_def, "name", None) or repr(partitions_def), ap.partition_key or "")

        runs: list[LaunchedRun] = []
        done: set[AssetKeyPartitionKey] = set()
        todo = set(target)
        while todo:
            groups: dict[tuple[str, str], set[AssetKeyPartitionKey]] = defaultdict(set)
            for ap in todo:
                if parents[ap] <= done:
                    groups[unit(ap)].add(ap)
            if not groups:
                break  # what is left is downstream of a failure: the daemon does not request it
            # an asset partition runs with its parents when they share the run's partition
            grown = True
            while grown:
                grown = False
                for ap in todo:
                    members = groups.get(unit(ap))
                    if members is not None and ap not in members and all(p in done or p in members for p in parents[ap]):
                        members.add(ap)
                        grown = True
            for (_, partition), members in sorted(groups.items()):
                keys = sorted({ap.asset_key for ap in members}, key=lambda k: k.to_user_string())
                run, materialized = self._execute(
                    name, job, partition or None, keys, {**tags, BACKFILL_ID_TAG: backfill_id}, backfill_id
                )
                runs.append(run)
                done |= materialized & members
                todo -= members
        status = BulkActionStatus.COMPLETED_SUCCESS if done == target else BulkActionStatus.COMPLETED_FAILED
        self.instance.update_backfill(self.instance.get_backfill(backfill_id).with_status(status))
        return runs

    def run_until_quiet(self, max_rounds: int = 25) -> list[LaunchedRun]:
        """Tick every sensor and launch its runs until a whole round requests nothing."""
        start = len(self.launched)
        for _ in range(max_rounds):
            requested = 0
            for name in self.sensor_names:
                result = self.tick(name)
                if isinstance(result, dg.SensorResult):
                    for request in result.run_requests or []:
                        requested += 1
                        self.launch(name, request)
            if not requested:
                return self.launched[start:]
        raise AssertionError(f"still requesting runs after {max_rounds} rounds: {self.launched[-5:]}")
