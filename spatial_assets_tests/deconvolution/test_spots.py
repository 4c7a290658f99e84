"""Spot-level samples: lattice validation, ``uns['spot']`` and the exact grid neighbours."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.deconvolution.spots import (
    SpotSampleError,
    as_spot_sample,
    grid_neighbors,
    is_spot_sample,
    spot_record,
)


def _table(rows: np.ndarray, cols: np.ndarray, n_genes: int = 3) -> ad.AnnData:
    n = rows.size
    return ad.AnnData(
        X=sp.csr_matrix(np.ones((n, n_genes), dtype=np.float32)),
        obs=pd.DataFrame({"array_row": rows, "array_col": cols}, index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )


def _hex(n_rows: int, n_cols: int) -> ad.AnnData:
    """Visium numbering: columns of one row are 2 apart, odd rows shifted by one column."""
    rr, cc = [], []
    for r in range(n_rows):
        for c in range(r % 2, 2 * n_cols, 2):
            rr.append(r)
            cc.append(c)
    return _table(np.array(rr), np.array(cc))


def _square(n: int) -> ad.AnnData:
    r, c = np.divmod(np.arange(n * n), n)
    return _table(r, c)


def test_visium_sample_records_kind_and_has_six_neighbours_inside() -> None:
    a = _hex(6, 6)
    s = as_spot_sample(a, kind="visium")
    rec = spot_record(s)
    assert rec["kind"] == "visium" and rec["spot_diameter_um"] == 55.0 and rec["n_neighbors"] == 6
    assert is_spot_sample(s) and not is_spot_sample(a)  # caller not modified
    assert "spatial" not in a.obsm and s.obsm["spatial"].shape == (a.n_obs, 2)
    # derived coordinates: neighbours are 100 µm apart (centre to centre)
    A = grid_neighbors(s)
    assert (A != A.T).nnz == 0 and A.diagonal().sum() == 0
    deg = np.asarray(A.sum(axis=1)).ravel()
    inner = (a.obs["array_row"].between(1, 4) & a.obs["array_col"].between(2, 9)).to_numpy()
    assert set(deg[inner]) == {6}
    assert deg.min() >= 2 and deg.max() == 6
    r, c = A.nonzero()
    d = np.linalg.norm(s.obsm["spatial"][r] - s.obsm["spatial"][c], axis=1)
    np.testing.assert_allclose(d, 100.0)


def test_square_bins_four_or_eight_neighbours_and_holes() -> None:
    a = _square(5)
    a = a[~((a.obs["array_row"] == 2) & (a.obs["array_col"] == 2)).to_numpy()].copy()  # one bin off tissue
    s = as_spot_sample(a, kind="visium_hd_bin", bin_size_um=8)
    assert spot_record(s)["bin_size_um"] == 8.0
    A4, A8 = grid_neighbors(s), grid_neighbors(s, n_neighbors=8)
    idx = {(r, c): i for i, (r, c) in enumerate(zip(a.obs["array_row"], a.obs["array_col"]))}
    assert A4[idx[(1, 1)]].sum() == 4 and A8[idx[(1, 1)]].sum() == 7  # diagonal (2,2) is missing
    assert A4[idx[(1, 2)]].sum() == 3  # (2,2) missing
    assert A4[idx[(0, 0)]].sum() == 2 and A8[idx[(0, 0)]].sum() == 3
    assert A4.nnz == 2 * (2 * 5 * 4 - 4)  # 40 lattice edges minus the 4 of the hole
    with pytest.raises(SpotSampleError, match="4 or 8"):
        grid_neighbors(s, n_neighbors=6)


def test_existing_coordinates_are_kept() -> None:
    a = _square(3)
    a.obsm["spatial"] = np.arange(18, dtype=float).reshape(9, 2) * 3.0
    s = as_spot_sample(a, kind="visium_hd_bin", bin_size_um=16)
    np.testing.assert_array_equal(s.obsm["spatial"], a.obsm["spatial"])
    assert spot_record(s)["spatial_units"] == "as given"


@pytest.mark.parametrize(
    ("mutate", "kwargs", "message"),
    [
        (lambda a: a.obs.drop(columns="array_col", inplace=True), {"kind": "visium_hd_bin", "bin_size_um": 8}, "array_col"),
        (lambda a: setattr(a, "obs", a.obs.assign(array_row=a.obs["array_row"] + 0.5)), {"kind": "visium_hd_bin", "bin_size_um": 8}, "integer array indices"),
        (lambda a: setattr(a, "obs", a.obs.assign(array_row=0)), {"kind": "visium_hd_bin", "bin_size_um": 8}, "share a grid position"),
        (lambda a: None, {"kind": "visium_hd_bin"}, "needs bin_size_um"),
        (lambda a: None, {"kind": "visium_hd_bin", "bin_size_um": -2}, "positive"),
        (lambda a: None, {"kind": "visium"}, "both parities"),
        (lambda a: None, {"kind": "slide_seq"}, "unknown spot kind"),
        (lambda a: None, {"kind": "visium", "bin_size_um": 8}, "bin_size_um is for"),
    ],
)
def test_bad_spot_tables_are_refused(mutate, kwargs, message) -> None:
    a = _square(3)
    mutate(a)
    with pytest.raises(SpotSampleError, match=message):
        as_spot_sample(a, source="my_spots.h5ad", **kwargs)


def test_grid_neighbors_needs_a_spot_sample() -> None:
    with pytest.raises(SpotSampleError, match="as_spot_sample"):
        grid_neighbors(_square(2))


def test_samples_sharing_array_indices_do_not_connect_and_distances_are_physical() -> None:
    a, b = _square(3), _square(3)
    b.obs_names = [f"t{i}" for i in range(b.n_obs)]
    both = ad.concat([a, b])
    both.obs["sample_id"] = ["A"] * 9 + ["B"] * 9
    with pytest.raises(SpotSampleError, match="share a grid position.*need sample_key"):
        as_spot_sample(both, kind="visium_hd_bin", bin_size_um=8)
    two = as_spot_sample(both, kind="visium_hd_bin", bin_size_um=8, sample_key="sample_id")
    A = grid_neighbors(two)  # the recorded sample_key is used
    assert A.nnz == 2 * grid_neighbors(as_spot_sample(a, kind="visium_hd_bin", bin_size_um=8)).nnz
    assert A[:9, 9:].nnz == 0
    from spatial_assets.deconvolution.spots import grid_graph

    s = as_spot_sample(a, kind="visium_hd_bin", bin_size_um=8)
    conn, dist = grid_graph(s)
    np.testing.assert_allclose(dist.data, 8.0)
    assert (conn != (dist > 0)).nnz == 0


def test_sample_key_keeps_samples_apart() -> None:
    a = _square(3)
    a.obs["sample_id"] = "A"
    s = as_spot_sample(a, kind="visium_hd_bin", bin_size_um=8)
    s.obs["sample_id"] = ["A"] * 5 + ["B"] * 4  # rows 0-1 and part of row 1 vs the rest
    A = grid_neighbors(s, sample_key="sample_id")
    codes = s.obs["sample_id"].to_numpy()
    r, c = A.nonzero()
    assert (codes[r] == codes[c]).all() and A.nnz < grid_neighbors(s).nnz
