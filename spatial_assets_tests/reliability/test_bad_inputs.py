"""One bad input must not break everyone, and nothing may trust what the bucket says about itself.

A small platform on the real SeaweedFS server (two references, two samples), run by its own
sensors through ``LocalDaemon`` until quiet, then attacked case by case (issue 10, items 2, 4, 5
and 7): a forged model with a matching card, truncated / 0-gene / Ensembl-id / z-scored samples,
a failed reference partition, a removed manifest entry, a sample landed again with other content,
and a manifest with bad entries among good ones. Each case asserts the refusal or recovery, its
message, and what storage holds afterwards; each brings the platform back to rest, so each passes
alone and in any order.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import uuid
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import anndata as ad
import dagster as dg
import numpy as np
import pytest

from spatial_assets.cli.audit import EXIT_STALE, run_audit
from spatial_assets.platform.manifest import MANIFEST_KEY, ReferenceEntry, dump_manifest
from spatial_assets.platform.registry import landing_key, register_reference
from spatial_assets.storage.seaweed import ensure_bucket
from spatial_assets_tests.defs.test_platform import Platform

warnings.filterwarnings("ignore", category=dg.PreviewWarning)
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", message=r".*(signature genes absent|signatures dropped).*")

DATA = Path(__file__).resolve().parents[2] / "data"
REF = DATA / "mouse_POA_scRNA_ref_Moffitt2018.h5ad"
MERFISH = DATA / "mouse_POA_MERFISH_Moffitt2018.h5ad"
GOOD = ["slice_a", "slice_b"]
REFS = ["ref_a", "ref_b"]
N_CELLS = 1200


def _ref_key(rid: str) -> str:
    return f"raw/references/{rid}.h5ad"


def _put_h5ad(plat: Platform, adata: ad.AnnData, key: str) -> None:
    path = plat.tmp / f"{uuid.uuid4().hex}.h5ad"
    adata.write_h5ad(path)
    plat.store.put_file(path, key)


def _manifest(plat: Platform) -> list[dict]:
    import yaml

    return yaml.safe_load(plat.store.read_bytes(MANIFEST_KEY))["references"]


def _write_manifest(plat: Platform, entries: list[dict] | str) -> None:
    import yaml

    text = entries if isinstance(entries, str) else yaml.safe_dump({"references": entries}, sort_keys=False)
    plat.store.write_bytes(MANIFEST_KEY, text.encode())


def _check_evaluation(instance: dg.DagsterInstance, run_id: str, name: str) -> dg.AssetCheckEvaluation:
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    (found,) = [e.dagster_event.event_specific_data for e in events if e.dagster_event.event_specific_data.check_name == name]
    return found


def _audit(plat: Platform, sample: str) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = run_audit(sample, store=plat.store, check_files=False)
    return code, buf.getvalue()


def _stale_links(text: str) -> list[str]:
    return sorted(line.split("]", 1)[1].split(":", 1)[0].strip() for line in text.splitlines() if line.strip().startswith("[STALE]"))


@pytest.fixture(scope="module")
def plat(s3_settings, tmp_path_factory):
    bucket = f"reliab-{uuid.uuid4().hex[:12]}"
    ensure_bucket(s3_settings, bucket)
    tmp = tmp_path_factory.mktemp("reliab")
    with dg.instance_for_test() as instance:
        p = Platform(s3_settings, bucket, tmp / "cache", instance)
        p.tmp = tmp
        ref = ad.read_h5ad(REF)
        for i, rid in enumerate(REFS):  # two references: the even and the odd cells of the POA atlas
            _put_h5ad(p, ref[i::2].copy(), _ref_key(rid))
            register_reference(p.store, ReferenceEntry(id=rid, uri=p.store.uri(_ref_key(rid)), label_column="cell_type"),
                               s3_settings=p.storage.s3_settings())
        merfish = ad.read_h5ad(MERFISH)
        p.merfish = merfish
        for sid, bregma in zip(GOOD, sorted(merfish.obs["Bregma"].unique())):
            p.land(sid, merfish[merfish.obs["Bregma"] == bregma][:N_CELLS].copy(), tmp)
        runs = p.daemon.run_until_quiet()
        assert runs and all(r.success for r in runs), [r for r in runs if not r.success]
        p.panel = p.panel_of(GOOD[0])
        yield p


# -- item 2: the model's integrity is checked against the instance, not the bucket ----------------

class _Payload:
    """Unpickling this creates ``marker``: what an attacker's code would do, made visible."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.marker),))


