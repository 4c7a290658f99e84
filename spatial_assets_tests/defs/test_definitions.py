"""Snapshot of the asset graph and checks: a change to the graph must be a deliberate change here."""

import dagster as dg

from spatial_assets.definitions import build_definitions
from spatial_assets.defs.deployment import build_resources
from spatial_assets.defs.settings import PlatformSettings

EXPECTED_ASSETS = {
    "reference_atlas": "references",
    "training_set": None,
    "label_mapping": None,
    "celltype_model": None,
    "spatial_cells": "samples",
    "cell_type_annotations": "samples",
    "cell_type_summary": "samples",
    "domain_model": None,
    "spatial_domains": "samples",
    "domain_composition": "samples",
    "domain_markers": "samples",
}
EXPECTED_DEPS = {
    "training_set": {"reference_atlas"},
    "celltype_model": {"training_set"},
    "cell_type_annotations": {"spatial_cells", "celltype_model"},
    "cell_type_summary": {"cell_type_annotations"},
    "domain_model": {"spatial_cells"},
    "spatial_domains": {"spatial_cells", "domain_model"},
    "domain_composition": {"spatial_domains", "cell_type_annotations"},
    "domain_markers": {"spatial_domains"},
}
EXPECTED_CHECKS = {
    ("spatial_cells", "spatial_cells_normalization", True),
    ("spatial_cells", "spatial_cells_gene_overlap", True),
    ("training_set", "training_set_normalization", True),
    ("training_set", "balanced_training_set", True),
    ("cell_type_annotations", "confidence_invariants", False),
    ("cell_type_annotations", "unassigned_fraction", False),
    ("spatial_domains", "domain_invariants", False),
}


def _defs(tmp_path) -> dg.Definitions:
    return build_definitions({**build_resources("local"), "settings": PlatformSettings()})


def test_asset_graph_snapshot(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATIAL_ASSETS_HOME", str(tmp_path))
    graph = _defs(tmp_path).resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == set(EXPECTED_ASSETS)
    for name, partitions in EXPECTED_ASSETS.items():
        pdef = graph.get(dg.AssetKey(name)).partitions_def
        assert (pdef.name if pdef is not None else None) == partitions, name
    for name, deps in EXPECTED_DEPS.items():
        assert {k.to_user_string() for k in graph.get(dg.AssetKey(name)).parent_keys} == deps, name


def test_checks_snapshot(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATIAL_ASSETS_HOME", str(tmp_path))
    graph = _defs(tmp_path).resolve_asset_graph()
    found = set()
    for key in graph.asset_check_keys:
        spec = graph.get_check_spec(key)
        found.add((key.asset_key.to_user_string(), key.name, spec.blocking))
        if key.asset_key.to_user_string() in {"spatial_cells", "cell_type_annotations", "spatial_domains"}:
            assert spec.partitions_def is not None and spec.partitions_def.name == "samples", key
    assert found == EXPECTED_CHECKS


def test_sensors_schedule_and_automation(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATIAL_ASSETS_HOME", str(tmp_path))
    defs = _defs(tmp_path)
    assert {s.name for s in defs.sensors} == {"reference_manifest_sensor", "sample_landing_sensor", "automation_sensor"}
    (schedule,) = defs.schedules
    assert schedule.cron_schedule == "0 2 * * *"
    graph = defs.resolve_asset_graph()
    automated = {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).automation_condition is not None}
    # inputs are driven by sensors, everything downstream by declarative automation
    assert automated == set(EXPECTED_ASSETS) - {"reference_atlas", "spatial_cells"}
