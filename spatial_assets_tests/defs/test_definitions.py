"""Snapshot of the code location: a change to the graph must be a deliberate change here.

Asset keys with their partitions, group and kinds; dependencies; checks; jobs; sensors and
schedules; automation conditions and their labels; owners and code versions on every asset.
"""

import dagster as dg
import pytest

from spatial_assets.definitions import build_definitions
from spatial_assets.defs.deployment import build_resources
from spatial_assets.defs.settings import PlatformSettings

OWNERS = ["team:spatial-platform"]
# asset: (partitions, group, kinds)
EXPECTED_ASSETS = {
    "reference_atlas": ("references", "references", {"json", "s3"}),
    # a sample landed as an instrument output folder
    "raw_sample": ("samples", "segmentation", {"json", "s3"}),
    "segmented_cells": ("samples", "segmentation", {"anndata", "s3"}),
    "cell_boundaries": ("samples", "segmentation", {"geoparquet", "s3"}),
    "transcript_assignments": ("samples", "segmentation", {"parquet", "s3"}),
    "cell_qc": ("samples", "segmentation", {"anndata", "s3"}),
    "spatial_cells": ("samples", "samples", {"anndata", "s3"}),
    "sample_panel": ("samples", "samples", {"json", "s3"}),
    "gene_panel": ("panels", "celltyping", {"json", "s3"}),
    "training_set": ("panels", "celltyping", {"anndata", "s3"}),
    "label_mapping": ("panels", "celltyping", {"parquet", "s3"}),
    "celltype_model": ("panels", "celltyping", {"celltypist", "s3"}),
    "cell_type_annotations": ("samples", "celltyping", {"anndata", "celltypist", "s3"}),
    "cell_type_summary": ("samples", "celltyping", {"parquet", "s3"}),
    "domain_model": (None, "domains", {"numpy", "s3"}),
    "spatial_domains": ("samples", "domains", {"anndata", "s3"}),
    "domain_composition": ("samples", "domains", {"parquet", "s3"}),
    "domain_markers": ("samples", "domains", {"parquet", "s3"}),
    "spatially_variable_genes": ("samples", "domains", {"parquet", "s3"}),
    "spot_sample": ("spot_samples", "deconvolution", {"anndata", "s3"}),
    "spot_deconvolution": ("spot_samples", "deconvolution", {"anndata", "s3"}),
    "spot_domains": ("spot_samples", "deconvolution", {"anndata", "s3"}),
    "spot_domain_composition": ("spot_samples", "deconvolution", {"parquet", "s3"}),
}
# asset: {parent: partition mapping}
EXPECTED_DEPS = {
    "segmented_cells": {"raw_sample": "IdentityPartitionMapping"},
    "cell_boundaries": {"raw_sample": "IdentityPartitionMapping"},
    "transcript_assignments": {"raw_sample": "IdentityPartitionMapping"},
    "cell_qc": {"segmented_cells": "IdentityPartitionMapping", "cell_boundaries": "IdentityPartitionMapping",
                "raw_sample": "IdentityPartitionMapping"},
    # a raw sample's cells come from cell_qc (a sample landed as h5ad has no cell_qc partition)
    "spatial_cells": {"cell_qc": "IdentityPartitionMapping"},
    "sample_panel": {"spatial_cells": "IdentityPartitionMapping"},
    "gene_panel": {"sample_panel": "AllPartitionMapping"},
    "training_set": {"reference_atlas": "AllPartitionMapping", "gene_panel": "IdentityPartitionMapping"},
    "label_mapping": {"reference_atlas": "AllPartitionMapping", "gene_panel": "IdentityPartitionMapping"},
    "celltype_model": {"training_set": "IdentityPartitionMapping"},
    # the model of the sample's own panel: declared for every panel, chosen by the panel condition
    "cell_type_annotations": {
        "spatial_cells": "IdentityPartitionMapping",
        "sample_panel": "IdentityPartitionMapping",
        "celltype_model": "AllPartitionMapping",
    },
    "cell_type_summary": {"cell_type_annotations": "IdentityPartitionMapping"},
    "domain_model": {"spatial_cells": "AllPartitionMapping"},
    "spatial_domains": {"spatial_cells": "IdentityPartitionMapping", "domain_model": None},
    "domain_composition": {"spatial_domains": "IdentityPartitionMapping", "cell_type_annotations": "IdentityPartitionMapping"},
    "domain_markers": {"spatial_domains": "IdentityPartitionMapping"},
    "spatially_variable_genes": {"spatial_cells": "IdentityPartitionMapping"},
    # the same registered references as cell typing: a changed one refreshes every spot sample
    "spot_deconvolution": {"spot_sample": "IdentityPartitionMapping", "reference_atlas": "AllPartitionMapping"},
    "spot_domains": {"spot_deconvolution": "IdentityPartitionMapping"},
    "spot_domain_composition": {"spot_domains": "IdentityPartitionMapping"},
}
# (asset, check, blocking, partitions)
EXPECTED_CHECKS = {
    ("cell_qc", "cell_qc_invariants", True, "samples"),
    ("cell_qc", "cell_qc_fractions", False, "samples"),
    ("spatial_cells", "spatial_cells_normalization", True, "samples"),
    ("spatial_cells", "spatial_cells_gene_overlap", True, "samples"),
    ("training_set", "training_set_normalization", True, "panels"),
    ("training_set", "balanced_training_set", True, "panels"),
    ("cell_type_annotations", "confidence_invariants", False, "samples"),
    ("cell_type_annotations", "unassigned_fraction", False, "samples"),
    ("spatial_domains", "domain_invariants", False, "samples"),
    ("spot_deconvolution", "proportions_valid", True, "spot_samples"),
    # WARN: the shared assets name the inputs they left out (defs/health.py)
    ("training_set", "skipped_inputs", False, "panels"),
    ("domain_model", "skipped_inputs", False, None),
}
# job: (assets, partitions)
EXPECTED_JOBS = {
    "references_job": ({"reference_atlas"}, "references"),
    "samples_job": ({"spatial_cells", "sample_panel"}, "samples"),
    "raw_samples_job": ({"raw_sample", "segmented_cells", "cell_boundaries", "transcript_assignments", "cell_qc"}, "samples"),
    "panel_models_job": ({"gene_panel", "training_set", "label_mapping", "celltype_model"}, "panels"),
    "celltyping_job": ({"cell_type_annotations", "cell_type_summary"}, "samples"),
    "domain_model_job": ({"domain_model"}, None),
    "domains_job": ({"spatial_domains", "domain_composition", "domain_markers", "spatially_variable_genes"}, "samples"),
    "spot_samples_job": ({"spot_sample"}, "spot_samples"),
    "spot_deconvolution_job": ({"spot_deconvolution", "spot_domains", "spot_domain_composition"}, "spot_samples"),
}
# asset: label of its automation condition (None: driven by a sensor)
EXPECTED_AUTOMATION = {
    "reference_atlas": None,
    "raw_sample": None,
    "segmented_cells": "eager: when an upstream partition updates",
    "cell_boundaries": "eager: when an upstream partition updates",
    "transcript_assignments": "eager: when an upstream partition updates",
    "cell_qc": "eager: when an upstream partition updates",
    # h5ad samples: the landing sensor runs it (cell_qc stays missing); raw samples: after cell_qc's blocking check
    "spatial_cells": "eager, once upstream blocking checks passed",
    "sample_panel": "eager, once upstream blocking checks passed",
    "gene_panel": "once per panel, when sample_panel adds it",
    "training_set": "eager on the usable reference_atlas partitions",
    "label_mapping": "eager on the usable reference_atlas partitions",
    "celltype_model": "eager, once upstream blocking checks passed",
    "cell_type_annotations": "eager, on the model of the sample's own panel",
    "cell_type_summary": "eager: when an upstream partition updates",
    "domain_model": "fitted once, when missing, on the usable samples present",
    "spatial_domains": "eager, once upstream blocking checks passed",
    "domain_composition": "eager: when an upstream partition updates",
    "domain_markers": "eager: when an upstream partition updates",
    "spatially_variable_genes": "eager, once upstream blocking checks passed",
    "spot_sample": None,
    "spot_deconvolution": "eager, once upstream blocking checks passed",
    "spot_domains": "eager, once upstream blocking checks passed",
    "spot_domain_composition": "eager: when an upstream partition updates",
}


