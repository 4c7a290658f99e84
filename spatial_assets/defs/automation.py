"""Declarative automation of the graph, and the sensor that evaluates it (running by default).

Inputs arrive through sensors: ``reference_manifest_sensor`` materializes ``reference_atlas``,
``sample_landing_sensor`` materializes ``spatial_cells`` + ``sample_panel``. Everything
downstream follows from the conditions here, each labelled so the UI's automation tab says why a
partition was (or was not) requested:

* a changed reference re-runs every panel's training set and model (``eager``), then the
  annotations of the samples on each panel;
* a new sample runs only its own partitions; if its genes define a new panel, ``sample_panel``
  adds the ``panels`` partition and that panel gets its own training set and model;
* a sample's annotations follow the model of **its own panel** only. The edge
  ``celltype_model → cell_type_annotations`` is declared (with ``AllPartitionMapping``, so the
  graph, lineage and the blocking-check rules see it), but Dagster has no built-in partition
  mapping from a sample to its panel (the pairing is data, recorded by ``sample_panel``), so
  ``eager`` would fan every panel's model change out to every sample. The annotations condition
  therefore ignores that edge and uses :class:`PanelModelCondition`, which looks the sample's
  panel up in the instance. Custom conditions run in the user code server, hence
  ``use_user_code_server=True`` on the sensor.
"""

import dagster as dg

#: keys of the assets the panel conditions read (names, not imports: the asset modules import this one)
SAMPLE_PANEL = dg.AssetKey("sample_panel")
CELLTYPE_MODEL = dg.AssetKey("celltype_model")
PANEL_ID_METADATA = "panel_id"
MODEL_GENES_METADATA = "model_genes"


def on_upstream_change() -> dg.AutomationCondition:
    return dg.AutomationCondition.eager().with_label("eager: when an upstream partition updates")


def downstream_of_checked() -> dg.AutomationCondition:
    """``eager`` that also waits for upstream blocking checks (normalization, gene overlap)."""
    return (dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()).with_label(
        "eager, once upstream blocking checks passed"
    )


def missing_not_failed() -> dg.AutomationCondition:
    """Missing, not being materialized, and its latest attempt did not fail.

    A level condition rather than ``newly_missing``: an asset that is missing at the sensor's
    first tick (the unpartitioned ``domain_model`` of a fresh deployment) is still requested; a
    failed attempt is not retried in a loop (materialize it by hand once the cause is fixed).
    """
    return (
        dg.AutomationCondition.missing()
        & ~dg.AutomationCondition.in_progress()
        & ~dg.AutomationCondition.newly_requested()
        & ~dg.AutomationCondition.execution_failed()
    ).with_label("missing and not failed")


def on_new_panel() -> dg.AutomationCondition:
    """Once per ``panels`` partition: a panel's genes never change (its id is their hash)."""
    return missing_not_failed().with_label("once per panel, when sample_panel adds it")


def fit_once_when_samples_exist() -> dg.AutomationCondition:
    """Once, when missing, after every registered sample's ``spatial_cells`` was attempted (never on none).

    "Attempted": materialized, or its latest attempt failed. A sample that failed (truncated,
    0 genes, ...) must not hold the shared model back forever; the asset itself uses only the
    samples that are usable and reports the others (``defs/health.py``).
    """
    missing = dg.AutomationCondition.missing()
    pending = (missing & ~dg.AutomationCondition.execution_failed()).with_label("not attempted yet")
    return (
        missing_not_failed()
        & ~dg.AutomationCondition.any_deps_match(pending).with_label("a sample not attempted yet")
        & ~dg.AutomationCondition.any_deps_in_progress()
        & dg.AutomationCondition.any_deps_match(~missing).with_label("some sample materialized")
    ).with_label("fitted once, when missing, on the usable samples present")


class PanelModelCondition(dg.AutomationCondition):
    """True for sample partitions whose own panel has a model (``newer=False``), or a model newer
    than the sample's latest materialization of the evaluated asset (``newer=True``).

    The sample → panel pairing is the ``panel_id`` the latest ``sample_panel[sample]``
    materialization recorded; the model is ``celltype_model[panel]``. Three instance queries per
    evaluation (latest storage id per partition of the three assets, plus one fetch of the
    ``sample_panel`` records), however many samples and panels there are.
    """

    def __init__(self, newer: bool = False):
        self.newer = newer
        super().__init__()

    @property
    def name(self) -> str:
        return "own_panel_model_updated" if self.newer else "own_panel_model_available"

    @property
    def description(self) -> str:
        if self.newer:
            return "celltype_model of this sample's panel materialized after this partition"
        return "celltype_model of this sample's panel is materialized"

    def evaluate(self, context: dg.AutomationContext) -> dg.AutomationResult:
        from spatial_assets.defs.history import latest_metadata_by_partition, latest_storage_ids

        candidates = context.candidate_subset.expensively_compute_partition_keys()
        if not candidates:
            return dg.AutomationResult(context, context.get_empty_subset())
        instance = context.asset_graph_view.instance
        panel_of = latest_metadata_by_partition(instance, SAMPLE_PANEL, PANEL_ID_METADATA, candidates)
        model_ids = latest_storage_ids(instance, CELLTYPE_MODEL)
        own_ids = latest_storage_ids(instance, context.key, candidates) if self.newer else {}
        true_keys = {
            sample
            for sample in candidates
            if panel_of.get(sample) in model_ids
            and (not self.newer or model_ids[panel_of[sample]] > own_ids.get(sample, -1))
        }
        return dg.AutomationResult(context, context.candidate_subset.compute_intersection_with_partition_keys(true_keys))


def on_own_panel_model() -> dg.AutomationCondition:
    """``eager`` for per-sample assets that read the model of the sample's own panel.

    Triggers: the partition is newly missing, a per-sample parent updated (spatial_cells,
    sample_panel), or the own panel's model was re-materialized. Waits for: the own panel's model
    to exist, the per-sample parents to exist and not be in progress, and upstream blocking checks.
    The other panels' models neither trigger nor block it.
    """
    model = dg.AssetSelection.assets(CELLTYPE_MODEL)
    return (
        (
            dg.AutomationCondition.newly_missing()
            | dg.AutomationCondition.any_deps_updated().ignore(model).with_label("sample inputs updated")
            | PanelModelCondition(newer=True).newly_true().with_label("own panel's model updated")
        ).since_last_handled()
        & ~dg.AutomationCondition.any_deps_missing().ignore(model).with_label("sample inputs missing")
        & ~dg.AutomationCondition.any_deps_in_progress().ignore(model).with_label("sample inputs in progress")
        & ~dg.AutomationCondition.in_progress()
        & PanelModelCondition(newer=False)
        & dg.AutomationCondition.all_deps_blocking_checks_passed()
    ).with_label("eager, on the model of the sample's own panel")


#: evaluates every condition above; runs by default (Dagster's default sensor starts STOPPED)
automation_sensor = dg.AutomationConditionSensorDefinition(
    "spatial_assets_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    use_user_code_server=True,  # PanelModelCondition is Python: evaluated where the code is
    # one reference change fans out to every sample of its panel: one backfill (limited by the
    # dagster/backfill tag concurrency) instead of one run per sample
    emit_backfills=True,
    minimum_interval_seconds=30,
    run_tags={"spatial_assets/trigger": "automation"},
    description="Declarative automation of everything downstream of the sensors (see each asset's condition).",
)