def test_forged_model_with_matching_card_is_refused_before_unpickling(plat):
    key = f"assets/celltype_model/{plat.panel}.pkl"
    original, original_card = plat.store.read_bytes(key), plat.store.read_bytes(key + ".card.json")
    annotations_before = plat.store.read_bytes(f"assets/cell_type_annotations/{GOOD[0]}.h5ad")
    n_before = plat.counts("cell_type_annotations")[GOOD[0]]
    marker = plat.tmp / f"payload-ran-{uuid.uuid4().hex}"
    evil = pickle.dumps(_Payload(str(marker)))
    card = {**json.loads(original_card), "sha256": hashlib.sha256(evil).hexdigest()}  # a card that matches the forgery
    plat.store.write_bytes(key, evil)
    plat.store.write_bytes(key + ".card.json", json.dumps(card).encode())
    try:
        result = plat.defs.resolve_job_def("celltyping_job").execute_in_process(
            instance=plat.instance, partition_key=GOOD[0], raise_on_error=False
        )
        assert not result.success
        errors = " ".join(str(e.event_specific_data.error) for e in result.all_events if e.is_step_failure)
        assert f"its card says sha256 {card['sha256']}" in errors and "Dagster instance recorded" in errors, errors
        assert not marker.exists(), "the forged pickle was unpickled"
        # nothing new was written: the annotations are the ones made with the genuine model
        assert plat.store.read_bytes(f"assets/cell_type_annotations/{GOOD[0]}.h5ad") == annotations_before
        assert plat.counts("cell_type_annotations")[GOOD[0]] == n_before
    finally:
        plat.store.write_bytes(key, original)
        plat.store.write_bytes(key + ".card.json", original_card)
    pickle.loads(evil)  # the payload is real: had it been unpickled, the marker would exist
    assert marker.exists()


# -- item 4: bad samples, failed and removed references ----------------------------------------

def _bad_samples(plat: Platform) -> dict[str, tuple[bytes | ad.AnnData, str]]:
    """sample id → (what lands, what its spatial_cells failure / check says)."""
    good = plat.merfish[plat.merfish.obs["Bregma"] == plat.merfish.obs["Bregma"].min()][:300].copy()
    path = plat.tmp / "whole.h5ad"
    good.write_h5ad(path)
    truncated = path.read_bytes()[: path.stat().st_size // 3]
    no_genes = good[:, []].copy()
    ensembl = good.copy()
    ensembl.var_names = [f"ENSMUSG{i:011d}" for i in range(ensembl.n_vars)]
    zscored = good.copy()
    X = np.asarray(zscored.X.todense() if hasattr(zscored.X, "todense") else zscored.X, dtype=np.float64)
    zscored.X = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-9)
    return {
        "bad_truncated": (truncated, "bad_truncated.h5ad: cannot read it as an .h5ad sample (Unable to synchronously open file (truncated file"),
        "bad_no_genes": (no_genes, "sample 'bad_no_genes': no genes left"),
        "bad_ensembl": (ensembl, "Ensembl ids"),
        "bad_zscored": (zscored, "spatial_cells_normalization"),
    }


