"""Domain-level annotation: signatures, scores, one-vs-rest enrichment, elbow-gap calls,
composition and marker genes — on the real STARmap mPFC data (layers as the domain stand-in,
so these tests don't depend on the domain engines) and on synthetic data built below."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from spatial_assets.domains.annotation import (
    DOMAIN_CELL_TYPE,
    SIGNATURE_CELL_TYPE,
    SIGNATURE_SCORES_OBSM,
    DomainAnnotationError,
    SignatureError,
    annotate_domains,
    assign_domain_cell_types,
    bundled_signatures_path,
    domain_composition,
    domain_marker_genes,
    elbow_gap,
    load_signatures,
    rank_signatures_by_domain,
    score_signatures,
)
from spatial_assets.core.normalization import ensure_normalized

@pytest.fixture()
def starmap(load_starmap) -> ad.AnnData:
    """STARmap mPFC, a fresh copy per test."""
    return load_starmap()


@pytest.fixture(scope="module")
def annotated(load_starmap) -> tuple[ad.AnnData, pd.DataFrame]:
    """Domain annotation of STARmap by its layers (computed once per module; tests only read it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return annotate_domains(load_starmap(), "mouse_brain", domain_key="layer")


def _synthetic(seed: int = 0) -> ad.AnnData:
    """4 cell types (A-D, 5 marker genes each, + 20 background genes) in 3 domains:
    X = A and B mixed half/half, Y = C only, Z = D only. Raw Poisson counts."""
    rng = np.random.default_rng(seed)
    types = np.array(["A"] * 150 + ["B"] * 150 + ["C"] * 200 + ["D"] * 200)
    domain = np.array(["X"] * 300 + ["Y"] * 200 + ["Z"] * 200)
    genes = [f"{t}{i}" for t in "ABCD" for i in range(5)] + [f"bg{i}" for i in range(20)]
    rate = np.full((len(types), len(genes)), 2.0)
    for k, t in enumerate("ABCD"):
        rate[types == t, k * 5:(k + 1) * 5] = 20.0
    x = rng.poisson(rate).astype(np.float32)
    obs = pd.DataFrame({"cell_type": types, "domain": pd.Categorical(domain)},
                       index=[f"c{i}" for i in range(len(types))])
    a = ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))
    a.obsm["spatial"] = rng.uniform(0, 100, size=(len(types), 2))
    return a


SYN_SIGNATURES = {t: [f"{t}{i}" for i in range(5)] for t in "ABCD"}


# ------------------------------------------------------------------ signatures


def test_bundled_signatures_cover_panels(load_starmap, load_merfish, load_pbmc) -> None:
    mouse = load_signatures("mouse_brain")
    assert all(len(g) > 0 and all(isinstance(x, str) for x in g) for g in mouse.values())
    star = set(load_starmap().var_names)
    merf = set(load_merfish().var_names)
    covered_star = {k for k, g in mouse.items() if star & set(g)}
    covered_merf = {k for k, g in mouse.items() if merf & set(g)}
    # the cell classes each panel was designed to resolve
    assert {"Excitatory neurons", "Inhibitory neurons", "Astrocytes", "Oligodendrocytes",
            "Endothelial", "L2-3 IT neurons", "L5 neurons", "L6 neurons"} <= covered_star
    assert {"Excitatory neurons", "Inhibitory neurons", "Astrocytes", "Oligodendrocytes", "OPC",
            "Microglia", "Endothelial", "Mural cells", "Ependymal"} <= covered_merf
    human = load_signatures(bundled_signatures_path("human_immune"))
    pbmc = set(load_pbmc().var_names)
    covered = {k for k, g in human.items() if pbmc & set(g)}
    assert {"B cells", "NK cells", "Classical monocytes", "Non-classical monocytes",
            "Platelets", "Dendritic cells"} <= covered


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("Astro: [Aqp4\n  Gfap: [", "not valid YAML"),
        ("- Aqp4\n- Gfap\n", "non-empty mapping"),
        ("Astro: []\n", "'Astro' must be a non-empty list"),
        ("Astro: Aqp4\n", "'Astro' must be a non-empty list"),
        ("Astro: [Aqp4, 12]\n", "'Astro' has a gene 12"),
        ("Astro: [Aqp4, NO]\n", "'Astro' has a gene False"),
        ("Astro: [Aqp4]\nAstro: [Gfap]\n", "duplicate key 'Astro'"),
        ("L2/3: [Cux2]\n", "contains '/'"),
    ],
)
def test_bad_signature_yaml_names_file_and_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad_signatures.yaml"
    path.write_text(text)
    with pytest.raises(SignatureError) as err:
        load_signatures(path)
    assert str(path) in str(err.value)
    assert fragment in str(err.value)


