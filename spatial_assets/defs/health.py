"""Which upstream partitions a shared asset may use: the ones that are fit, read from the instance.

A shared asset (``training_set[panel]`` reads every reference; ``domain_model`` reads every
sample) must not fail for everyone because one input is bad, nor silently train on an input that
failed its checks. :func:`usable_partitions` therefore splits the upstream partitions into the
usable ones — the latest materialization attempt succeeded (the instance's partition status is
MATERIALIZED, not FAILED or IN_PROGRESS) and every *blocking* check of the upstream asset passed
on that latest materialization — and the skipped ones, each with its reason. The asset loads the
usable ones itself (``context.load_asset_value``) and reports the rest (metadata ``used_inputs`` /
``skipped_inputs`` + the WARN check ``skipped_inputs``).

Why not an ``AssetIn`` with ``AllPartitionMapping``: Dagster would load every partition and fail
on a missing one (``allow_missing_partitions`` only skips missing objects: it would still read
a partition whose checks failed, or whose latest run failed after an older one succeeded). A
partition mapping cannot see check results either. So the edge stays declared (``AssetDep`` with
``AllPartitionMapping``: lineage, automation and the UI see it) and the reading is explicit here.

Automation follows the same rule: ``eager`` waits for every parent partition to exist, so one
failed reference would hold ``training_set`` back forever. :func:`on_usable_inputs_change` ignores
missing partitions of the fan-in edge and adds :class:`UsableInputsChanged`, which re-runs the
asset when the usable set differs from the ``used_inputs`` it recorded (an entry removed from the
manifest deletes its partition: nothing "updates", but the set changes). The blocking checks an
input must pass are named by the consuming asset (:func:`blocking_checks_of`): a run's context
has no repository to look them up in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus  # not re-exported by dagster

AssetPartitionStatus = dg.AssetPartitionStatus

SKIPPED_INPUTS_CHECK = "skipped_inputs"
#: metadata of a shared asset: the upstream partitions it used (what :class:`UsableInputsChanged` compares with)
USED_INPUTS_METADATA = "used_inputs"
SKIPPED_INPUTS_METADATA = "skipped_inputs"


@dataclass(frozen=True)
class InputSelection:
    """The upstream partitions used and the ones skipped (partition → why)."""

    upstream: dg.AssetKey
    used: list[str]
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        name = self.upstream.to_user_string()
        if not self.skipped:
            return f"every {name} partition used ({len(self.used)})"
        reasons = "; ".join(f"{k}: {why}" for k, why in sorted(self.skipped.items()))
        return f"{len(self.skipped)} {name} partition(s) skipped ({reasons}); {len(self.used)} used"

    def metadata(self) -> dict[str, Any]:
        return {
            USED_INPUTS_METADATA: dg.MetadataValue.json(sorted(self.used)),
            SKIPPED_INPUTS_METADATA: dg.MetadataValue.json(dict(sorted(self.skipped.items()))),
            "n_skipped_inputs": len(self.skipped),
        }

    def check_result(self, asset_key: str) -> dg.AssetCheckResult:
        """WARN (not blocking): the asset is valid on what it used, but someone should look at the rest."""
        return dg.AssetCheckResult(
            check_name=SKIPPED_INPUTS_CHECK,
            asset_key=asset_key,
            passed=not self.skipped,
            severity=dg.AssetCheckSeverity.WARN,
            metadata=self.metadata(),
            description=self.summary(),
        )


def skipped_inputs_check_spec(asset: str, upstream: str, partitions_def: dg.PartitionsDefinition | None = None) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        SKIPPED_INPUTS_CHECK,
        asset=asset,
        partitions_def=partitions_def,  # the asset's: one result per partition
        description=(
            f"Warns when {upstream} partitions were left out (not materialized, latest run failed, or a blocking "
            "check failed); metadata `skipped_inputs` names each with the reason."
        ),
    )


def blocking_checks_of(*checks: dg.AssetChecksDefinition) -> tuple[dg.AssetCheckKey, ...]:
    """The keys of the given check definitions that are blocking (what an input must pass to be used).

    Named by the asset that reads the input rather than looked up in the repository: a run's
    context has no repository (``execute_in_process``), and the job's asset graph holds only its
    own selection. ``spatial_assets_tests/reliability`` checks the lists against the whole graph.
    """
    out = []
    for definition in checks:
        for spec in definition.check_specs:
            if spec.blocking:
                out.append(spec.key)
    return tuple(sorted(out, key=lambda k: k.name))


def usable_partitions(
    instance: dg.DagsterInstance,
    asset_key: dg.AssetKey,
    partitions_def: dg.DynamicPartitionsDefinition,
    checks: list[dg.AssetCheckKey],
) -> InputSelection:
    """Split the current partitions of ``asset_key`` into usable and skipped (with reasons).

    Usable: latest attempt materialized (not failed, not in progress) and every check in
    ``checks`` evaluated on that latest materialization and passed. A partition removed from the
    graph (``DeleteDynamicPartitionsRequest``) is not a partition any more, so it is never listed.
    """
    keys = sorted(instance.get_dynamic_partitions(str(partitions_def.name)))
    if not keys:
        return InputSelection(asset_key, [], {})
    status = instance.get_status_by_partition(asset_key, keys, partitions_def) or {}
    infos = {}
    if checks:
        for info in instance.event_log_storage.get_asset_check_partition_info(list(checks), partition_keys=keys):
            infos[(info.check_key, info.partition_key)] = info
    used, skipped = [], {}
    for key in keys:
        state = status.get(key)
        if state == AssetPartitionStatus.FAILED:
            skipped[key] = "its latest materialization failed"
        elif state == AssetPartitionStatus.IN_PROGRESS:
            skipped[key] = "being materialized"
        elif state != AssetPartitionStatus.MATERIALIZED:
            skipped[key] = "not materialized"
        else:
            reason = _check_problem(infos, checks, key)
            if reason:
                skipped[key] = reason
            else:
                used.append(key)
    return InputSelection(asset_key, used, skipped)


def _check_problem(infos: dict, checks: list[dg.AssetCheckKey], key: str) -> str | None:
    for check_key in checks:
        info = infos.get((check_key, key))
        if info is None or not info.is_current:
            return f"blocking check {check_key.name} has not run on its latest materialization"
        if info.latest_execution_status == AssetCheckExecutionRecordStatus.FAILED:
            return f"blocking check {check_key.name} failed"
        if info.latest_execution_status != AssetCheckExecutionRecordStatus.SUCCEEDED:
            return f"blocking check {check_key.name} has not finished"
    return None


def select_usable_inputs(
    context: dg.AssetExecutionContext,
    upstream: dg.AssetKey,
    partitions_def: dg.DynamicPartitionsDefinition,
    checks: tuple[dg.AssetCheckKey, ...] = (),
) -> InputSelection:
    """:func:`usable_partitions` of ``upstream`` (``checks``: its blocking checks); logs what is skipped."""
    selection = usable_partitions(context.instance, upstream, partitions_def, list(checks))
    if selection.skipped:
        context.log.warning(selection.summary())
    return selection


def load_partitions(context: dg.AssetExecutionContext, upstream: dg.AssetKey, keys: list[str], python_type: Any = None) -> dict[str, Any]:
    """``{partition: value}`` of the given partitions, each read through the upstream asset's IO manager."""
    out = {}
    for key in keys:
        value = context.load_asset_value(upstream, partition_key=key, python_type=python_type)
        # the IO manager hands a mapping-typed read of one partition back as {partition: value}
        out[key] = value[key] if isinstance(value, dict) and list(value) == [key] else value
    return out


