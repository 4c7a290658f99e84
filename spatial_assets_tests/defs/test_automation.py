"""The automation conditions on a real instance, without computing anything.

Materializations and check results are reported to the instance (as an external pipeline would),
and the platform's own automation sensor is evaluated on it, so what the conditions request is
tested in seconds, tick by tick: a sample follows the model of its own panel only.
(``test_platform.py`` runs the same sensor on real data, end to end.)
"""

import warnings

import dagster as dg
import pytest
from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluationTargetMaterializationData

from spatial_assets.definitions import build_definitions
from spatial_assets.defs.deployment import build_resources
from spatial_assets.defs.settings import PlatformSettings
from spatial_assets_tests.defs.ticking import LocalDaemon, requested_asset_partitions

warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

PANEL_A, PANEL_B, PANEL_NEW = "p-aaaaaaaaaaaa", "p-bbbbbbbbbbbb", "p-cccccccccccc"
SAMPLE_CHECKS = ("spatial_cells_normalization", "spatial_cells_gene_overlap")


class Reporter:
    def __init__(self, instance: dg.DagsterInstance, defs: dg.Definitions):
        self.instance = instance
        self.daemon = LocalDaemon(defs, instance)

    def materialized(self, key: str, partition: str | None = None, **metadata) -> None:
        self.instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=key, partition=partition, metadata=metadata)
        )

    def checked(self, sample: str, name: str, passed: bool) -> None:
        """A check result on the latest spatial_cells[sample] (what check_passed looks at)."""
        flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey("spatial_cells"), asset_partitions=[sample])
        (record,) = self.instance.fetch_materializations(flt, limit=1).records
        target = AssetCheckEvaluationTargetMaterializationData(
            storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
        )
        self.instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(asset_key=dg.AssetKey("spatial_cells"), check_name=name, passed=passed,
                                    partition=sample, target_materialization_data=target)
        )

    def landed(self, sample: str, panel: str, failing_check: str | None = None) -> None:
        """A sample through samples_job: spatial_cells, its blocking checks, and (if they passed) sample_panel."""
        self.instance.add_dynamic_partitions("samples", [sample])
        self.materialized("spatial_cells", sample, panel_id=panel)
        for name in SAMPLE_CHECKS:
            self.checked(sample, name, passed=name != failing_check)
        if failing_check:
            return
        if panel not in self.instance.get_dynamic_partitions("panels"):
            self.instance.add_dynamic_partitions("panels", [panel])
        self.materialized("sample_panel", sample, panel_id=panel)

    def requested(self) -> dict[str, set]:
        """One tick of the automation sensor: asset → requested partitions (runs and backfills alike)."""
        result = self.daemon.tick("spatial_assets_automation")
        out: dict[str, set] = {}
        for request in getattr(result, "run_requests", None) or []:
            for key, partition in requested_asset_partitions(request):
                out.setdefault(key, set()).add(partition)
        return out


@pytest.fixture()
def reporter(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATIAL_ASSETS_HOME", str(tmp_path))
    defs = build_definitions({**build_resources("local"), "settings": PlatformSettings()})
    with dg.instance_for_test() as instance:
        r = Reporter(instance, defs)
        assert r.requested() == {}  # the sensor's first tick, on an empty platform
        yield r


def test_samples_follow_their_own_panels_model_only(reporter):
    for sample, panel in [("s1", PANEL_A), ("s2", PANEL_A), ("s3", PANEL_B)]:
        reporter.landed(sample, panel)
    first = reporter.requested()
    # each new panel gets its gene panel; no sample is annotated before its panel has a model
    assert first.get("gene_panel") == {PANEL_A, PANEL_B}
    assert "cell_type_annotations" not in first
    assert first.get("domain_model") == {None}

    reporter.materialized("celltype_model", PANEL_A, model_genes=["G1"])
    assert reporter.requested().get("cell_type_annotations") == {"s1", "s2"}  # s3's panel has no model yet
    reporter.materialized("celltype_model", PANEL_B, model_genes=["G1"])
    assert reporter.requested().get("cell_type_annotations") == {"s3"}
    for sample in ("s1", "s2", "s3"):
        reporter.materialized("cell_type_annotations", sample)
    assert "cell_type_annotations" not in reporter.requested()

    # a new model of panel B re-annotates the samples on panel B, and no other
    reporter.materialized("celltype_model", PANEL_B, model_genes=["G1"])
    assert reporter.requested().get("cell_type_annotations") == {"s3"}
    assert "cell_type_annotations" not in reporter.requested()  # requested once, not on every tick
    reporter.materialized("celltype_model", PANEL_A, model_genes=["G1"])
    assert reporter.requested().get("cell_type_annotations") == {"s1", "s2"}


def test_a_sample_on_a_new_panel_waits_for_its_model_without_blocking_others(reporter):
    reporter.landed("s1", PANEL_A)
    assert reporter.requested().get("gene_panel") == {PANEL_A}
    reporter.materialized("gene_panel", PANEL_A)  # what the requested runs would have done
    reporter.materialized("celltype_model", PANEL_A, model_genes=["G1"])
    reporter.requested()
    reporter.materialized("cell_type_annotations", "s1")
    reporter.requested()
    reporter.landed("s_new", PANEL_NEW)  # its panel's model is still missing
    reporter.landed("s2", PANEL_A)  # lands later, on the existing panel
    requested = reporter.requested()
    assert requested.get("gene_panel") == {PANEL_NEW}
    assert requested.get("cell_type_annotations") == {"s2"}  # not held back by the untrained panel
    reporter.materialized("cell_type_annotations", "s2")
    reporter.materialized("celltype_model", PANEL_NEW, model_genes=["G1"])
    assert reporter.requested().get("cell_type_annotations") == {"s_new"}


def test_a_failed_blocking_check_holds_the_sample_back(reporter):
    reporter.materialized("domain_model")
    reporter.landed("s1", PANEL_A)
    reporter.materialized("celltype_model", PANEL_A, model_genes=["G1"])
    reporter.landed("s_bad", PANEL_A, failing_check="spatial_cells_normalization")
    requested = reporter.requested()
    assert requested.get("cell_type_annotations") == {"s1"}
    assert requested.get("spatial_domains") == {"s1"} and requested.get("sample_panel") is None
