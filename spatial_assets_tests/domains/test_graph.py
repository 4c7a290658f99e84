"""Spatial graph: per-sample blocks, grid lattices, islands, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from spatial_assets.domains.engine import DomainInputError
from spatial_assets.domains.graph import (
    build_spatial_graph,
    detect_lattice,
    find_islands,
    flag_islands,
    median_nn_distance,
    neighbourhood_graph,
)


def _adata(xy: np.ndarray, **obs) -> AnnData:
    a = AnnData(X=sp.csr_matrix(np.ones((len(xy), 3), dtype=np.float32)), obs=pd.DataFrame(obs or None, index=[f"c{i}" for i in range(len(xy))]))
    a.obsm["spatial"] = np.asarray(xy, dtype=float)
    return a


def _lattice(nx: int, ny: int, spacing: float = 1.0) -> np.ndarray:
    gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))
    return np.c_[gx.ravel(), gy.ravel()] * spacing


def _degrees(a: AnnData) -> np.ndarray:
    return np.asarray(a.obsp["spatial_connectivities"].sum(1)).ravel().astype(int)


def test_samples_never_connect_even_with_identical_coordinates() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (200, 2))
    a = _adata(np.vstack([xy, xy]), sample=["s1"] * 200 + ["s2"] * 200)
    for method in ("knn", "radius", "delaunay"):
        g = build_spatial_graph(a, method=method, sample_key="sample")
        c = g.obsp["spatial_connectivities"]
        assert c[:200, 200:].nnz == 0 and c[200:, :200].nnz == 0, method
        assert (c != c.T).nnz == 0  # symmetric
        assert c.diagonal().sum() == 0  # no self loops
        # the two identical samples get identical blocks
        assert (c[:200, :200] != c[200:, 200:]).nnz == 0
    # without sample_key the duplicated points do connect across the halves
    assert build_spatial_graph(a).obsp["spatial_connectivities"][:200, 200:].nnz > 0


def test_knn_degree_and_distances() -> None:
    rng = np.random.default_rng(1)
    a = _adata(rng.uniform(0, 50, (300, 2)))
    g = build_spatial_graph(a, method="knn", n_neighbors=6)
    deg = _degrees(g)
    assert deg.min() >= 6  # union of directed 6-NN edges
    d = g.obsp["spatial_distances"].tocoo()
    xy = a.obsm["spatial"]
    np.testing.assert_allclose(d.data, np.linalg.norm(xy[d.row] - xy[d.col], axis=1))
    assert g.uns["spatial_graph"]["n_neighbors"] == 6
    assert "spatial_connectivities" not in a.obsp  # caller untouched


def test_grid_lattice_4_and_8_from_inferred_spacing() -> None:
    a = _adata(_lattice(10, 10, spacing=2.0))
    d4 = _degrees(build_spatial_graph(a, coord_type="grid", n_neighbors=4))
    d8 = _degrees(build_spatial_graph(a, coord_type="grid", n_neighbors=8))
    # interior / edge / corner counts of a 10×10 lattice
    assert np.bincount(d4).tolist() == [0, 0, 4, 32, 64]
    assert (d8 == 8).sum() == 64 and (d8 == 5).sum() == 32 and (d8 == 3).sum() == 4


def test_grid_uses_array_coordinates_when_present() -> None:
    lat = _lattice(6, 5)
    rng = np.random.default_rng(2)
    # jittered pixel coordinates but exact array indices
    a = _adata(lat * 7.3 + rng.normal(0, 1.5, lat.shape), array_row=lat[:, 1].astype(int), array_col=lat[:, 0].astype(int))
    g = build_spatial_graph(a, coord_type="grid", n_neighbors=4)
    assert g.uns["spatial_graph"]["lattice_from_array_coords"]
    assert np.bincount(_degrees(g)).tolist() == [0, 0, 4, 14, 12]


def test_hexagonal_lattice_six_neighbours() -> None:
    pts = [(c + 0.5 * (r % 2), r * np.sqrt(3) / 2) for r in range(8) for c in range(8)]
    g = build_spatial_graph(_adata(np.array(pts) * 100.0), coord_type="grid", n_neighbors=6)
    assert _degrees(g).max() == 6 and (_degrees(g) == 6).sum() == 36  # 6×6 interior


def test_radius_default_is_relative_to_nn_distance() -> None:
    xy = _lattice(8, 8, spacing=3.0)
    assert median_nn_distance(xy) == pytest.approx(3.0)
    g = build_spatial_graph(_adata(xy), method="radius")
    assert g.uns["spatial_graph"]["radius_used"] == [pytest.approx(6.0)]
    # same result in other units: scale-free
    g2 = build_spatial_graph(_adata(xy * 1000), method="radius")
    assert (g.obsp["spatial_connectivities"] != g2.obsp["spatial_connectivities"]).nnz == 0


def test_islands_flagged_and_removed() -> None:
    main = _lattice(10, 10)
    island = np.array([[100.0, 100.0], [100.0, 101.0], [101.0, 100.0]])
    a = _adata(np.vstack([main, island]))
    g = build_spatial_graph(a, method="radius", radius=1.5)
    flags = find_islands(g, min_size=5)
    assert flags.sum() == 3 and flags.iloc[-3:].all() and flags.index.equals(a.obs_names)
    f = flag_islands(g, min_size=5)
    assert f.obs["is_island"].sum() == 3 and f.obs["spatial_component"].nunique() == 2
    r = flag_islands(g, min_size=5, remove=True)
    assert r.n_obs == 100 and r.obsp["spatial_connectivities"].shape == (100, 100)
    assert "is_island" not in g.obs


def test_errors_name_the_problem() -> None:
    a = _adata(np.zeros((5, 2)))
    del a.obsm["spatial"]
    with pytest.raises(DomainInputError, match="obsm\\['spatial'\\]"):
        build_spatial_graph(a)
    b = _adata(np.array([[0, 0], [1, np.nan], [2, 2]], dtype=float))
    with pytest.raises(DomainInputError, match="NaN"):
        build_spatial_graph(b)
    c = _adata(np.random.default_rng(0).uniform(size=(10, 2)))
    with pytest.raises(DomainInputError, match="batch"):
        build_spatial_graph(c, sample_key="batch")
    with pytest.raises(DomainInputError, match="grid"):
        build_spatial_graph(c, coord_type="grid", n_neighbors=5)
    with pytest.raises(DomainInputError, match="spatial_connectivities"):
        find_islands(c, min_size=3)


def _hex(n_rows: int, n_cols: int, spacing: float = 100.0) -> np.ndarray:
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    r, c = r.ravel(), c.ravel()
    return np.c_[(c + 0.5 * (r % 2)) * spacing, r * spacing * np.sqrt(3) / 2]


def test_detect_lattice_tells_spots_from_cells_whatever_the_units() -> None:
    assert detect_lattice(_hex(30, 30, 137.5)) == ("hex", pytest.approx(137.5))
    assert detect_lattice(_lattice(40, 40, 2.0)) == ("square", pytest.approx(2.0))
    cells = np.random.default_rng(0).uniform(0, 1000, size=(2000, 2))
    assert detect_lattice(cells)[0] is None
    # a lattice with a little jitter (registration noise) is still a lattice; cells never are
    jitter = _hex(30, 30) + np.random.default_rng(1).normal(0, 0.3, size=(900, 2))
    assert detect_lattice(jitter)[0] == "hex"


def test_neighbourhood_graph_lattice_for_spots_knn_for_cells_per_sample() -> None:
    spots = _hex(20, 20)
    cells = np.random.default_rng(2).uniform(0, 2000, size=(400, 2))
    xy = np.vstack([spots, cells])
    groups = [np.arange(400), np.arange(400, 800)]
    conn, info = neighbourhood_graph(xy, groups, coord_type="auto")
    assert info["graph_per_group"] == ["hex_lattice", "knn10"]
    deg = np.asarray(conn.sum(1)).ravel()
    interior = (spots[:, 0] > 150) & (spots[:, 0] < 1800) & (spots[:, 1] > 150) & (spots[:, 1] < 1500)
    assert set(deg[:400][interior]) == {6}
    assert deg[400:].min() >= 10
    assert conn[:400, 400:].nnz == 0  # no edge between the samples
    generic, info = neighbourhood_graph(xy, groups, coord_type="generic")
    assert info["graph_per_group"] == ["knn10", "knn10"]
    with pytest.raises(DomainInputError, match="coord_type"):
        neighbourhood_graph(xy, groups, coord_type="hexagonal")
