"""A test-only code location for the scale cases: the platform's per-sample shape with trivial work.

Per sample partition a light step (``sample_cells``, no pool — like ``spatial_cells``) feeds a heavy
step (``sample_annotations``, pool ``heavy`` and the real heavy op tags — like
``cell_type_annotations``). What is under test is the instance's concurrency machinery (backfill
tag limit, ``heavy`` pool) under the real daemon on Postgres, not the science: the steps only wait
(test code) long enough for runs to overlap. A backfill runs 4 partitions per run (a multi-run
backfill policy), so 20 partitions are 5 runs: each run costs a run-worker process start, and 5 are
enough to hit a limit of 3.
"""

import os
import time

import dagster as dg

from spatial_assets.defs.execution import op_tags_for

scale_samples = dg.DynamicPartitionsDefinition(name="scale_samples")
LIGHT_SECONDS = float(os.environ.get("SCALE_LIGHT_SECONDS", "6"))
HEAVY_SECONDS = float(os.environ.get("SCALE_HEAVY_SECONDS", "1"))
POLICY = dg.BackfillPolicy.multi_run(max_partitions_per_run=4)


@dg.asset(partitions_def=scale_samples, backfill_policy=POLICY, group_name="scale")
def sample_cells() -> dg.MaterializeResult:
    time.sleep(LIGHT_SECONDS)
    return dg.MaterializeResult()


@dg.asset(partitions_def=scale_samples, deps=[sample_cells], backfill_policy=POLICY, pool="heavy",
          op_tags=op_tags_for("cell_type_annotations"), group_name="scale")
def sample_annotations() -> dg.MaterializeResult:
    time.sleep(HEAVY_SECONDS)
    return dg.MaterializeResult()


# one process per run (the multiprocess executor would add a process spawn per step and measure
# nothing more): op pools are enforced by the in-process executor too
defs = dg.Definitions(assets=[sample_cells, sample_annotations], executor=dg.in_process_executor)
