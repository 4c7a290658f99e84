"""The daemon's loop, in the test process: tick the real sensors, launch what they request, repeat.

Every sensor of the definitions is ticked as the Dagster daemon ticks it (same definition, same
cursor handling, dynamic-partition requests applied); every run request is executed in process
on the same instance — sensor runs through the job they target, automation runs through the
implicit asset job with the requested asset selection and partition, as the daemon's run
launcher would. Nothing is materialized by hand, so what ends up materialized is what the
platform does by itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import dagster as dg


@dataclass
class LaunchedRun:
    sensor: str
    job: str
    partition: str | None
    assets: tuple[str, ...]
    success: bool
    run_id: str
    seconds: float


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
                elif isinstance(req, dg.DeleteDynamicPartitionsRequest):
                    for key in req.partition_keys:
                        self.instance.delete_dynamic_partition(req.partitions_def_name, key)
            if result.cursor is not None:
                self.cursors[name] = result.cursor
            if not result.run_requests and result.skip_reason is not None:
                self.skips[name] = result.skip_reason.skip_message or ""
        return result

    def launch_all(self, name: str, request: dg.RunRequest) -> list[LaunchedRun]:
        """A plain run request is one run; a backfill request (``emit_backfills``) is launched as the
        backfill daemon would: one run per partition, upstream levels first."""
        if request.asset_graph_subset is None:
            return [self.launch(name, request)]
        graph = self.repo.asset_graph
        nodes = list(request.asset_graph_subset.iterate_asset_partitions())
        keys = {n.asset_key for n in nodes}
        depth: dict[dg.AssetKey, int] = {}

        def level(key: dg.AssetKey) -> int:
            if key not in depth:
                parents = [p for p in graph.get(key).parent_keys if p in keys]
                depth[key] = 1 + max((level(p) for p in parents), default=-1)
            return depth[key]

        groups: dict[tuple[int, str], list[dg.AssetKey]] = {}
        for node in nodes:
            groups.setdefault((level(node.asset_key), node.partition_key or ""), []).append(node.asset_key)
        return [
            self.launch(name, dg.RunRequest(partition_key=pk or None, asset_selection=sorted(set(assets)), tags=request.tags))
            for (_, pk), assets in sorted(groups.items())
        ]

    def launch(self, name: str, request: dg.RunRequest) -> LaunchedRun:
        sensor = self.repo.get_sensor_def(name)
        job_name = request.job_name or (sensor.job_name if sensor.has_jobs else None)
        tags = {**(request.tags or {}), "dagster/sensor_name": name}
        if job_name:
            job = self.defs.resolve_job_def(job_name)
            selection = list(request.asset_selection) if request.asset_selection else None
        else:
            job = self.defs.resolve_implicit_global_asset_job_def()
            selection = list(request.asset_selection or [])
        t0 = time.perf_counter()
        result = job.execute_in_process(
            instance=self.instance, partition_key=request.partition_key, asset_selection=selection,
            tags=tags, raise_on_error=False,
        )
        planned = selection or [k for k in job.asset_layer.executable_asset_keys]
        run = LaunchedRun(name, job.name, request.partition_key, tuple(sorted(k.to_user_string() for k in planned)),
                          result.success, result.run_id, time.perf_counter() - t0)
        self.launched.append(run)
        return run

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
                        self.launch_all(name, request)
            if not requested:
                return self.launched[start:]
        raise AssertionError(f"still requesting runs after {max_rounds} rounds: {self.launched[-5:]}")