@pytest.fixture()
def defs(tmp_path, monkeypatch) -> dg.Definitions:
    monkeypatch.setenv("SPATIAL_ASSETS_HOME", str(tmp_path))
    return build_definitions({**build_resources("local"), "settings": PlatformSettings()})


def test_asset_graph_snapshot(defs):
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == set(EXPECTED_ASSETS)
    for name, (partitions, group, kinds) in EXPECTED_ASSETS.items():
        node = graph.get(dg.AssetKey(name))
        pdef = node.partitions_def
        assert (pdef.name if pdef is not None else None) == partitions, name
        assert isinstance(pdef, dg.DynamicPartitionsDefinition) or pdef is None, name
        assert node.group_name == group, name
        assert node.kinds == kinds, name
    for name, parents in EXPECTED_DEPS.items():
        key = dg.AssetKey(name)
        assert {k.to_user_string() for k in graph.get(key).parent_keys} == set(parents), name
        for parent, mapping in parents.items():
            if mapping is not None:
                found = type(graph.get_partition_mapping(key, dg.AssetKey(parent))).__name__
                assert found == mapping, (name, parent, found)


def test_every_asset_has_owners_code_version_and_description(defs):
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert list(node.owners) == OWNERS, key
        assert node.code_version, key
        assert node.description and len(node.description) > 40, key


