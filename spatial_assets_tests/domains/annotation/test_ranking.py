"""One-vs-rest ranking, elbow-gap calls and annotate_domains end to end (domains/annotation/ranking.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from spatial_assets.domains.annotation import (
    DOMAIN_CELL_TYPE,
    SIGNATURE_CELL_TYPE,
    SIGNATURE_SCORES_OBSM,
    DomainAnnotationError,
    annotate_domains,
    assign_domain_cell_types,
    elbow_gap,
    rank_signatures_by_domain,
)
from spatial_assets_tests.domains.annotation.helpers import SYN_SIGNATURES, _synthetic


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