def test_bad_samples_do_not_break_the_others_and_shared_model_skips_them(plat):
    bad = _bad_samples(plat)
    for sid, (content, _) in bad.items():  # uploaded straight to the bucket, as a careless user would
        key = landing_key("landing/samples/", sid)
        if isinstance(content, bytes):
            plat.store.write_bytes(key, content)
        else:
            _put_h5ad(plat, content, key)
    before = {k: plat.counts(k) for k in ("cell_type_annotations", "celltype_model", "training_set")}
    runs = plat.daemon.run_until_quiet()
    failed = {r.partition: " ".join(r.errors) for r in runs if not r.success}
    print(failed)
    assert set(failed) == set(bad), failed
    for sid, (_, says) in bad.items():
        assert says in failed[sid], (sid, failed[sid])
    # nothing was written for them, except the z-scored sample's spatial_cells (a blocking check
    # still writes the asset it checks) — which nothing downstream used
    for sid in bad:
        for asset in ("sample_panel", "cell_type_annotations", "spatial_domains"):
            assert not plat.store.exists(f"assets/{asset}/{sid}" + (".json" if asset == "sample_panel" else ".h5ad")), (asset, sid)
    assert {sid for sid in bad if plat.store.exists(f"assets/spatial_cells/{sid}.h5ad")} == {"bad_zscored"}
    # the good samples, their panel's model and training set were not touched
    assert {k: plat.counts(k) for k in before} == before
    # the shared domain model, refitted by hand, uses the good samples and reports the others
    result = plat.defs.resolve_job_def("domain_model_job").execute_in_process(instance=plat.instance, raise_on_error=False)
    assert result.success
    meta = plat.latest_metadata("domain_model")
    assert sorted(meta["used_inputs"]) == GOOD
    skipped = meta["skipped_inputs"]
    assert set(skipped) == set(bad), skipped
    assert skipped["bad_truncated"] == skipped["bad_no_genes"] == skipped["bad_ensembl"] == "its latest materialization failed"
    assert skipped["bad_zscored"] == "blocking check spatial_cells_normalization failed"
    check = _check_evaluation(plat.instance, result.run_id, "skipped_inputs")
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "4 spatial_cells partition(s) skipped" in check.description and "bad_zscored" in check.description
    # and the platform comes back to rest with the good samples re-domained on the refitted model
    runs = plat.daemon.run_until_quiet()
    assert all(r.success for r in runs), [r for r in runs if not r.success]
    assert {r.partition for r in runs} <= set(GOOD)


def test_failed_reference_does_not_block_training_and_removed_entries_leave_the_graph(plat):
    _reach_rest(plat)
    panel = plat.panel
    # a third reference whose file is not an h5ad: its reference_atlas partition fails
    plat.store.write_bytes(_ref_key("broken"), b"not an h5ad file")
    entries = _manifest(plat)
    _write_manifest(plat, [*entries, {"id": "broken", "uri": plat.store.uri(_ref_key("broken")), "label_column": "cell_type"}])
    runs = plat.daemon.run_until_quiet()
    assert [(r.partition, r.success) for r in runs if "reference_atlas" in r.assets] == [("broken", False)]
    status = plat.instance.get_status_by_partition(dg.AssetKey("reference_atlas"), ["broken"], plat.defs.get_assets_def("reference_atlas").partitions_def)
    assert status["broken"] == dg.AssetPartitionStatus.FAILED
    # a change to a good reference still reaches the training set: the failed partition does not block it
    ref = ad.read_h5ad(REF)
    _put_h5ad(plat, ref[1::2][:-20].copy(), _ref_key("ref_b"))
    runs = plat.daemon.run_until_quiet()
    assert [r.partition for r in runs if "training_set" in r.assets] == [panel]
    assert all(r.success for r in runs if r.partition != "broken"), [r for r in runs if not r.success]
    meta = plat.latest_metadata("training_set", panel)
    assert sorted(meta["used_inputs"]) == REFS
    assert meta["skipped_inputs"] == {"broken": "its latest materialization failed"}
    (ts_run,) = [r for r in runs if "training_set" in r.assets]
    check = _check_evaluation(plat.instance, ts_run.run_id, "skipped_inputs")
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN and "broken" in check.description
    # removing entries from the manifest removes their partitions; the training set follows
    _write_manifest(plat, [e for e in _manifest(plat) if e["id"] == "ref_a"])
    runs = plat.daemon.run_until_quiet()
    assert sorted(plat.instance.get_dynamic_partitions("references")) == ["ref_a"]
    assert all(r.success for r in runs), [r for r in runs if not r.success]
    assert [r.partition for r in runs if "training_set" in r.assets] == [panel]
    meta = plat.latest_metadata("training_set", panel)
    assert meta["used_inputs"] == ["ref_a"] and meta["skipped_inputs"] == {}
    assert plat.annotations(GOOD[0]).uns["provenance"]["references"].keys() == {"ref_a"}
    # put ref_b back (as `reference add` does): a partition again, and the training set uses it
    register_reference(plat.store, ReferenceEntry(id="ref_b", uri=plat.store.uri(_ref_key("ref_b")), label_column="cell_type"),
                       s3_settings=plat.storage.s3_settings())
    runs = plat.daemon.run_until_quiet()
    assert all(r.success for r in runs), [r for r in runs if not r.success]
    assert sorted(plat.latest_metadata("training_set", panel)["used_inputs"]) == REFS