def test_checks_snapshot(defs):
    graph = defs.resolve_asset_graph()
    found = set()
    for key in graph.asset_check_keys:
        spec = graph.get_check_spec(key)
        pdef = spec.partitions_def
        found.add((key.asset_key.to_user_string(), key.name, spec.blocking, pdef.name if pdef else None))
    assert found == EXPECTED_CHECKS


def test_jobs_snapshot(defs):
    assert {j.name for j in defs.jobs} == set(EXPECTED_JOBS)
    for name, (assets, partitions) in EXPECTED_JOBS.items():
        job = defs.resolve_job_def(name)
        assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == assets, name
        assert (job.partitions_def.name if job.partitions_def else None) == partitions, name
        assert job.description, name


def test_sensors_schedule_and_automation(defs):
    sensors = {s.name: s for s in defs.sensors}
    assert set(sensors) == {"reference_manifest_sensor", "sample_landing_sensor", "spot_landing_sensor", "spatial_assets_automation"}
    # all of them run without anyone switching them on (Dagster's default automation sensor would not)
    assert all(s.default_status == dg.DefaultSensorStatus.RUNNING for s in sensors.values())
    assert sensors["reference_manifest_sensor"].job_name == "references_job"
    assert {j.name for j in sensors["sample_landing_sensor"].jobs} == {"samples_job", "raw_samples_job"}
    assert sensors["spot_landing_sensor"].job_name == "spot_samples_job"
    automation = sensors["spatial_assets_automation"]
    assert isinstance(automation, dg.AutomationConditionSensorDefinition)
    assert automation.sensor_type.value == "AUTOMATION"  # evaluated in the user code server (not AUTO_MATERIALIZE)
    (schedule,) = defs.schedules
    assert schedule.cron_schedule == "0 2 * * *" and schedule.job_name == "references_job"
    graph = defs.resolve_asset_graph()
    labels = {}
    for key in graph.get_all_asset_keys():
        condition = graph.get(key).automation_condition
        labels[key.to_user_string()] = condition.get_label() if condition is not None else None
    assert labels == EXPECTED_AUTOMATION


def test_custom_conditions_are_the_panel_and_usable_inputs_ones(defs):
    """Only the annotations condition (own panel's model) and the training set's (usable references)
    need the user code server; every other condition would serialize."""
    graph = defs.resolve_asset_graph()
    custom = {
        key.to_user_string()
        for key in graph.get_all_asset_keys()
        if graph.get(key).automation_condition is not None and not graph.get(key).automation_condition.is_serializable
    }
    assert custom == {"cell_type_annotations", "training_set", "label_mapping"}
