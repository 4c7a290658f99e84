"""Scale on the production instance (``deploy/dagster.postgres.yaml`` on a real Postgres, real daemon).

* 500 sample partitions are registered in one batched call and listed back (times printed; the
  test asserts counts and the number of INSERT statements, not a speed).
* A 20-partition backfill never runs more than the configured ``dagster/backfill`` limit at once,
  and no two ``heavy`` steps ever overlap (step start/end from the event log), while the limit is
  actually reached (so the check is not vacuous).
* One panel's new model fans out to every sample of that panel as one backfill, not one run per
  sample, and to no sample of another panel (``emit_backfills=True`` on the automation sensor of
  ``spatial_assets.definitions``, ``PanelModelCondition`` on the annotations).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy
import yaml
from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluationTargetMaterializationData
from dagster._core.storage.tags import BACKFILL_ID_TAG
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import WorkspaceFileTarget
from dagster_graphql.cli import execute_query

from spatial_assets.defs.automation import PANEL_ID_METADATA
from spatial_assets.defs.partitions import add_partitions, panels_partitions, samples_partitions
from spatial_assets_tests.daemon import daemon_env, running_daemon, wait_for, write_workspace
from spatial_assets_tests.deploy.postgres import PostgresServer

REPO = Path(__file__).resolve().parents[2]
POSTGRES_YAML = REPO / "deploy/dagster.postgres.yaml"
N_SAMPLES = 500
N_BACKFILL = 20
N_RUNS = 5  # scale_location's backfill policy: 4 partitions per run
N_FANOUT = 90  # samples on two panels (each sample's two check results are reported one by one: ~0.1 s apiece)
N_CHANGED = 60  # of them on the panel whose model changes
PANEL_CHANGED, PANEL_OTHER = "p-aaaaaaaaaaaa", "p-bbbbbbbbbbbb"

LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on InvalidStepError { invalidStepKey }
    ... on UnauthorizedError { message }
  }
}
"""


def _pg_home(tmp: Path, name: str) -> Path:
    home = tmp / name
    home.mkdir()
    shutil.copy(POSTGRES_YAML, home / "dagster.yaml")
    return home


def _pool_limit() -> int:
    return int(yaml.safe_load(POSTGRES_YAML.read_text())["concurrency"]["pools"]["default_limit"])


def _backfill_limit() -> int:
    limits = yaml.safe_load(POSTGRES_YAML.read_text())["concurrency"]["runs"]["tag_concurrency_limits"]
    (limit,) = [t["limit"] for t in limits if t["key"] == BACKFILL_ID_TAG and "value" not in t]
    return limit


def _run_partitions(run: dg.DagsterRun, partitions: list[str]) -> list[str]:
    """The partitions a (ranged) backfill run covers, from its partition-range tags."""
    if "dagster/partition" in run.tags:
        return [run.tags["dagster/partition"]]
    start, end = run.tags["dagster/asset_partition_range_start"], run.tags["dagster/asset_partition_range_end"]
    return partitions[partitions.index(start): partitions.index(end) + 1]


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1]))
    best = cur = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


def test_500_sample_partitions_register_in_one_batched_insert_and_list(pg_env: dict[str, str], tmp_path: Path) -> None:
    home = _pg_home(tmp_path, "pg")
    keys = [f"sample_{i:03d}" for i in range(N_SAMPLES)]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        inserts: list[str] = []

        def count(conn, cursor, statement, *args):
            if statement.lstrip().upper().startswith("INSERT") and "dynamic_partitions" in statement:
                inserts.append(statement)

        engine = sqlalchemy.engine.Engine  # every engine the instance uses
        sqlalchemy.event.listen(engine, "before_cursor_execute", count)
        try:
            t0 = time.perf_counter()
            added = add_partitions(instance, samples_partitions, keys)
            t_add = time.perf_counter() - t0
            t0 = time.perf_counter()
            listed = instance.get_dynamic_partitions("samples")
            t_list = time.perf_counter() - t0
            again = add_partitions(instance, samples_partitions, keys)  # idempotent: nothing new, no insert
        finally:
            sqlalchemy.event.remove(engine, "before_cursor_execute", count)
    print(f"\n[scale] registered {N_SAMPLES} sample partitions in {t_add * 1000:.0f} ms, "
          f"listed them in {t_list * 1000:.0f} ms (Postgres on loopback, contended machine)")
    assert added == keys and again == []
    assert sorted(listed) == keys
    assert len(inserts) == 1, f"{len(inserts)} INSERT statements for one batch"