def require_some(selection: InputSelection, asset: str) -> InputSelection:
    """Refuse to build ``asset`` on nothing, naming every skipped partition and why."""
    if not selection.used:
        name = selection.upstream.to_user_string()
        why = "; ".join(f"{k}: {r}" for k, r in sorted(selection.skipped.items())) or "there is none"
        raise ValueError(f"{asset}: no usable {name} partition ({why})")
    return selection


class UsableInputsChanged(dg.AutomationCondition):
    """True for partitions of the evaluated asset whose usable upstream partitions (see
    :func:`usable_partitions`) differ from the ``used_inputs`` its latest materialization recorded.

    This is what brings a shared asset back in step when an input leaves the graph (a manifest
    entry removed → its partition deleted) or an input it skipped becomes usable without being
    re-materialized (a check re-run that now passes). Partitions never materialized are False
    (``newly_missing`` handles them). Queries: the upstream statuses and check infos once, plus the
    latest metadata of the candidate partitions.
    """

    def __init__(self, upstream: dg.AssetKey, partitions_def: dg.DynamicPartitionsDefinition, checks: tuple[dg.AssetCheckKey, ...] = ()):
        self.upstream = upstream
        self.upstream_partitions = partitions_def
        self.checks = tuple(checks)
        super().__init__()

    @property
    def name(self) -> str:
        return f"usable_{self.upstream.to_user_string()}_changed"

    @property
    def description(self) -> str:
        return f"the usable {self.upstream.to_user_string()} partitions differ from the ones last used"

    def evaluate(self, context: dg.AutomationContext) -> dg.AutomationResult:
        from spatial_assets.defs.history import latest_metadata_by_partition

        instance = context.asset_graph_view.instance
        subset = context.candidate_subset
        partitioned = context.partitions_def is not None
        if partitioned:
            candidates = list(subset.expensively_compute_partition_keys())
            if not candidates:
                return dg.AutomationResult(context, context.get_empty_subset())
            recorded = latest_metadata_by_partition(instance, context.key, USED_INPUTS_METADATA, candidates)
        else:
            if subset.is_empty:
                return dg.AutomationResult(context, context.get_empty_subset())
            event = instance.get_latest_materialization_event(context.key)
            entry = event.asset_materialization.metadata.get(USED_INPUTS_METADATA) if event and event.asset_materialization else None
            recorded = {None: entry.value} if entry is not None else {}
        if not recorded:
            return dg.AutomationResult(context, context.get_empty_subset())
        usable = sorted(usable_partitions(instance, self.upstream, self.upstream_partitions, list(self.checks)).used)
        changed = {pk for pk, used in recorded.items() if sorted(used or []) != usable}
        if not partitioned:
            return dg.AutomationResult(context, subset if changed else context.get_empty_subset())
        return dg.AutomationResult(context, subset.compute_intersection_with_partition_keys(changed))


