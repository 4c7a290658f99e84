"""Spatial neighbour graphs (squidpy key names) and isolated-island detection.

Why per sample: two tissue sections share a coordinate system only by accident; an edge between them
would let one section's expression leak into the other's domains. So the graph is built group by group
(``sample_key``) and assembled block-diagonally — no edge ever crosses samples.

Why symmetric: an undirected graph makes connected components (islands) and smoothing well defined;
a k-NN edge i→j is kept as i–j (union), as scanpy/squidpy users expect.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.sparse.csgraph import connected_components
from sklearn.neighbors import NearestNeighbors

from spatial_assets.domains.engine import DomainInputError, validate_sample_key, validate_spatial

CONNECTIVITIES_KEY = "spatial_connectivities"
DISTANCES_KEY = "spatial_distances"
GRAPH_UNS = "spatial_graph"
ISLAND_OBS = "is_island"
COMPONENT_OBS = "spatial_component"

Method = Literal["knn", "radius", "delaunay"]
CoordType = Literal["generic", "grid"]

# radius=None for method="radius": this many median nearest-neighbour distances (scale-free: the same
# rule works for µm, pixels or bin indices, at any cell density)
DEFAULT_RADIUS_SCALE = 2.0
_GRID_TOL = 0.1  # lattice distances are matched within 10 % of the spacing
_LATTICE_TOL = 0.02  # detect_lattice: nearest-neighbour distances within 2 % of the spacing


def median_nn_distance(xy: np.ndarray) -> float:
    """Median distance to the nearest other point: the natural length unit of a sample."""
    if xy.shape[0] < 2:
        return 1.0
    d, _ = NearestNeighbors(n_neighbors=2).fit(xy).kneighbors(xy)
    med = float(np.median(d[:, 1]))
    if med <= 0:  # duplicated coordinates: fall back to the smallest positive distance
        pos = d[:, 1][d[:, 1] > 0]
        med = float(np.median(pos)) if pos.size else 1.0
    return med


def _knn(xy: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = xy.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
    d, idx = NearestNeighbors(n_neighbors=k + 1).fit(xy).kneighbors(xy)
    # drop self: it is not always column 0 when points coincide, so remove by identity
    rows = np.repeat(np.arange(n), k + 1)
    cols = idx.ravel()
    dist = d.ravel()
    keep = rows != cols
    rows, cols, dist = rows[keep], cols[keep], dist[keep]
    return rows, cols, dist


def _radius(xy: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = NearestNeighbors(radius=r).fit(xy).radius_neighbors_graph(xy, mode="distance", sort_results=False)
    g = g.tocoo()
    keep = g.row != g.col
    return g.row[keep].astype(np.int64), g.col[keep].astype(np.int64), g.data[keep]


def _delaunay(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy.spatial import Delaunay, QhullError

    n = xy.shape[0]
    if n < 4:  # too few for a triangulation: everybody is everybody's neighbour
        r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        m = r != c
        rows, cols = r[m], c[m]
    else:
        try:
            tri = Delaunay(xy[:, :2])
        except QhullError:  # collinear points: connect consecutive points along the line
            order = np.argsort(xy[:, 0] + xy[:, 1] * 1e-9)
            rows, cols = order[:-1], order[1:]
        else:
            s = tri.simplices
            rows = np.concatenate([s[:, 0], s[:, 1], s[:, 2]])
            cols = np.concatenate([s[:, 1], s[:, 2], s[:, 0]])
    dist = np.linalg.norm(xy[rows] - xy[cols], axis=1)
    return rows.astype(np.int64), cols.astype(np.int64), dist


def _grid(xy: np.ndarray, lattice: np.ndarray | None, n_neighbors: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4/8 neighbours on a square lattice, 6 on a hexagonal one (Visium), in units of the spacing."""
    if lattice is not None:
        pos, spacing = lattice, 1.0
    else:
        pos, spacing = xy[:, :2], median_nn_distance(xy[:, :2])
    reach = {4: 1.0, 6: 1.0, 8: np.sqrt(2.0)}[n_neighbors] * spacing * (1 + _GRID_TOL)
    rows, cols, _ = _radius(pos, reach)
    dist = np.linalg.norm(xy[rows] - xy[cols], axis=1)
    return rows, cols, dist


