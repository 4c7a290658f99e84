"""Composition per sample x domain and domain marker genes (domains/annotation/composition.py)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from spatial_assets.core.normalization import ensure_normalized
from spatial_assets.domains.annotation import (
    DomainAnnotationError,
    domain_composition,
    domain_marker_genes,
)
from spatial_assets_tests.domains.annotation.helpers import _synthetic


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