def test_backfill_stays_under_its_limit_and_heavy_steps_never_overlap(
    postgres_server: PostgresServer, pg_env: dict[str, str], tmp_path: Path
) -> None:
    home = _pg_home(tmp_path, "pg")
    limit = _backfill_limit()
    partitions = [f"s{i:02d}" for i in range(N_BACKFILL)]
    workspace = write_workspace(tmp_path / "workspace.yaml", "spatial_assets_tests.deploy.scale_location", "scale")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        # the deploy step of deploy/README.md, `dagster instance concurrency set heavy 1`: with only
        # `default_limit`, Dagster 1.13 inserts the pool's row when the first step claims a slot, and two
        # runs doing so at once on Postgres fail one of them (UniqueViolation, then InFailedSqlTransaction)
        instance.event_log_storage.set_concurrency_slots("heavy", _pool_limit())
        instance.add_dynamic_partitions("scale_samples", partitions)
        # the backfill the UI would launch (the GraphQL mutation, in-process), before the daemon runs
        with WorkspaceProcessContext(instance, WorkspaceFileTarget(paths=[str(workspace)])) as ctx:
            result = execute_query(ctx, LAUNCH_BACKFILL, {"params": {
                "partitionNames": partitions,
                "assetSelection": [{"path": ["sample_cells"]}, {"path": ["sample_annotations"]}],
            }})
        launched = result["data"]["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill_id = launched["backfillId"]

        def finished_runs():
            runs = instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
            return runs if len(runs) == N_RUNS and all(r.is_finished for r in runs) else None

        log = tmp_path / "daemon.log"
        t0 = time.perf_counter()
        with running_daemon(home, workspace, daemon_env(pg_env), log):
            runs = wait_for(finished_runs, 420, f"{N_BACKFILL} backfill runs to finish", log=log, interval=1)
        elapsed = time.perf_counter() - t0
        assert {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
        covered = sorted(p for r in runs for p in _run_partitions(r, partitions))
        assert covered == partitions  # every partition exactly once

        records = instance.get_run_records(filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
        run_intervals = [(r.start_time, r.end_time) for r in records]
        heavy: list[tuple[float, float]] = []
        for r in records:
            starts = {e.step_key: e.timestamp for e in instance.all_logs(r.dagster_run.run_id, of_type=dg.DagsterEventType.STEP_START)}
            ends = {e.step_key: e.timestamp for e in instance.all_logs(r.dagster_run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)}
            heavy.append((starts["sample_annotations"], ends["sample_annotations"]))
        concurrency = instance.event_log_storage.get_concurrency_info("heavy")

    heavy.sort()
    overlaps = [(a, b) for a, b in zip(heavy, heavy[1:]) if b[0] < a[1]]
    max_runs = _max_overlap(run_intervals)
    print(f"\n[scale] {N_BACKFILL}-partition backfill ({N_RUNS} runs): {elapsed:.0f} s under the daemon, at most {max_runs} runs at once "
          f"(limit {limit}), heavy steps overlapping: {len(overlaps)} (contended machine)")
    assert overlaps == [], f"heavy steps overlapped: {overlaps[:3]}"
    assert max_runs <= limit
    assert max_runs >= 2, "the runs never overlapped: the backfill limit was not exercised"
    assert concurrency.claimed_slots == [] and concurrency.pending_steps == []


def _entry(key: str, partition: str | None, metadata: dict | None = None):
    """A runless materialization event (what an external pipeline reports), for one batched insert."""
    from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
    from dagster._core.events.log import EventLogEntry
    from dagster._core.instance.utils import RUNLESS_JOB_NAME, RUNLESS_RUN_ID

    materialization = dg.AssetMaterialization(key, partition=partition, metadata=metadata or {})
    event = DagsterEvent(event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value, job_name=RUNLESS_JOB_NAME,
                         event_specific_data=StepMaterializationData(materialization))
    return EventLogEntry(user_message="", level=20, job_name=RUNLESS_JOB_NAME, run_id=RUNLESS_RUN_ID, error_info=None,
                         timestamp=time.time(), step_key=None, dagster_event=event)


def _report_platform_state(instance: dg.DagsterInstance, panel_of: dict[str, str]) -> None:
    """The whole graph materialized, with passing blocking checks (as after a real run), for the
    samples ``panel_of`` pairs with their panels.

    Materializations go in batched inserts, in graph order; the blocking check results (the
    annotations wait for those of ``spatial_cells``, the models for those of ``training_set``)
    one by one, in a few threads: Dagster opens a connection per storage call, so this is
    connection-bound, not CPU-bound.
    """
    from concurrent.futures import ThreadPoolExecutor

    samples, panels = sorted(panel_of), sorted(set(panel_of.values()))
    store = instance.event_log_storage.store_event_batch
    store([_entry("reference_atlas", "poa")])
    store([_entry("spatial_cells", s, {PANEL_ID_METADATA: panel_of[s]}) for s in samples])
    store([_entry("sample_panel", s, {PANEL_ID_METADATA: panel_of[s]}) for s in samples])
    store([_entry("domain_model", None)])
    store([_entry(k, p, {PANEL_ID_METADATA: p}) for k in ("gene_panel", "training_set", "label_mapping", "celltype_model") for p in panels])
    store([_entry(k, s) for k in ("spatial_domains", "domain_markers", "cell_type_annotations", "cell_type_summary",
                                  "domain_composition") for s in samples])

    def checked(key: str, checks: tuple[str, ...], partitions: list[str]) -> list[tuple]:
        records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(key)), limit=len(partitions) + 10).records
        assert sorted(r.partition_key for r in records) == partitions
        return [(key, check, r) for r in records for check in checks]

    def passed(item: tuple) -> None:
        key, check, rec = item
        target = AssetCheckEvaluationTargetMaterializationData(storage_id=rec.storage_id, run_id=rec.run_id, timestamp=rec.timestamp)
        instance.report_runless_asset_event(dg.AssetCheckEvaluation(
            asset_key=dg.AssetKey(key), check_name=check, passed=True, partition=rec.partition_key,
            target_materialization_data=target))

    items = checked("spatial_cells", ("spatial_cells_normalization", "spatial_cells_gene_overlap"), samples)
    items += checked("training_set", ("training_set_normalization", "balanced_training_set"), panels)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(passed, items))


