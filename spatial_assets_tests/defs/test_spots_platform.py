"""Spot-level samples end to end on a real S3 server (SeaweedFS), run by the platform's own sensors.

The module fixture registers the POA scRNA-seq reference and lands, under ``landing/spots/``, real
pseudo-spots: the cells of one POA MERFISH slice summed into square bins of 6 cell spacings (counts
recovered from MERFISH's per-volume values, as in ``benchmarks/bench_deconvolution.py``), so the true
composition of every spot is known; and a bad spot table (one non-integer count). No cell sample is
landed: the cell-typing and cell-domain assets stay idle. Then the real sensors (reference manifest,
spot landing, automation) are ticked until nothing more is requested. Each test reads that state or
changes it and lets the sensors bring it back to rest, so each passes alone.
"""

import uuid
import warnings

import anndata as ad
import dagster as dg
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.celltyping.ontology import apply_ontology
from spatial_assets.celltyping.pipeline import POA_LABEL_MAP
from spatial_assets.deconvolution import PROPORTIONS_KEY, check_proportions
from spatial_assets.deconvolution.synthetic import TRUTH_KEY, cell_spacing, pseudo_spots, undo_per_cell_scaling
from spatial_assets.platform.manifest import ReferenceEntry
from spatial_assets.platform.registry import register_reference
from spatial_assets.platform.spots import SPOT_LANDING_PREFIX
from spatial_assets.storage.seaweed import ensure_bucket
from spatial_assets_tests.defs.test_platform import MERFISH, REF, REF_URI_KEY, Platform, _check_evaluations

warnings.filterwarnings("ignore", category=dg.PreviewWarning)
warnings.filterwarnings("ignore", category=dg.BetaWarning)

GOOD, BAD, SECOND = "poa_spots", "poa_spots_bad", "poa_spots_b"
PLACEHOLDERS = ["Ambiguous", "Unstable"]  # as in the benchmark's case (a)
SPOT_ASSETS = ("spot_sample", "spot_deconvolution", "spot_domains", "spot_domain_composition")


def _pseudo_spots(merfish: ad.AnnData, genes: list[str], bregma: float) -> ad.AnnData:
    m = merfish[np.isclose(merfish.obs["Bregma"].to_numpy(), bregma)]
    counts, _, _ = undo_per_cell_scaling(m[:, genes].X)
    xy = np.asarray(m.obsm["spatial"])
    spots = pseudo_spots(counts, xy, m.obs["Cell_class_major"].astype(str).to_numpy(), genes,
                         bin_size=6 * cell_spacing(xy), ignore_labels=("Ambiguous",))  # fmt: skip
    spots.X = sp.csr_matrix(np.rint(spots.X.toarray()), dtype=np.float32)
    return spots


class SpotPlatform(Platform):
    def land_spots(self, sample_id: str, adata: ad.AnnData) -> None:
        path = self.tmp / f"{sample_id}.h5ad"
        landed = adata.copy()
        landed.obsm.pop(TRUTH_KEY, None)  # the truth stays with the test
        landed.write_h5ad(path)
        self.store.put_file(path, f"{SPOT_LANDING_PREFIX}{sample_id}.h5ad")

    def stored(self, key: str, sample_id: str) -> ad.AnnData:
        return ad.read_h5ad(self.store.get_file(f"assets/{key}/{sample_id}.h5ad"))


@pytest.fixture(scope="module")
def spots_platform(s3_settings, tmp_path_factory):
    bucket = f"spots-{uuid.uuid4().hex[:12]}"
    ensure_bucket(s3_settings, bucket)
    tmp = tmp_path_factory.mktemp("spots")
    with dg.instance_for_test() as instance:
        p = SpotPlatform(s3_settings, bucket, tmp / "cache", instance)
        p.tmp = tmp
        assert p.daemon.run_until_quiet() == []
        p.empty_skips = dict(p.daemon.skips)
        ref = ad.read_h5ad(REF)
        p.write_reference(ref, tmp)
        entry = ReferenceEntry(id="poa", uri=p.store.uri(REF_URI_KEY), label_column="cell_type", placeholder_labels=PLACEHOLDERS)
        register_reference(p.store, entry, s3_settings=p.storage.s3_settings())
        merfish = ad.read_h5ad(MERFISH)
        slices = sorted(merfish.obs["Bregma"].unique())
        p.truth = {GOOD: _pseudo_spots(merfish, list(ref.var_names), slices[1]),
                   SECOND: _pseudo_spots(merfish, list(ref.var_names), slices[0])}  # fmt: skip
        bad = p.truth[GOOD][:100].copy()
        X = bad.X.toarray()
        X[7, 3] += 0.5
        bad.X = sp.csr_matrix(X)
        p.land_spots(GOOD, p.truth[GOOD])
        p.land_spots(BAD, bad)
        p.initial_runs = p.daemon.run_until_quiet()
        for r in p.initial_runs:
            print(f"{r.seconds:6.1f}s {r.sensor:28s} {r.job:24s} {r.partition}  {','.join(r.assets)} ok={r.success}")
        yield p