def on_usable_inputs_change(
    upstream: dg.AssetKey, partitions_def: dg.DynamicPartitionsDefinition, checks: tuple[dg.AssetCheckKey, ...] = ()
) -> dg.AutomationCondition:
    """``eager`` for a shared asset reading many ``upstream`` partitions, that does not wait for all of them.

    Triggers: newly missing, any parent updated, or the set of usable ``upstream`` partitions
    changed (:class:`UsableInputsChanged`). Waits for: its other parents to exist, nothing
    upstream in progress, and at least one ``upstream`` partition materialized. A missing or
    failed ``upstream`` partition does not block it (``eager`` would wait for it forever): the
    asset itself uses only the usable ones and reports the rest.
    """
    fan_in = dg.AssetSelection.assets(upstream)
    return (
        (
            dg.AutomationCondition.newly_missing()
            | dg.AutomationCondition.any_deps_updated()
            | UsableInputsChanged(upstream, partitions_def, checks).newly_true()
        ).since_last_handled()
        & ~dg.AutomationCondition.any_deps_missing().ignore(fan_in).with_label(f"inputs other than {upstream.to_user_string()} missing")
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
        & dg.AutomationCondition.any_deps_match(~dg.AutomationCondition.missing()).allow(fan_in).with_label(
            f"some {upstream.to_user_string()} materialized"
        )
    ).with_label(f"eager on the usable {upstream.to_user_string()} partitions")