def test_one_model_change_fans_out_as_one_backfill_not_a_run_per_sample(
    pg_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new ``celltype_model[panel]`` → one backfill re-annotating that panel's samples, and only those.

    The samples' panels are what their ``sample_panel`` materializations name (the pairing
    :class:`~spatial_assets.defs.automation.PanelModelCondition` reads); the other panel's samples
    and their model stay untouched.
    """
    from spatial_assets.definitions import automation_sensor

    assert automation_sensor.emit_backfills and automation_sensor.default_status == dg.DefaultSensorStatus.RUNNING
    home = _pg_home(tmp_path, "pg")
    env = {**pg_env, "SPATIAL_ASSETS_DEPLOYMENT": "local", "SPATIAL_ASSETS_HOME": str(tmp_path / "sa_home")}
    panel_of = {f"sample_{i:03d}": (PANEL_CHANGED if i < N_CHANGED else PANEL_OTHER) for i in range(N_FANOUT)}
    on_changed = sorted(s for s, p in panel_of.items() if p == PANEL_CHANGED)
    workspace = write_workspace(tmp_path / "workspace.yaml", "spatial_assets.definitions", "spatial_assets")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("references", ["poa"])
        add_partitions(instance, samples_partitions, sorted(panel_of))
        add_partitions(instance, panels_partitions, [PANEL_CHANGED, PANEL_OTHER])
        t0 = time.perf_counter()
        _report_platform_state(instance, panel_of)
        print(f"\n[scale] reported the graph for {N_FANOUT} samples on 2 panels ({N_CHANGED} + {N_FANOUT - N_CHANGED}) "
              f"in {time.perf_counter() - t0:.1f} s")
        log = tmp_path / "daemon.log"

        def sensor_ticks():
            return [t for t in instance.get_ticks(*_sensor_selector(instance)) if t.status.value in ("SUCCESS", "SKIPPED")]

        with running_daemon(home, workspace, daemon_env(env), log):
            # first tick: the initial evaluation of a platform at rest
            (first,) = wait_for(lambda: sensor_ticks()[-1:], 240, "the automation sensor's first tick", log=log, interval=1)
            runs_before = {r.run_id for r in instance.get_runs()}
            backfills_before = instance.get_backfills()
            # the reference change has reached one panel's model: a new celltype_model[panel] materialization
            instance.report_runless_asset_event(dg.AssetMaterialization("celltype_model", partition=PANEL_CHANGED))
            requesting = wait_for(
                lambda: [t for t in sensor_ticks() if t.tick_id != first.tick_id and t.tick_data.run_requests],
                150, "an automation tick requesting the re-annotation", log=log, interval=1,
            )
            backfills = instance.get_backfills()
        new_runs = [r for r in instance.get_runs() if r.run_id not in runs_before]
    assert first.tick_data.run_requests in (None, []), f"the first tick of a platform at rest requested {first.tick_data.run_requests}"
    assert backfills_before == []
    (tick,) = requesting  # one tick did it
    (request,) = tick.tick_data.run_requests  # one request, and it is a backfill
    assert request.requires_backfill_daemon()
    assert len(backfills) == 1
    (backfill,) = backfills
    targeted = _target_partitions(backfill)
    print(f"[scale] one new model → {len(backfills)} backfill targeting "
          f"{ {k: len(v) for k, v in targeted.items()} }; "
          f"runs outside it: {sum(BACKFILL_ID_TAG not in r.tags for r in new_runs)}")
    assert sorted(targeted["cell_type_annotations"]) == on_changed  # every sample of the changed panel
    for key, partitions in targeted.items():  # and nothing of the other panel's samples, nor models
        assert set(partitions) <= set(on_changed), (key, sorted(set(partitions) - set(on_changed))[:5])
    assert "celltype_model" not in targeted
    assert all(r.tags.get(BACKFILL_ID_TAG) == backfill.backfill_id for r in new_runs)  # no run per sample outside it


def automation_sensor_name() -> str:
    from spatial_assets.definitions import automation_sensor

    return automation_sensor.name


def _sensor_selector(instance: dg.DagsterInstance):
    """(origin id, selector id) of the automation sensor's instigator state."""
    states = [s for s in instance.all_instigator_state() if s.name == automation_sensor_name()]
    if not states:
        return ("", "")
    state = states[0]
    return (state.instigator_origin_id, state.selector_id)


def _target_partitions(backfill) -> dict[str, list[str | None]]:
    """Asset → the partitions the backfill targets ([None] for an unpartitioned asset)."""
    subset = backfill.asset_backfill_data.target_subset
    out = {key.to_user_string(): list(parts.get_partition_keys()) for key, parts in subset.partitions_subsets_by_asset_key.items()}
    out.update({key.to_user_string(): [None] for key in subset.non_partitioned_asset_keys})
    return out