def _ontology_table() -> pd.DataFrame:
    """The reference's labels as the training set harmonises them (label → cell_type name, CL id)."""
    _, table = apply_ontology(ad.read_h5ad(REF), label_column="cell_type")
    return table[~table["label"].isin(PLACEHOLDERS)]


def _mean_r(pred: pd.DataFrame, truth: pd.DataFrame) -> float:
    """Mean per-spot Pearson r in the MERFISH classes (scRNA labels mapped with the data/README.md map)."""
    original = dict(zip(_ontology_table()["cell_type"], _ontology_table()["label"]))
    Q = pd.DataFrame(0.0, index=pred.index, columns=list(truth.columns) + ["<none>"])
    for name in pred.columns:
        lab = original[name]
        target = POA_LABEL_MAP.get(lab, lab)
        Q[target if target in Q.columns else "<none>"] += pred[name]
    P, T = Q.to_numpy(), truth.reindex(columns=Q.columns, fill_value=0.0).loc[pred.index].to_numpy()
    Pc, Tc = P - P.mean(1, keepdims=True), T - T.mean(1, keepdims=True)
    return float(np.nanmean((Pc * Tc).sum(1) / np.sqrt((Pc**2).sum(1) * (Tc**2).sum(1))))


def test_empty_spot_landing_says_where_it_looked(spots_platform):
    assert spots_platform.empty_skips["spot_landing_sensor"] == f"no spot samples under s3://{spots_platform.bucket}/landing/spots/"


def test_spot_sample_flows_to_deconvolution_with_the_check_passing(spots_platform):
    p = spots_platform
    good = [r for r in p.initial_runs if r.partition == GOOD]
    assert good and all(r.success for r in good), good
    assert [(r.sensor, r.job) for r in good if "spot_sample" in r.assets] == [("spot_landing_sensor", "spot_samples_job")]
    assert {a for r in good for a in r.assets} == set(SPOT_ASSETS)
    # the spot sample records its kind and bin size; the cell-level assets did not run
    meta = p.latest_metadata("spot_sample", GOOD)
    truth = p.truth[GOOD]
    assert meta["spot_kind"] == "visium_hd_bin" and meta["bin_size_um"] == pytest.approx(truth.uns["spot"]["bin_size_um"])
    assert meta["n_spots"] == truth.n_obs
    assert not p.counts("spatial_cells") and not p.counts("cell_type_annotations") and not p.counts("training_set")
    # proportions: one column per reference label as the training set names it (placeholders left out),
    # rows sum to 1, each label's CL id recorded
    out = p.stored("spot_deconvolution", GOOD)
    props = out.obsm[PROPORTIONS_KEY]
    table = _ontology_table()
    ref_labels = set(table["cell_type"])
    assert set(props.columns) == ref_labels and len(ref_labels) == 12
    assert check_proportions(out).passed
    labels = out.uns["deconvolution"]["labels"]
    assert dict(zip(labels["label"], labels["ontology_term_id"])) == dict(zip(table["cell_type"], table["ontology_term_id"]))
    assert sum(str(i).startswith("CL:") for i in labels["ontology_term_id"]) >= 10
    assert {"dominant_cell_type", "dominant_cell_type_ontology_term_id", "deconvolution_residual"} <= set(out.obs.columns)
    assert out.uns["deconvolution"]["method"] == "platform_nb"
    # the reference cells were balanced as for training (Cap & Fill record of the training set)
    assert p.latest_metadata("spot_deconvolution", GOOD)["n_classes"] == len(ref_labels)
    # the known composition is recovered (the benchmark's default-method figure on this slice is 0.76)
    r = _mean_r(props, truth.obsm[TRUTH_KEY])
    print(f"platform spot_deconvolution vs truth: mean per-spot r = {r:.3f}")
    assert r > 0.65
    # the blocking check passed, in the run that wrote the asset
    (run,) = [r for r in good if "spot_deconvolution" in r.assets]
    check = _check_evaluations(p.instance, run.run_id)["proportions_valid"]
    assert check.passed and check.metadata["n_negative"].value == 0 and check.metadata["n_spots"].value == truth.n_obs
    # plots attached as figures: stored beside the asset, thumbnails in the metadata
    dmeta = p.latest_metadata("spot_deconvolution", GOOD)
    for name in ("dominant_type", "proportion_maps"):
        assert f"plot_{name}" in dmeta and "data:image/png;base64," in dmeta[f"plot_{name}"]
        assert p.store.exists(f"assets/spot_deconvolution/{GOOD}.plots/{name}.png")