def _reach_rest(plat: Platform) -> None:
    runs = plat.daemon.run_until_quiet()
    assert all(r.success for r in runs if not (r.partition or "").startswith(("bad_", "broken"))), runs


# -- item 5: a sample landed again re-stales every link of its chain --------------------------

def test_relanded_sample_is_stale_link_by_link_until_rematerialized(plat):
    _reach_rest(plat)
    sid = GOOD[1]
    code, text = _audit(plat, sid)
    assert code == 0 and "status: up to date" in text, text
    links = [line for line in text.splitlines() if line.strip().startswith("[ok]")]
    for name in ("landed file -> spatial_cells", "spatial_cells -> annotations", "spatial_cells -> spatial_domains",
                 "domain model -> spatial_domains", "annotations -> cell_type_summary", "annotations -> domain_composition",
                 "spatial_domains -> domain_composition", "spatial_domains -> domain_markers"):
        assert any(f"] {name}:" in line for line in links), (name, text)
    # other content under the same id (200 fewer cells)
    bregma = sorted(plat.merfish.obs["Bregma"].unique())[1]
    plat.land(sid, plat.merfish[plat.merfish.obs["Bregma"] == bregma][: N_CELLS - 200].copy(), plat.tmp, replace=True)
    code, text = _audit(plat, sid)
    assert code == EXIT_STALE and _stale_links(text) == ["landed file -> spatial_cells"], text
    # the landing sensor re-materializes spatial_cells: now everything made from the old cells is stale
    result = plat.daemon.tick("sample_landing_sensor")
    for request in result.run_requests:
        (run,) = plat.daemon.launch("sample_landing_sensor", request)
        assert run.success, run
    code, text = _audit(plat, sid)
    assert code == EXIT_STALE, text
    assert _stale_links(text) == ["spatial_cells -> annotations", "spatial_cells -> spatial_domains"], text
    # automation re-runs the chain; each link is fresh again, the summaries included
    runs = plat.daemon.run_until_quiet()
    assert all(r.success for r in runs), [r for r in runs if not r.success]
    assert {a for r in runs for a in r.assets} >= {"cell_type_annotations", "cell_type_summary", "spatial_domains",
                                                   "domain_composition", "domain_markers"}
    code, text = _audit(plat, sid)
    assert code == 0 and "status: up to date" in text, text
    assert plat.annotations(sid).n_obs == N_CELLS - 200


def test_audit_reports_a_stale_summary(plat):
    """A summary left behind (its annotations re-made without it) is a stale link, not 'up to date'."""
    _reach_rest(plat)
    sid = GOOD[0]
    key = f"assets/cell_type_summary/{sid}.parquet"
    original = plat.store.read_bytes(key)
    import pandas as pd

    table = pd.read_parquet(io.BytesIO(original))
    table.attrs["lineage"] = {"cell_type_annotations_run_id": "an-older-run"}
    buf = io.BytesIO()
    table.to_parquet(buf)
    plat.store.write_bytes(key, buf.getvalue())
    try:
        code, text = _audit(plat, sid)
        assert code == EXIT_STALE and _stale_links(text) == ["annotations -> cell_type_summary"], text
        assert "recorded=an-older-run" in text
    finally:
        plat.store.write_bytes(key, original)
    assert _audit(plat, sid)[0] == 0


# -- item 7: manifest errors are per entry ----------------------------------------------------