def test_missing_signature_file_and_unknown_bundle(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="does not exist"):
        load_signatures(tmp_path / "nope.yaml")
    with pytest.raises(SignatureError, match="no bundled signature set"):
        bundled_signatures_path("zebrafish")


def test_load_signatures_dedupes_and_strips() -> None:
    sigs = load_signatures({" T ": ["Cd3e", "Cd3e ", "Cd4"]})
    assert sigs == {"T": ["Cd3e", "Cd4"]}


# ------------------------------------------------------------------ scores


def test_scores_shape_missing_genes_and_caller_untouched(starmap: ad.AnnData) -> None:
    sigs = load_signatures("mouse_brain")
    panel = set(starmap.var_names)
    expected = [k for k, g in sigs.items() if panel & set(g)]
    x_before = starmap.X.copy()
    with pytest.warns(UserWarning) as rec:
        scored = score_signatures(starmap, "mouse_brain")
    messages = " | ".join(str(r.message) for r in rec)
    assert "Ependymal" in messages and "Gfap" in messages
    scores = scored.obsm[SIGNATURE_SCORES_OBSM]
    assert scores.shape == (starmap.n_obs, len(expected))
    assert list(scores.columns) == expected
    assert np.isfinite(scores.to_numpy()).all()
    info = scored.uns["signature_scoring"]
    assert list(info["dropped_signatures"]) == ["Ependymal"]
    missing = set(map(tuple, info["missing_genes"].to_numpy()))
    assert ("Astrocytes", "Gfap") in missing and ("Astrocytes", "Aqp4") not in missing
    # caller not modified
    assert SIGNATURE_SCORES_OBSM not in starmap.obsm and "signature_scoring" not in starmap.uns
    assert (starmap.X != x_before).nnz == 0


def test_zscore_score_is_mean_z_of_present_genes(starmap: ad.AnnData) -> None:
    sig = {"L6": ["Foxp2", "Syt6", "Tbr1", "NotAGene"]}
    with pytest.warns(UserWarning, match="NotAGene"):
        scored = score_signatures(starmap, sig)
    x = ensure_normalized(starmap)[:, ["Foxp2", "Syt6", "Tbr1"]].X
    x = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    np.testing.assert_allclose(scored.obsm[SIGNATURE_SCORES_OBSM]["L6"], z.mean(axis=1),
                               rtol=1e-5, atol=1e-5)