def _groups(adata: AnnData, sample_key: str | None) -> list[np.ndarray]:
    if sample_key is None:
        return [np.arange(adata.n_obs)]
    codes = pd.Categorical(adata.obs[sample_key].astype(str)).codes
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    return np.split(order, bounds)


def spatial_graph_matrices(
    xy: np.ndarray,
    groups: list[np.ndarray],
    *,
    method: Method = "knn",
    n_neighbors: int | None = None,
    radius: float | None = None,
    coord_type: CoordType = "generic",
    lattice: np.ndarray | None = None,
) -> tuple[sp.csr_matrix, sp.csr_matrix, dict[str, Any]]:
    """Block-diagonal (connectivities, distances) over ``groups`` of row indices; no AnnData copy.

    Used by the domain engines so they can build their graph without duplicating the expression matrix.
    """
    n = xy.shape[0]
    if method not in ("knn", "radius", "delaunay"):
        raise DomainInputError(f"unknown graph method {method!r}; use 'knn', 'radius' or 'delaunay'")
    if coord_type not in ("generic", "grid"):
        raise DomainInputError(f"unknown coord_type {coord_type!r}; use 'generic' or 'grid'")
    if coord_type == "grid":
        k = 4 if n_neighbors is None else int(n_neighbors)
        if k not in (4, 6, 8):
            raise DomainInputError(f"coord_type='grid' needs n_neighbors 4, 6 or 8, got {n_neighbors}")
    else:
        k = 10 if n_neighbors is None else int(n_neighbors)
        if method == "knn" and k < 1:
            raise DomainInputError(f"n_neighbors must be >= 1, got {n_neighbors}")
    if radius is not None and not (np.isfinite(radius) and radius > 0):
        raise DomainInputError(f"radius must be a positive number, got {radius!r}")
    all_r, all_c, all_d = [], [], []
    radii: list[float] = []
    for g in groups:
        if g.size < 2:
            continue
        sub = xy[g]
        if coord_type == "grid":
            r, c, d = _grid(sub, None if lattice is None else lattice[g], k)
        elif method == "knn":
            r, c, d = _knn(sub, k)
        elif method == "radius":
            rr = radius if radius is not None else DEFAULT_RADIUS_SCALE * median_nn_distance(sub)
            radii.append(float(rr))
            r, c, d = _radius(sub, rr)
        else:
            r, c, d = _delaunay(sub)
        all_r.append(g[r])
        all_c.append(g[c])
        all_d.append(d)
    rows = np.concatenate(all_r) if all_r else np.empty(0, np.int64)
    cols = np.concatenate(all_c) if all_c else np.empty(0, np.int64)
    dist = np.concatenate(all_d) if all_d else np.empty(0)
    # symmetrise (union of directed edges); duplicates collapse to one edge with the same distance
    rows, cols = np.concatenate([rows, cols]), np.concatenate([cols, rows])
    dist = np.concatenate([dist, dist])
    key = rows * n + cols
    _, first = np.unique(key, return_index=True)
    rows, cols, dist = rows[first], cols[first], dist[first]
    # a zero distance (duplicated coordinates) must stay an edge in the sparse distance matrix
    dist = np.where(dist > 0, dist, np.finfo(np.float64).tiny)
    conn = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(n, n))
    dmat = sp.csr_matrix((dist, (rows, cols)), shape=(n, n))
    params: dict[str, Any] = {
        "method": method if coord_type == "generic" else "grid",
        "coord_type": coord_type,
        "n_neighbors": k,
        "radius": radius,
        "n_edges": int(rows.size // 2),
        "mean_degree": float(rows.size / n) if n else 0.0,
    }
    if radii:
        params["radius_used"] = radii
    return conn, dmat, params


def detect_lattice(
    xy: np.ndarray, *, tol: float = _LATTICE_TOL, min_fraction: float = 0.9, max_points: int = 5_000, seed: int = 0
) -> tuple[str | None, float]:
    """(``"hex"``, ``"square"`` or None, spacing): are these points spots/bins on a regular lattice?

    Spots (Visium: hexagonal) and bins (Stereo-seq, Visium HD: square) sit at one exact distance from
    their nearest neighbours; cells never do. So: the nearest-neighbour distance of >= ``min_fraction``
    of (a seeded sample of) the points lies within ``tol`` of its median, and the number of points at
    that distance says the lattice (6 hexagonal, 4 square). Scale-free: units never enter.
    """
    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    n = xy.shape[0]
    if n < 10:
        return None, median_nn_distance(xy) if n >= 2 else 1.0
    rng = np.random.default_rng(seed)
    probe = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    d, _ = NearestNeighbors(n_neighbors=min(7, n)).fit(xy).kneighbors(xy[probe])
    d = d[:, 1:]
    spacing = float(np.median(d[:, 0]))
    if spacing <= 0:
        return None, spacing
    if np.mean(np.abs(d[:, 0] - spacing) <= tol * spacing) < min_fraction:
        return None, spacing
    ring = np.median((np.abs(d - spacing) <= tol * spacing).sum(axis=1))
    if ring >= 6:
        return "hex", spacing
    if ring >= 3:
        return "square", spacing
    return None, spacing


#: lattice type -> neighbours of its first ring
LATTICE_NEIGHBORS = {"hex": 6, "square": 4}


def neighbourhood_graph(
    xy: np.ndarray,
    groups: list[np.ndarray],
    *,
    n_neighbors: int = 10,
    coord_type: str = "auto",
) -> tuple[sp.csr_matrix, dict[str, Any]]:
    """The domain engines' spatial graph: per group, lattice neighbours for spots/bins on a grid,
    k-NN (``n_neighbors``) for cells; block-diagonal over groups (no edge between samples).

    ``coord_type``: ``"auto"`` decides per group with :func:`detect_lattice`; ``"generic"`` is always
    k-NN; ``"grid"`` is always the lattice (square if it cannot tell). Returns (connectivities, info)
    with what each group got.
    """
    if coord_type not in ("auto", "generic", "grid"):
        raise DomainInputError(f"unknown coord_type {coord_type!r}; use 'auto', 'generic' or 'grid'")
    n = xy.shape[0]
    total = sp.csr_matrix((n, n), dtype=np.float32)
    kinds: list[str] = []
    for g in groups:
        lattice = None
        if coord_type != "generic" and g.size >= 2:
            lattice, _ = detect_lattice(xy[g])
            if coord_type == "grid" and lattice is None:
                lattice = "square"
        if lattice is None:
            conn, _, _ = spatial_graph_matrices(xy, [g], method="knn", n_neighbors=n_neighbors)
            kinds.append(f"knn{n_neighbors}")
        else:
            conn, _, _ = spatial_graph_matrices(xy, [g], coord_type="grid", n_neighbors=LATTICE_NEIGHBORS[lattice])
            kinds.append(f"{lattice}_lattice")
        total = total + conn
    total = sp.csr_matrix(total)
    total.data[:] = 1.0
    return total, {"graph_per_group": kinds, "mean_degree": float(total.nnz / max(n, 1))}


def build_spatial_graph(
    adata: AnnData,
    *,
    method: Method = "knn",
    n_neighbors: int | None = None,
    radius: float | None = None,
    coord_type: CoordType = "generic",
    sample_key: str | None = None,
) -> AnnData:
    """Copy of ``adata`` with ``obsp['spatial_connectivities'|'spatial_distances']`` and ``uns['spatial_graph']``.

    ``n_neighbors`` defaults to 10 for ``knn`` and to 4 (square lattice) for ``coord_type='grid'``
    (6 = hexagonal Visium lattice, 8 = square lattice with diagonals). The grid uses
    ``obs['array_row'/'array_col']`` when present (spacing 1), else the median nearest-neighbour
    distance of ``obsm['spatial']`` as spacing. ``radius=None`` with ``method='radius'`` means
    2 × the sample's median nearest-neighbour distance.
    """
    xy = validate_spatial(adata, "adata")
    validate_sample_key(adata, sample_key, "adata")
    lattice = None
    if coord_type == "grid" and {"array_row", "array_col"} <= set(adata.obs.columns) and n_neighbors != 6:
        lattice = adata.obs[["array_row", "array_col"]].to_numpy(dtype=np.float64)
        if not np.isfinite(lattice).all():
            raise DomainInputError("adata: obs['array_row'/'array_col'] has NaN values")
    conn, dist, params = spatial_graph_matrices(
        xy,
        _groups(adata, sample_key),
        method=method,
        n_neighbors=n_neighbors,
        radius=radius,
        coord_type=coord_type,
        lattice=lattice,
    )
    out = adata.copy()
    out.obsp[CONNECTIVITIES_KEY] = conn
    out.obsp[DISTANCES_KEY] = dist
    params["sample_key"] = sample_key
    params["lattice_from_array_coords"] = lattice is not None
    out.uns[GRAPH_UNS] = {k: v for k, v in params.items() if v is not None}
    # squidpy's own record, so squidpy functions find the graph
    out.uns["spatial_neighbors"] = {
        "connectivities_key": CONNECTIVITIES_KEY,
        "distances_key": DISTANCES_KEY,
        "params": {"n_neighbors": params["n_neighbors"], "coord_type": coord_type, "transform": None},
    }
    return out


def _components(adata: AnnData) -> tuple[np.ndarray, np.ndarray]:
    if CONNECTIVITIES_KEY not in adata.obsp:
        raise DomainInputError(
            f"adata: obsp['{CONNECTIVITIES_KEY}'] is missing; run build_spatial_graph first"
        )
    _, labels = connected_components(adata.obsp[CONNECTIVITIES_KEY], directed=False)
    sizes = np.bincount(labels)
    return labels, sizes


def find_islands(adata: AnnData, *, min_size: int) -> pd.Series:
    """True for cells in a connected component of the spatial graph with fewer than ``min_size`` cells.

    Why: detached fragments (debris, tissue folds, a few cells far from the section) get their own
    neighbourhood statistics and often a spurious domain; flag them so they can be reviewed or dropped.
    """
    if int(min_size) < 1:
        raise DomainInputError(f"min_size must be >= 1, got {min_size}")
    labels, sizes = _components(adata)
    return pd.Series(sizes[labels] < int(min_size), index=adata.obs_names.copy(), name=ISLAND_OBS)


def flag_islands(adata: AnnData, *, min_size: int, remove: bool = False) -> AnnData:
    """Copy with ``obs['is_island']`` (and ``obs['spatial_component']``, its component id for plots).

    ``remove=True`` returns only the cells that are not on an island (the graph is subset with them).
    """
    flags = find_islands(adata, min_size=min_size)
    labels, _ = _components(adata)
    out = adata.copy()
    out.obs[ISLAND_OBS] = flags.to_numpy()
    out.obs[COMPONENT_OBS] = labels.astype(np.int64)
    out.uns.setdefault(GRAPH_UNS, {})
    out.uns[GRAPH_UNS] = {**dict(out.uns[GRAPH_UNS]), "island_min_size": int(min_size), "n_island_cells": int(flags.sum())}
    if remove:
        out = out[~flags.to_numpy()].copy()
    return out


__all__ = [
    "COMPONENT_OBS",
    "CONNECTIVITIES_KEY",
    "DISTANCES_KEY",
    "GRAPH_UNS",
    "ISLAND_OBS",
    "LATTICE_NEIGHBORS",
    "build_spatial_graph",
    "detect_lattice",
    "find_islands",
    "flag_islands",
    "median_nn_distance",
    "neighbourhood_graph",
    "spatial_graph_matrices",
]
