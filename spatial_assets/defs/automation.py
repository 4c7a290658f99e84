"""Declarative automation used across the graph.

A reference change re-materializes ``reference_atlas`` (sensor), then ``eager`` carries it to the
training set, the model and every sample's annotations (the unpartitioned model fans out to all
sample partitions, which is exactly what a model change should do). A new sample only adds its
own ``spatial_cells`` partition, so only that partition's annotations become eligible.
"""

import dagster as dg


def on_upstream_change() -> dg.AutomationCondition:
    return dg.AutomationCondition.eager()


def downstream_of_checked() -> dg.AutomationCondition:
    """``eager`` that also waits for upstream blocking checks (normalization, gene overlap)."""
    return dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