def test_all_signatures_missing_is_an_error(starmap: ad.AnnData, tmp_path: Path) -> None:
    path = tmp_path / "human.yaml"
    path.write_text("T cells: [CD3E, CD2]\nB cells: [MS4A1]\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(SignatureError) as err:
            score_signatures(starmap, path)
    assert str(path) in str(err.value) and "T cells" in str(err.value)


def test_smoothing_is_mean_over_self_and_neighbours() -> None:
    a = _synthetic()
    n = a.n_obs
    # ring graph: each cell linked to the next (symmetric), weights deliberately not 1
    rows = np.arange(n)
    g = sp.coo_matrix((np.full(n, 0.3), (rows, (rows + 1) % n)), shape=(n, n))
    a.obsp["spatial_connectivities"] = (g + g.T).tocsr()
    raw = score_signatures(a, SYN_SIGNATURES).obsm[SIGNATURE_SCORES_OBSM].to_numpy()
    smooth = score_signatures(a, SYN_SIGNATURES, smooth=True).obsm[SIGNATURE_SCORES_OBSM]
    expected = (np.roll(raw, 1, axis=0) + raw + np.roll(raw, -1, axis=0)) / 3.0
    np.testing.assert_allclose(smooth.to_numpy(), expected, rtol=1e-10, atol=1e-12)
    del a.obsp["spatial_connectivities"]
    with pytest.raises(DomainAnnotationError, match="spatial_connectivities"):
        score_signatures(a, SYN_SIGNATURES, smooth=True)


def test_scanpy_method_is_seeded() -> None:
    a = _synthetic()
    s1 = score_signatures(a, SYN_SIGNATURES, method="scanpy", seed=3).obsm[SIGNATURE_SCORES_OBSM]
    s2 = score_signatures(a, SYN_SIGNATURES, method="scanpy", seed=3).obsm[SIGNATURE_SCORES_OBSM]
    pd.testing.assert_frame_equal(s1, s2)
    # both recover the generating type; on a 40-gene panel scanpy's expression bins hold other
    # types' markers as controls, which is why the z-score method is the default
    zs = score_signatures(a, SYN_SIGNATURES).obsm[SIGNATURE_SCORES_OBSM]
    truth = a.obs["cell_type"].to_numpy()
    acc_z = (zs.idxmax(axis=1).to_numpy() == truth).mean()
    acc_sc = (s1.idxmax(axis=1).to_numpy() == truth).mean()
    assert acc_z > 0.99 and acc_sc > 0.85 and acc_z >= acc_sc


# ------------------------------------------------------------------ ranking


def test_ranking_pvalues_bh_and_scipy_agreement(annotated) -> None:
    scored, _ = annotated
    ranking = rank_signatures_by_domain(scored, domain_key="layer")
    n_sig = scored.obsm[SIGNATURE_SCORES_OBSM].shape[1]
    assert len(ranking) == 4 * n_sig
    assert list(ranking.columns[:8]) == ["domain", "cell_type", "statistic", "effect",
                                         "u_statistic", "n_cells", "pval", "pval_adj"]
    assert ranking["pval"].between(0, 1).all() and ranking["pval_adj"].between(0, 1).all()
    assert (ranking["pval_adj"] >= ranking["pval"] - 1e-15).all()
    by_p = ranking.sort_values("pval", kind="mergesort")
    assert np.all(np.diff(by_p["pval_adj"].to_numpy()) >= -1e-15)  # BH keeps the p order
    # rank 1..n_sig within each domain, statistic descending
    for _, sub in ranking.groupby("domain"):
        assert sub["rank"].tolist() == list(range(1, n_sig + 1))
        assert np.all(np.diff(sub["statistic"].to_numpy()) <= 0)
    # U and p equal scipy's Mann-Whitney U (asymptotic, default continuity correction)
    scores = scored.obsm[SIGNATURE_SCORES_OBSM]
    layer = scored.obs["layer"].astype(str).to_numpy()
    for dom, ct in [("L1", "Astrocytes"), ("L5", "OPC"), ("L6", "Excitatory neurons")]:
        row = ranking[(ranking.domain == dom) & (ranking.cell_type == ct)].iloc[0]
        ref = stats.mannwhitneyu(scores[ct][layer == dom], scores[ct][layer != dom],
                                 method="asymptotic")
        assert row.u_statistic == pytest.approx(ref.statistic, rel=1e-12)
        assert row.pval == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-300)
        n1 = int((layer == dom).sum())
        assert row.n_cells == n1
        assert row.effect == pytest.approx(ref.statistic / (n1 * (len(layer) - n1)))


def test_ranking_errors(starmap: ad.AnnData, annotated) -> None:
    scored, _ = annotated
    with pytest.raises(DomainAnnotationError, match="'domain' not found"):
        rank_signatures_by_domain(scored)
    one = scored.copy()
    one.obs["one"] = "D0"
    with pytest.raises(DomainAnnotationError, match="at least 2"):
        rank_signatures_by_domain(one, domain_key="one")
    with pytest.raises(DomainAnnotationError, match="score_signatures"):
        rank_signatures_by_domain(starmap, domain_key="layer")