def test_manifest_errors_are_reported_per_entry_and_valid_entries_keep_working(plat):
    _reach_rest(plat)
    before_text = plat.store.read_bytes(MANIFEST_KEY).decode()
    partitions_before = sorted(plat.instance.get_dynamic_partitions("references"))
    good_lines = before_text.split("references:", 1)[1].rstrip("\n")
    ref_c_uri = plat.store.uri(_ref_key("ref_a"))
    broken = (
        "references:" + good_lines + "\n"
        f"- id: ref_c\n  uri: {ref_c_uri}\n  label_column: cell_type\n"            # new and valid
        "- id: bad_yaml\n  uri: s3://x/y.h5ad\n  label_column: [unclosed\n"           # invalid YAML
        f"- id: dup\n  uri: {ref_c_uri}\n  label_column: cell_type\n"
        f"- {{id: dup, uri: {ref_c_uri}, label_column: cell_type}}\n"                  # duplicate id
        "- id: on_gcs\n  uri: gs://elsewhere/atlas.h5ad\n  label_column: cell_type\n"  # unknown scheme
    )
    _write_manifest(plat, broken)
    result = plat.daemon.tick("reference_manifest_sensor")
    assert isinstance(result, dg.SensorResult)
    assert [r.partition_key for r in result.run_requests] == ["ref_c"]
    adds = [req for req in result.dynamic_partitions_requests if isinstance(req, dg.AddDynamicPartitionsRequest)]
    assert [list(a.partition_keys) for a in adds] == [["ref_c"]]
    assert not [req for req in result.dynamic_partitions_requests if isinstance(req, dg.DeleteDynamicPartitionsRequest)]
    (run,) = plat.daemon.launch("reference_manifest_sensor", result.run_requests[0])
    assert run.success, run
    # the next tick has nothing to do and says why each bad entry is skipped
    skip = plat.daemon.tick("reference_manifest_sensor")
    assert isinstance(skip, dg.SkipReason)
    message = skip.skip_message
    assert "3 manifest problem(s)" in message, message
    assert "references[" in message and "(id 'bad_yaml'): not valid YAML" in message
    assert "duplicate reference id 'dup'" in message
    assert "unknown URI scheme 'gs' in 'gs://elsewhere/atlas.h5ad'" in message
    assert sorted(plat.instance.get_dynamic_partitions("references")) == sorted([*partitions_before, "ref_c"])
    # `reference add` refuses to rewrite a manifest with bad entries (it would drop them) and names them
    from spatial_assets.platform.manifest import ManifestError

    with pytest.raises(ManifestError, match="unknown URI scheme 'gs'"):
        register_reference(plat.store, ReferenceEntry(id="ref_d", uri=ref_c_uri, label_column="cell_type"),
                           s3_settings=plat.storage.s3_settings())
    assert plat.store.read_bytes(MANIFEST_KEY).decode() == broken
    # restoring the manifest removes ref_c's partition again; everything comes back to rest
    plat.store.write_bytes(MANIFEST_KEY, before_text.encode())
    runs = plat.daemon.run_until_quiet()
    assert sorted(plat.instance.get_dynamic_partitions("references")) == partitions_before
    assert all(r.success for r in runs), [r for r in runs if not r.success]


def test_unreadable_manifest_removes_nothing(plat):
    _reach_rest(plat)
    before_text = plat.store.read_bytes(MANIFEST_KEY)
    partitions_before = sorted(plat.instance.get_dynamic_partitions("references"))
    plat.store.write_bytes(MANIFEST_KEY, b"references: [\n  {id: ref_a,\n")
    try:
        result = plat.daemon.tick("reference_manifest_sensor")
        assert isinstance(result, dg.SkipReason) and "not valid YAML" in result.skip_message
        assert sorted(plat.instance.get_dynamic_partitions("references")) == partitions_before
    finally:
        plat.store.write_bytes(MANIFEST_KEY, before_text)


def test_shared_assets_name_every_blocking_check_of_their_inputs(plat):
    """The blocking-check lists the shared assets use are exactly the graph's blocking checks."""
    from spatial_assets.defs.samples.checks import SPATIAL_CELLS_BLOCKING_CHECKS

    graph = plat.defs.get_repository_def().asset_graph
    for upstream, listed in ((dg.AssetKey("spatial_cells"), SPATIAL_CELLS_BLOCKING_CHECKS), (dg.AssetKey("reference_atlas"), ())):
        blocking = sorted((k for k in graph.get_check_keys_for_assets({upstream}) if graph.get(k).blocking), key=lambda k: k.name)
        assert list(listed) == blocking, upstream
