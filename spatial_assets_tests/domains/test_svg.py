"""Spatially variable genes (domains/svg.py): Moran's I against its definition, planted genes, API."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from scipy import stats

from spatial_assets.domains.engine import DomainInputError
from spatial_assets.domains.svg import morans_i, spatially_variable_genes


def _reference_moran(x: np.ndarray, w: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """Moran's I from its definition, one gene at a time, dense (values centred within each group)."""
    z = x.astype(np.float64).copy()
    for g in groups:
        z[g] -= z[g].mean(0)
    n, s0 = x.shape[0], w.sum()
    return np.array([(n / s0) * (z[:, j] @ w @ z[:, j]) / (z[:, j] @ z[:, j]) for j in range(x.shape[1])])


def test_morans_i_equals_its_definition_sparse_and_dense() -> None:
    rng = np.random.default_rng(0)
    n = 120
    x = rng.poisson(1.0, size=(n, 7)).astype(float)
    w = (rng.random((n, n)) < 0.05).astype(float)
    np.fill_diagonal(w, 0)
    groups = [np.arange(60), np.arange(60, n)]
    w[:60, 60:] = w[60:, :60] = 0  # block-diagonal: samples never connect
    w = w / np.maximum(w.sum(1, keepdims=True), 1)  # row-standardised, as the function is used
    ref = _reference_moran(x, w, groups)
    dense, var = morans_i(x, sp.csr_matrix(w), groups)
    sparse, _ = morans_i(sp.csr_matrix(x), sp.csr_matrix(w), groups)
    np.testing.assert_allclose(dense, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sparse, ref, rtol=1e-10, atol=1e-12)
    assert np.all(var > 0)


def _tissue(seed: int = 0) -> AnnData:
    """Cells with a gradient gene, a patchy gene, and noise genes (Poisson counts)."""
    rng = np.random.default_rng(seed)
    n = 1500
    xy = rng.uniform(0, 100, size=(n, 2))
    noise = rng.poisson(2.0, size=(n, 20))
    gradient = rng.poisson(0.2 + 5 * xy[:, 0] / 100)
    patch = rng.poisson(np.where(np.hypot(xy[:, 0] - 30, xy[:, 1] - 60) < 20, 6.0, 0.5))
    x = np.column_stack([gradient, patch, noise]).astype(np.float32)
    a = AnnData(X=sp.csr_matrix(x), var=pd.DataFrame(index=["gradient", "patch"] + [f"noise{i}" for i in range(20)]))
    a.obs_names = [f"c{i}" for i in range(n)]
    a.obsm["spatial"] = xy
    return a


def test_planted_spatial_genes_rank_first_and_noise_is_not_called() -> None:
    a = _tissue()
    table = spatially_variable_genes(a, inplace=False)
    assert list(table.columns[:3]) == ["moranI", "pval_norm", "qval"]
    assert set(table.sort_values("moranI", ascending=False).index[:2]) == {"gradient", "patch"}
    assert table.loc[["gradient", "patch"], "qval"].max() < 1e-10
    noise = table.drop(["gradient", "patch"])
    assert noise["moranI"].abs().max() < 0.1
    assert noise["spatially_variable"].mean() <= 0.1  # ~ the 5 % FDR, not the spatial genes' rate
    assert table.loc["gradient", "moranI_rank"] in (1, 2)
    np.testing.assert_allclose(table["qval"], stats.false_discovery_control(table["pval_norm"], method="bh"))


def test_scverse_return_conventions_and_caller_untouched() -> None:
    a = _tissue(1)
    before = a.copy()
    table = spatially_variable_genes(a, inplace=False, n_top=2)
    assert "moranI" not in a.var and table["spatially_variable"].sum() == 2
    copy = spatially_variable_genes(a, copy=True, n_top=2)
    assert "moranI" not in a.var and copy is not a
    pd.testing.assert_series_equal(copy.var["moranI"], table["moranI"], check_names=False)
    assert spatially_variable_genes(a, n_top=2) is None
    assert {"moranI", "pval_norm", "qval", "spatially_variable"} <= set(a.var.columns)
    assert (a.X != before.X).nnz == 0
    # deterministic
    pd.testing.assert_frame_equal(spatially_variable_genes(a, inplace=False, n_top=2), table)


def test_per_sample_centring_does_not_call_a_batch_shift_spatial() -> None:
    """Two samples side by side with a gene offset between them but no structure within each."""
    rng = np.random.default_rng(3)
    n = 800
    xy = np.vstack([rng.uniform(0, 100, (n, 2)), rng.uniform(0, 100, (n, 2))])
    shifted = np.concatenate([rng.poisson(1.0, n), rng.poisson(6.0, n)])
    flat = rng.poisson(3.0, 2 * n)
    a = AnnData(X=sp.csr_matrix(np.column_stack([shifted, flat]).astype(np.float32)),
                obs=pd.DataFrame({"sample": ["a"] * n + ["b"] * n}, index=[f"c{i}" for i in range(2 * n)]),
                var=pd.DataFrame(index=["shifted", "flat"]))
    a.obsm["spatial"] = xy
    t = spatially_variable_genes(a, sample_key="sample", inplace=False)
    assert abs(t.loc["shifted", "moranI"]) < 0.05 and not t.loc["shifted", "spatially_variable"]


def test_errors_name_the_problem() -> None:
    a = _tissue()
    with pytest.raises(DomainInputError, match="not in var_names"):
        spatially_variable_genes(a, genes=["gradient", "nope"], inplace=False)
    with pytest.raises(DomainInputError, match="target_sum"):
        spatially_variable_genes(a, target_sum=-1, inplace=False)
    del a.obsm["spatial"]
    with pytest.raises(DomainInputError, match=r"obsm\['spatial'\]"):
        spatially_variable_genes(a, inplace=False)


def test_platform_table_is_parquet_friendly(tmp_path) -> None:
    from spatial_assets.platform.domains import spatially_variable_genes_table

    table = spatially_variable_genes_table(_tissue(), n_top=2)
    assert list(table.columns) == ["gene", "moranI", "pval_norm", "qval", "moranI_rank", "spatially_variable"]
    assert set(table.loc[table["spatially_variable"], "gene"]) == {"gradient", "patch"}
    table.to_parquet(tmp_path / "svg.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "svg.parquet"), table)