def test_spot_domains_use_the_grid_and_the_proportions(spots_platform):
    p = spots_platform
    doms = p.stored("spot_domains", GOOD)
    assert doms.obs["domain"].nunique() == p.settings.n_domains
    conn = doms.obsp["spatial_connectivities"]
    rows, cols = conn.nonzero()
    ij = doms.obs[["array_row", "array_col"]].to_numpy()
    assert rows.size and (np.abs(ij[rows] - ij[cols]).sum(axis=1) == 1).all()  # square-lattice neighbours only
    table = pd.read_parquet(p.store.get_file(f"assets/spot_domain_composition/{GOOD}.parquet"))
    np.testing.assert_allclose(table.groupby("domain")["fraction"].sum(), 1.0, atol=1e-6)
    assert set(table["cell_type"]) == set(doms.obsm[PROPORTIONS_KEY].columns)
    # the composition is the mean proportion over each domain's spots
    d0 = doms.obs["domain"].astype(str).to_numpy() == "D0"
    expect = doms.obsm[PROPORTIONS_KEY][d0].mean()
    got = table[table["domain"] == "D0"].set_index("cell_type")["fraction"]
    np.testing.assert_allclose(got.loc[expect.index].to_numpy(), expect.to_numpy(), rtol=1e-6)


def test_bad_spot_sample_fails_alone(spots_platform):
    p = spots_platform
    bad = [r for r in p.initial_runs if r.partition == BAD]
    assert [(r.job, r.success) for r in bad] == [("spot_samples_job", False)]
    events = p.instance.all_logs(bad[0].run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    error, messages = events[0].dagster_event.event_specific_data.error, []
    while error is not None:  # Dagster wraps the asset's exception: read down the cause chain
        messages.append(error.message)
        error = error.cause
    message = " ".join(messages)
    assert "poa_spots_bad.h5ad" in message and "non-integer" in message
    for key in SPOT_ASSETS:
        assert BAD not in p.counts(key), key
    assert not p.store.exists(f"assets/spot_sample/{BAD}.h5ad")
    assert not p.store.exists(f"assets/spot_deconvolution/{BAD}.h5ad")
    assert all(p.counts(key).get(GOOD) for key in SPOT_ASSETS)  # the good sample is unaffected


def test_new_spot_sample_runs_only_its_own_partitions(spots_platform):
    p = spots_platform
    before = {key: p.counts(key) for key in SPOT_ASSETS}
    p.land_spots(SECOND, p.truth[SECOND])
    runs = p.daemon.run_until_quiet()
    assert all(r.success for r in runs) and {r.partition for r in runs} == {SECOND}, runs
    assert {a for r in runs for a in r.assets} == set(SPOT_ASSETS)
    for key in SPOT_ASSETS:
        assert {k: v for k, v in p.counts(key).items() if k != SECOND} == before[key], key
    assert check_proportions(p.stored("spot_deconvolution", SECOND)).passed


def test_changed_reference_refreshes_the_deconvolution_not_the_spot_samples(spots_platform):
    p = spots_platform
    assert p.daemon.run_until_quiet() == []  # at rest (whatever ran before)
    spot_counts = p.counts("spot_sample")
    deconvolved = {s for s, n in p.counts("spot_deconvolution").items() if n}
    ref = ad.read_h5ad(REF)
    p.write_reference(ref[ref.obs["cell_type"] != "Fibroblast"].copy(), p.tmp)
    try:
        runs = p.daemon.run_until_quiet()
        assert all(r.success for r in runs), runs
        touched = {(a, r.partition) for r in runs for a in r.assets}
        assert ("reference_atlas", "poa") in touched
        for sid in deconvolved:
            assert {("spot_deconvolution", sid), ("spot_domains", sid), ("spot_domain_composition", sid)} <= touched
            assert "Fibroblast" not in p.stored("spot_deconvolution", sid).obsm[PROPORTIONS_KEY].columns
        assert p.counts("spot_sample") == spot_counts  # the spots themselves are not re-read
        assert not any(a == "spot_sample" for a, _ in touched)
    finally:  # back to the registered reference for the other tests
        p.write_reference(ref, p.tmp)
        assert all(r.success for r in p.daemon.run_until_quiet())
