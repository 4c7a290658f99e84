"""The one validation of a spatial sample (core.spatial): duplicate ids, NaN/inf expression, coordinates."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.core.spatial import (
    SpatialInputError,
    check_finite_expression,
    check_unique_cell_ids,
    prepare_spatial_cells,
    validate_spatial,
)


def _sample(X, n_genes: int = 4) -> ad.AnnData:
    n = X.shape[0]
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    a.obsm["spatial"] = np.arange(2 * n, dtype=float).reshape(n, 2)
    return a


@pytest.mark.parametrize("sparse", [False, True])
def test_nonfinite_values_are_counted_and_the_first_is_named(sparse: bool) -> None:
    X = np.ones((6, 4), dtype=np.float32)
    X[1, 2], X[1, 3], X[4, 0] = np.nan, np.inf, -np.inf
    a = _sample(sp.csr_matrix(X) if sparse else X)
    with pytest.raises(SpatialInputError) as err:
        check_finite_expression(a, "x.h5ad")
    assert str(err.value) == (
        "x.h5ad: X has 3 non-finite values (NaN or infinite) in 2 cells (first: cell 'c1', gene 'g2'); fix or drop them first"
    )


def test_dense_blocks_are_counted_across_block_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    import spatial_assets.core.spatial as spatial

    monkeypatch.setattr(spatial, "_FINITE_BLOCK", 8)  # 2 rows per block
    X = np.zeros((7, 4))
    X[[0, 3, 6, 6], [1, 2, 0, 3]] = np.nan
    with pytest.raises(SpatialInputError, match=r"X has 4 non-finite values .* in 3 cells \(first: cell 'c0', gene 'g1'\)"):
        check_finite_expression(_sample(X), "x")


def test_count_layers_are_checked_too_and_finite_data_passes() -> None:
    a = _sample(np.ones((3, 4), dtype=np.float32))
    check_finite_expression(a, "x")  # finite: no error
    a.layers["counts"] = np.array([[1, 2, 3, np.nan]] * 3)
    with pytest.raises(SpatialInputError, match=r"layers\['counts'\] has 3 non-finite values .* in 3 cells"):
        check_finite_expression(a, "x")
    b = _sample(np.ones((3, 4), dtype=np.int64))  # integer matrices cannot hold NaN
    check_finite_expression(b, "x")


def test_duplicate_ids_name_the_ids_and_count_the_cells() -> None:
    a = _sample(np.ones((6, 4)))
    a.obs_names = ["a", "b", "a", "c", "b", "a"]
    with pytest.raises(SpatialInputError) as err:
        check_unique_cell_ids(a, "s.h5ad")
    assert str(err.value) == "s.h5ad: 2 duplicate cell ids in obs_names (5 cells), e.g. 'a', 'b'"

    class Custom(ValueError):
        pass

    with pytest.raises(Custom):
        check_unique_cell_ids(a, "s.h5ad", error=Custom)


def test_validate_spatial_and_prepare_apply_every_check() -> None:
    a = _sample(np.ones((5, 4)))
    np.testing.assert_array_equal(validate_spatial(a, "ok"), a.obsm["spatial"])
    a.X[2, 1] = np.inf
    with pytest.raises(SpatialInputError, match="non-finite"):
        validate_spatial(a, "s")
    with pytest.raises(SpatialInputError, match="non-finite"):
        prepare_spatial_cells(a, sample_id="s1", source="s")
    b = _sample(np.ones((5, 4)))
    b.obsm["spatial"][4, 0] = np.nan
    with pytest.raises(SpatialInputError, match=r"NaN/infinite coordinates in 1 cells \(first: 'c4'\)"):
        validate_spatial(b, "s")


def test_ensembl_gene_ids_are_refused_with_examples_symbols_pass() -> None:
    a = _sample(np.ones((5, 4)))
    a.var_names = ["ENSMUSG00000000001", "ENSMUSG00000000028.3", "ENSG00000141510", "Gad1"]
    with pytest.raises(SpatialInputError, match=r"landed\.h5ad: 3 of 4 gene names are Ensembl ids \(e\.g\. \['ENSMUSG00000000001'"):
        prepare_spatial_cells(a, sample_id="s1", source="landed.h5ad")
    a.var_names = ["Ensa", "Gad1", "ENSMUSG00000000001", "Sst"]  # a symbol that starts like an id; one stray id
    assert prepare_spatial_cells(a, sample_id="s1", source="landed.h5ad").n_vars == 4