# ------------------------------------------------------------------ elbow gap


@pytest.mark.parametrize(
    ("stat", "n_types", "gap"),
    [([5.0, 4.8, 1.0, 0.9], 2, 3.8), ([5.0, 1.0, 0.9], 1, 4.0), ([5.0, 4.9, 4.8, 4.7, 0.0], 1, 0.1),
     ([6.0, 5.5, 5.0, 0.5, 0.2], 3, 4.5), ([3.0], 1, 3.0)],
)
def test_elbow_gap_on_constructed_arrays(stat, n_types, gap) -> None:
    k, g = elbow_gap(stat, max_types=3)
    assert k == n_types
    assert g == pytest.approx(gap)


def test_elbow_gap_rejects_unsorted() -> None:
    with pytest.raises(ValueError, match="descending"):
        elbow_gap([1.0, 2.0])


def _ranking(rows: dict[str, list[float]]) -> pd.DataFrame:
    out = []
    for dom, stat in rows.items():
        for i, s in enumerate(stat):
            out.append({"domain": dom, "cell_type": "ABCDEFG"[i], "statistic": s,
                        "pval_adj": 1e-6 if abs(s) > 2 else 0.5})
    return pd.DataFrame(out)


def test_assign_domain_cell_types_rules() -> None:
    ranking = _ranking({
        "two": [5.0, 4.8, 1.0, 0.9],       # elbow after 2 -> "A/B"
        "one": [5.0, 1.0, 0.9],            # elbow after 1 -> "A"
        "flat": [5.0, 4.9, 4.8, 4.7, 0.0], # no elbow among the top 3 -> Unassigned
        "none": [1.5, -3.0, -4.0],         # nothing significantly enriched -> Unassigned
        "capped": [9.0, 8.5, 8.0, 7.5, 0.1],  # elbow after 4 is beyond max_types=3
    })
    res = assign_domain_cell_types(ranking, max_types=3).set_index("domain")
    assert res.loc["two", "assigned_cell_types"] == "A/B" and res.loc["two", "n_types"] == 2
    assert res.loc["two", "gap"] == pytest.approx(3.8)
    assert res.loc["one", "assigned_cell_types"] == "A"
    assert res.loc["flat", "assigned_cell_types"] == "Unassigned"
    assert res.loc["none", "assigned_cell_types"] == "Unassigned" and res.loc["none", "n_types"] == 0
    assert res.loc["capped", "n_types"] <= 3
    assert res.loc["two", "scores"] == [5.0, 4.8, 1.0, 0.9]
    with pytest.raises(ValueError, match="elbow_gap"):
        assign_domain_cell_types(ranking, method="kmeans")


def test_mixed_domain_gets_both_types() -> None:
    a = _synthetic()
    scored, assignment = annotate_domains(a, SYN_SIGNATURES)
    calls = assignment.set_index("domain")["assigned_cell_types"]
    assert sorted(calls["X"].split("/")) == ["A", "B"]
    assert calls["Y"] == "C" and calls["Z"] == "D"
    per_cell = scored.obs[DOMAIN_CELL_TYPE].astype(str)
    assert (per_cell[scored.obs["domain"] == "Y"] == "C").all()
    # per-cell argmax recovers the generating type
    assert (scored.obs[SIGNATURE_CELL_TYPE].astype(str) == scored.obs["cell_type"]).mean() > 0.99


# ------------------------------------------------------------------ real biology (STARmap)


