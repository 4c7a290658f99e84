"""Expression-threshold classification on real MERFISH / PBMC data and on generated data."""

from __future__ import annotations

import tracemalloc
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from spatial_assets.celltyping.threshold import (
    METAGENES,
    MissingMarkerError,
    ThresholdInputError,
    ZeroInflationWarning,
    classify_by_threshold,
    looks_log_transformed,
)

@pytest.fixture()
def poa(load_merfish) -> ad.AnnData:
    """The POA MERFISH sample, a fresh copy per test."""
    return load_merfish()


@pytest.fixture()
def pbmc(load_pbmc) -> ad.AnnData:
    """PBMC 3k, a fresh copy per test."""
    return load_pbmc()


def _positive(out: ad.AnnData, prefix: str) -> np.ndarray:
    return (out.obs[f"{prefix}_cluster"].astype(str) == "positive").to_numpy()


def _precision_recall(pos: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tp = float((pos & truth).sum())
    return tp / max(pos.sum(), 1), tp / truth.sum()


# ------------------------------------------------------------------ real data


def test_poa_mature_oligodendrocyte_marker_ks(poa: ad.AnnData) -> None:
    """Ermn is a mature-oligodendrocyte gene: positives should be mostly 'OD Mature' (Ambiguous not scored)."""
    out = classify_by_threshold(poa, "Ermn", method="ks")
    labels = poa.obs["Cell_class_major"].astype(str).to_numpy()
    scored = labels != "Ambiguous"
    pos = _positive(out, "Ermn")[scored]
    truth = labels[scored] == "OD Mature"
    precision, recall = _precision_recall(pos, truth)
    base_rate = truth.mean()
    assert recall >= 0.95
    assert precision >= 0.70
    assert precision / base_rate >= 3.0  # ≥ 3-fold enrichment over the 22 % base rate
    rec = out.uns["threshold_classification"]["Ermn"]
    assert rec["split_detected"] and rec["ks_distance"] > rec["ks_critical"]
    # background cells with a few Ermn transcripts are split off, not just non-detected ones
    detected = np.asarray(poa[:, "Ermn"].X.toarray()).ravel() > 0
    assert (detected & ~_positive(out, "Ermn")).sum() > 1000


@pytest.mark.parametrize("metagene", METAGENES)
def test_poa_marker_set_gmm_all_metagenes(poa: ad.AnnData, metagene: str) -> None:
    markers = ["Ermn", "Gjc3", "Opalin"]
    out = classify_by_threshold(poa, markers, metagene=metagene, method="gmm")
    labels = poa.obs["Cell_class_major"].astype(str).to_numpy()
    scored = labels != "Ambiguous"
    precision, recall = _precision_recall(_positive(out, "Ermn_Gjc3_Opalin")[scored], labels[scored] == "OD Mature")
    assert recall >= 0.95
    assert precision >= 0.70
    # positives should score higher than negatives for every metagene (sign of first PC aligned)
    score = out.obs["Ermn_Gjc3_Opalin_score"].to_numpy()
    pos_all = _positive(out, "Ermn_Gjc3_Opalin")
    assert score[pos_all].min() >= score[~pos_all].max() - 1e-12  # a threshold on the score, nothing else
    rec = out.uns["threshold_classification"]["Ermn_Gjc3_Opalin"]
    assert rec["score_cutoff"] == pytest.approx(score[pos_all].min())
    assert rec["component_means"][1] > rec["component_means"][0]


def test_pbmc_b_cells_ks_depth_normalised(pbmc: ad.AnnData) -> None:
    labels = pbmc.obs["seurat_annotations"].astype(str).to_numpy()
    truth = labels == "B"
    out = classify_by_threshold(pbmc, "CD79A", method="ks", target_sum=1e4)
    precision, recall = _precision_recall(_positive(out, "CD79A"), truth)
    assert precision >= 0.8 and recall >= 0.8
    markers = ["CD79A", "TCL1A", "HLA-DQA1"]
    out3 = classify_by_threshold(pbmc, markers, method="ks", target_sum=1e4, prefix="B")
    precision3, recall3 = _precision_recall(_positive(out3, "B"), truth)
    assert precision3 >= 0.85 and recall3 >= 0.85


def test_pipeline_log1p_x_equals_on_the_fly_normalisation(pbmc: ad.AnnData) -> None:
    """expm1(log1p(x/total·1e4)) = x/total·1e4: log1p X must give the same call as target_sum on counts."""
    logged = pbmc.copy()
    logged.layers["counts"] = logged.X.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    assert looks_log_transformed(logged) and not looks_log_transformed(logged, layer="counts")
    del logged.uns["log1p"]  # detection must not depend on scanpy's marker
    assert looks_log_transformed(logged)
    a = classify_by_threshold(logged, "CD79A", method="ks")
    b = classify_by_threshold(logged, "CD79A", method="ks", layer="counts", target_sum=1e4)
    np.testing.assert_allclose(a.obs["CD79A_score"], b.obs["CD79A_score"], rtol=1e-4, atol=1e-3)
    assert (a.obs["CD79A_cluster"] == b.obs["CD79A_cluster"]).mean() >= 0.999
    with pytest.raises(ThresholdInputError, match="target_sum"):
        classify_by_threshold(logged, "CD79A", target_sum=1e4)


# ------------------------------------------------------------------ generated data


def _zero_inflated(seed: int, n: int = 4000, background: bool = True) -> tuple[ad.AnnData, np.ndarray]:
    """20 % positives (log-normal, median ≈ 20); negatives 60 % zero + 40 % broad background (median 1)."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.2
    x = np.zeros(n)
    x[truth] = rng.lognormal(3.0, 0.4, truth.sum())
    neg = np.flatnonzero(~truth)
    if background:
        bg = neg[rng.random(neg.size) < 0.4]
        x[bg] = rng.lognormal(0.0, 1.0, bg.size)
    other = rng.poisson(2.0, (n, 3)).astype(np.float64)
    X = sp.csr_matrix(np.column_stack([x, other]))
    adata = ad.AnnData(X=X, var=pd.DataFrame(index=["Mk", "G1", "G2", "G3"]))
    adata.obs_names = [f"c{i}" for i in range(n)]
    return adata, truth


def test_ks_separates_background_from_positives_where_gmm_cannot() -> None:
    adata, truth = _zero_inflated(seed=1)
    ks = classify_by_threshold(adata, "Mk", method="ks")
    p, r = _precision_recall(_positive(ks, "Mk"), truth)
    assert p >= 0.93 and r >= 0.97
    prob = ks.obs["Mk_probability"].to_numpy()
    assert np.array_equal(prob > 0.5, _positive(ks, "Mk"))
    assert np.all(prob[adata.X[:, 0].toarray().ravel() == 0] == 0.0)
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    with pytest.warns(ZeroInflationWarning):
        gmm = classify_by_threshold(adata, "Mk", method="gmm")
    p_gmm, r_gmm = _precision_recall(_positive(gmm, "Mk"), truth)
    # the GMM's low component collapses on the zeros: background (≈ 32 % of cells) is called positive
    assert r_gmm >= 0.97 and p_gmm < 0.6
    assert gmm.uns["threshold_classification"]["Mk"]["zero_spike"]


def test_ks_on_off_marker_calls_every_detected_cell() -> None:
    adata, truth = _zero_inflated(seed=2, background=False)
    out = classify_by_threshold(adata, "Mk", method="ks")
    assert not out.uns["threshold_classification"]["Mk"]["split_detected"]
    assert np.array_equal(_positive(out, "Mk"), truth)


def test_gmm_probability_is_monotone_and_respects_cutoff() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    truth = rng.random(n) < 0.3
    # log-normal expression, no zeros: low component median ≈ 3, high ≈ 55, high one wider
    x = np.where(truth, rng.lognormal(4.0, 0.6, n), rng.lognormal(1.1, 0.3, n))
    adata = ad.AnnData(X=np.column_stack([x, rng.poisson(3, n)]).astype(np.float64), var=pd.DataFrame(index=["A", "B"]))
    out = classify_by_threshold(adata, "A", method="gmm", posterior_cutoff=0.3)
    score = out.obs["A_score"].to_numpy()
    prob = out.obs["A_probability"].to_numpy()
    order = np.argsort(score)
    assert np.all(np.diff(prob[order]) >= -1e-12)
    assert np.array_equal(_positive(out, "A"), prob >= 0.3)
    p, r = _precision_recall(_positive(out, "A"), truth)
    assert p >= 0.97 and r >= 0.97
    strict = classify_by_threshold(adata, "A", method="gmm", posterior_cutoff=0.9)
    assert _positive(strict, "A").sum() <= _positive(out, "A").sum()
    assert np.all(_positive(out, "A")[_positive(strict, "A")])


def test_metagene_formulas() -> None:
    X = np.array([[0.0, 3.0], [1.0, 1.0], [4.0, 0.0], [9.0, 24.0], [0.0, 0.0]])
    adata = ad.AnnData(X=X, var=pd.DataFrame(index=["a", "b"]))
    sgm = classify_by_threshold(adata, ["a", "b"], metagene="shifted_geometric_mean", log_input=False)
    expected = np.exp(np.log(X + 1).mean(axis=1)) - 1  # [1, 1, 1.236, 14.81, 0]
    np.testing.assert_allclose(sgm.obs["a_b_score"], expected)
    np.testing.assert_allclose(sgm.obs["a_b_score"].iloc[:2], [1.0, 1.0])  # sqrt(1·4) − 1 and 2 − 1
    am = classify_by_threshold(adata, ["a", "b"], metagene="arithmetic_mean", log_input=False, pseudocount=0.5)
    np.testing.assert_allclose(am.obs["a_b_score"], X.mean(axis=1))
    pc = classify_by_threshold(adata, ["a", "b"], metagene="first_pc", log_input=False)
    total = np.log(X + 1).sum(axis=1)
    assert np.corrcoef(pc.obs["a_b_score"], total)[0, 1] > 0.5  # sign aligned: more expression, higher score
    single = classify_by_threshold(adata, "b", metagene="first_pc", log_input=False)
    z = np.log(X[:, 1] + 1)
    np.testing.assert_allclose(single.obs["b_score"], (z - z.mean()) / z.std())


@pytest.mark.filterwarnings("ignore::spatial_assets.celltyping.threshold.ZeroInflationWarning")
def test_determinism_and_caller_untouched(poa: ad.AnnData) -> None:
    before_obs = poa.obs.copy()
    before_x = poa.X.copy()
    runs = [classify_by_threshold(poa, ["Mbp", "Ermn"], method=m, seed=7) for m in ("gmm", "gmm", "ks", "ks")]
    for a, b in (runs[:2], runs[2:]):
        pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(poa.obs, before_obs)
    assert (poa.X != before_x).nnz == 0
    assert "threshold_classification" not in poa.uns
    assert runs[0].uns["threshold_classification"]["Mbp_Ermn"]["method"] == "gmm"
    assert isinstance(runs[0].obs["Mbp_Ermn_cluster"].dtype, pd.CategoricalDtype)
    assert set(runs[0].obs["Mbp_Ermn_cluster"].cat.categories) == {"negative", "positive"}


def test_missing_genes_are_named(poa: ad.AnnData, pbmc: ad.AnnData) -> None:
    with pytest.raises(MissingMarkerError, match=r"\['MBP', 'Nope1'\].*gene symbols.*'MBP': 'Mbp'"):
        classify_by_threshold(poa, ["Ermn", "MBP", "Nope1"])
    ens = ad.AnnData(
        X=sp.csr_matrix(np.ones((3, 2))),
        var=pd.DataFrame({"feature_name": ["CD79A", "MS4A1"]}, index=["ENSG00000105369", "ENSG00000156738"]),
    )
    with pytest.raises(MissingMarkerError, match=r"Ensembl ids.*feature_name"):
        classify_by_threshold(ens, "CD79A")
    with pytest.raises(ThresholdInputError, match="layer 'nope'"):
        classify_by_threshold(pbmc, "CD79A", layer="nope")
    with pytest.raises(ThresholdInputError, match="metagene"):
        classify_by_threshold(pbmc, "CD79A", metagene="median")


def test_gene_symbols_column_and_negative_values() -> None:
    rng = np.random.default_rng(5)
    X = np.column_stack([rng.poisson(0.2, 500) * (rng.random(500) < 0.5) + (np.arange(500) < 100) * 30, rng.poisson(2, 500)])
    adata = ad.AnnData(
        X=sp.csr_matrix(X.astype(np.float32)),
        var=pd.DataFrame({"feature_name": ["CD79A", "ACTB"]}, index=["ENSG00000105369", "ENSG00000075624"]),
    )
    out = classify_by_threshold(adata, "CD79A", gene_symbols="feature_name", method="ks")
    assert _positive(out, "CD79A")[:100].all()
    scaled = ad.AnnData(X=X - X.mean(axis=0), var=pd.DataFrame(index=["CD79A", "ACTB"]))
    with pytest.raises(ThresholdInputError, match=r"negative expression for \['CD79A'\]"):
        classify_by_threshold(scaled, "CD79A", log_input=False)


def test_sparse_input_not_densified() -> None:
    """100k cells × 3,000 genes: a dense float64 copy would be 2.4 GB; only the marker columns may be."""
    n, g = 100_000, 3_000
    rng = np.random.default_rng(11)
    X = sp.random(n, g, density=0.002, format="csr", dtype=np.float32, random_state=rng, data_rvs=lambda k: rng.poisson(3, k) + 1.0)
    adata = ad.AnnData(X=X, var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))
    tracemalloc.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZeroInflationWarning)
        out = classify_by_threshold(adata, ["g1", "g2"], method="ks")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sp.issparse(out.X)
    assert peak < 150 * 2**20, f"peak {peak / 2**20:.0f} MiB"