def test_starmap_layers_get_their_known_cell_types(annotated) -> None:
    scored, assignment = annotated
    ranking = scored.uns["domain_annotation"]["ranking"]
    l1 = ranking[ranking.domain == "L1"].set_index("cell_type")
    # L1 (molecular layer under the pia) is mostly astrocytes, vascular cells and sparse
    # interneurons (data: 56 Astro, 61 Endo, 47 Smc of 202 cells; 1 eL2/3): non-neuronal
    # signatures must be enriched and excitatory neurons depleted
    assert l1.loc["Astrocytes", "statistic"] > 5 > 0 > l1.loc["Excitatory neurons", "statistic"]
    assert l1.loc["Endothelial", "rank"] < l1.loc["Excitatory neurons", "rank"]
    calls = assignment.set_index("domain")["assigned_cell_types"]
    assert "Astrocytes" in calls["L1"].split("/")
    assert not any("neurons" in t for t in calls["L1"].split("/"))
    # each cortical layer is called by its own layer-marker signature (Cux2/Otof; Etv1/Parm1;
    # Foxp2/Syt6/Tbr1), which the layer labels did not use
    assert calls["L2/3"].split("/")[0] == "L2-3 IT neurons"
    assert calls["L5"].split("/")[0] == "L5 neurons"
    assert calls["L6"].split("/")[0] == "L6 neurons"
    # per-cell argmax agrees with the author labels for the classes the panel covers well
    tab = pd.crosstab(scored.obs["cell_type"], scored.obs[SIGNATURE_CELL_TYPE])
    assert tab.loc["Astro"].idxmax() == "Astrocytes"
    assert tab.loc["Oligo"].idxmax() == "Oligodendrocytes"
    assert tab.loc["eL6-1"].idxmax() == "L6 neurons"
    assert tab.loc["eL2/3"].idxmax() == "L2-3 IT neurons"


def test_annotate_domains_outputs_write_to_h5ad(annotated, tmp_path: Path) -> None:
    scored, assignment = annotated
    assert set(scored.obs[DOMAIN_CELL_TYPE].astype(str)) == set(assignment["assigned_cell_types"])
    assert scored.uns["domain_annotation"]["max_types"] == 3
    path = tmp_path / "annotated.h5ad"
    scored.write_h5ad(path)
    back = ad.read_h5ad(path)
    pd.testing.assert_frame_equal(back.obsm[SIGNATURE_SCORES_OBSM],
                                  scored.obsm[SIGNATURE_SCORES_OBSM])
    assert list(back.obs[DOMAIN_CELL_TYPE].astype(str)) == list(
        scored.obs[DOMAIN_CELL_TYPE].astype(str))


def test_annotation_is_deterministic(starmap: ad.AnnData, annotated) -> None:
    _, first = annotated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, second = annotate_domains(starmap, "mouse_brain", domain_key="layer")
    pd.testing.assert_frame_equal(first, second)


# ------------------------------------------------------------------ composition


def test_composition_fractions_and_dtypes(starmap: ad.AnnData, tmp_path: Path) -> None:
    comp = domain_composition(starmap, domain_key="layer", sample_key="slice")
    assert list(comp.columns) == ["sample_id", "domain", "cell_type", "n_cells", "fraction"]
    sums = comp.groupby(["sample_id", "domain"])["fraction"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, rtol=0, atol=1e-12)
    assert comp["n_cells"].sum() == starmap.n_obs
    assert str(comp["n_cells"].dtype) == "int64" and str(comp["fraction"].dtype) == "float64"
    assert all(comp[c].map(type).eq(str).all() for c in ("sample_id", "domain", "cell_type"))
    # counts equal an independent crosstab
    tab = pd.crosstab([starmap.obs["slice"].astype(str), starmap.obs["layer"].astype(str)],
                      starmap.obs["cell_type"].astype(str))
    some = comp.iloc[7]
    assert some.n_cells == tab.loc[(some.sample_id, some.domain), some.cell_type]
    path = tmp_path / "comp.parquet"
    comp.to_parquet(path)
    pd.testing.assert_frame_equal(pd.read_parquet(path), comp)


def test_composition_sample_handling(starmap: ad.AnnData) -> None:
    comp = domain_composition(starmap, domain_key="layer")  # no obs['sample_id'] -> one sample
    assert set(comp["sample_id"]) == {"all"}
    l1 = comp[comp.domain == "L1"].set_index("cell_type")["n_cells"]
    assert l1["Astro"] == 56 and l1["Endo"] == 61  # the counts documented in data/README.md
    with pytest.raises(DomainAnnotationError, match="'batch' not found"):
        domain_composition(starmap, domain_key="layer", sample_key="batch")
    with pytest.raises(DomainAnnotationError, match="'ct' not found"):
        domain_composition(starmap, domain_key="layer", cell_type_key="ct")


# ------------------------------------------------------------------ markers


def test_domain_marker_genes_on_starmap(starmap: ad.AnnData) -> None:
    markers = domain_marker_genes(starmap, domain_key="layer", n_genes=8)
    assert list(markers.columns) == ["domain", "gene", "score", "logfoldchange", "pval",
                                     "pval_adj", "rank"]
    assert set(markers["domain"]) == {"L1", "L2/3", "L5", "L6"}
    for dom, sub in markers.groupby("domain"):
        assert len(sub) == 8
        assert np.all(np.diff(sub["score"].to_numpy()) <= 0)
        assert sub["rank"].tolist() == list(range(1, 9))
        assert (sub["score"] > 0).all() and (sub["logfoldchange"] > 0).all()
    top = {d: s["gene"].tolist() for d, s in markers.groupby("domain")}
    assert "Cux2" in top["L2/3"][:3]  # canonical upper-layer marker
    assert {"Syt6", "Foxp2"} & set(top["L6"][:5])  # canonical L6 corticothalamic markers
    # the z score equals scipy's Mann-Whitney U on the same normalized values
    x = ensure_normalized(starmap)[:, "Cux2"].X
    v = np.asarray(x.toarray() if sp.issparse(x) else x).ravel()
    inside = starmap.obs["layer"].astype(str).to_numpy() == "L2/3"
    ref = stats.mannwhitneyu(v[inside], v[~inside], method="asymptotic")
    row = markers[(markers.domain == "L2/3") & (markers.gene == "Cux2")].iloc[0]
    assert row.pval == pytest.approx(ref.pvalue, rel=1e-6)
    pd.testing.assert_frame_equal(markers, domain_marker_genes(starmap, domain_key="layer",
                                                               n_genes=8))


def test_merfish_author_classes_get_matching_signatures(load_merfish) -> None:
    """Second panel and technology (MERFISH POA, linear non-integer X): grouping cells by the
    authors' classes as 'domains', each class must be called by its own canonical signature."""
    a = load_merfish()
    a = a[:, ~a.var["is_blank"].to_numpy()].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scored, assignment = annotate_domains(a, "mouse_brain", domain_key="Cell_class_major")
    first = assignment.set_index("domain")["assigned_cell_types"].str.split("/").str[0]
    expected = {"Astrocyte": "Astrocytes", "Endothelial": "Endothelial",
                "Ependymal": "Ependymal", "Excitatory": "Excitatory neurons",
                "Inhibitory": "Inhibitory neurons", "Microglia": "Microglia",
                "OD Immature": "OPC", "OD Mature": "Oligodendrocytes", "Pericytes": "Mural cells"}
    assert {k: first[k] for k in expected} == expected
    assert "linear" in scored.uns["signature_scoring"]["expression"]


def test_marker_sparse_path_equals_dense_path() -> None:
    """Sparse input is ranked on its non-zeros only; the result must equal the dense ranking
    (same z, p, log fold change), including stored explicit zeros and heavy ties."""
    a = _synthetic(seed=5)
    x = a.X.tocsr().copy()
    x.data[::7] = 0.0  # explicit stored zeros
    a.X = x
    dense = a.copy()
    dense.X = x.toarray()
    m_sparse = domain_marker_genes(a, n_genes=40)
    m_dense = domain_marker_genes(dense, n_genes=40)
    pd.testing.assert_frame_equal(m_sparse, m_dense, rtol=1e-9, atol=1e-12)
    assert set(m_sparse[m_sparse.domain == "Y"]["gene"].head(5)) == {f"C{i}" for i in range(5)}
