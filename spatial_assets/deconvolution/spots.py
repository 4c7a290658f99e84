"""Spot-level samples: Visium spots and Visium HD bins as their own kind of sample.

Why a kind of its own: a 55 µm Visium spot or an 8/16 µm Visium HD bin holds parts of several cells,
so treating it as a cell (cell typing, per-cell QC) is wrong; it is deconvolved instead. Spots also sit
on a fixed lattice, so their neighbours are known exactly from the array indices (6 on the Visium
hexagonal grid, 4 or 8 on the square Visium HD grid), as squidpy's ``coord_type="grid"`` does, rather
than guessed from distances.

:func:`as_spot_sample` validates the lattice and records what the sample is in ``uns['spot']``;
:func:`grid_neighbors` turns the lattice into a sparse adjacency any engine can use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from spatial_assets.core.schema import SPATIAL_OBSM
from spatial_assets.core.sharing import share_matrices
from spatial_assets.core.spatial import checked_coordinates

SPOT_UNS = "spot"
VISIUM = "visium"
VISIUM_HD_BIN = "visium_hd_bin"
SPOT_KINDS = (VISIUM, VISIUM_HD_BIN)
#: Visium (v1/v2, CytAssist) spots: 55 µm across, 100 µm centre to centre on a hexagonal lattice
VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_CENTER_TO_CENTER_UM = 100.0
#: neighbours on each lattice, in array-index steps (row, col). Visium numbers columns so that
#: neighbours along a row are 2 apart and the rows are offset by one column (row + col is even).
_HEX_OFFSETS = ((0, 2), (0, -2), (1, 1), (1, -1), (-1, 1), (-1, -1))
_SQUARE4_OFFSETS = ((0, 1), (0, -1), (1, 0), (-1, 0))
_SQUARE8_OFFSETS = _SQUARE4_OFFSETS + ((1, 1), (1, -1), (-1, 1), (-1, -1))


class SpotSampleError(ValueError):
    """A spot table that cannot be used as a spot-level sample (names the column and spots)."""


def _positive(value: float | None, what: str, source: str) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise SpotSampleError(f"{source}: {what} must be a positive number of µm, got {value!r}") from exc
    if not np.isfinite(v) or v <= 0:
        raise SpotSampleError(f"{source}: {what} must be a positive number of µm, got {value!r}")
    return v


def _array_indices(adata: AnnData, array_coords: Sequence[str], source: str, sample_key: str | None = None) -> np.ndarray:
    """(n, 2) int64 lattice indices from two obs columns; integer, finite, one spot per position
    (per ``sample_key`` group when given)."""
    if len(array_coords) != 2:
        raise SpotSampleError(f"{source}: array_coords must name two obs columns (row, col), got {array_coords!r}")
    missing = [c for c in array_coords if c not in adata.obs.columns]
    if missing:
        raise SpotSampleError(
            f"{source}: grid coordinate column(s) {missing} not in obs; a spot sample needs its array "
            f"indices (SpaceRanger: array_row, array_col); available: {list(adata.obs.columns)[:20]}"
        )
    cols = []
    for c in array_coords:
        try:
            v = pd.to_numeric(adata.obs[c], errors="raise").to_numpy(dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise SpotSampleError(f"{source}: obs[{c!r}] is not numeric ({exc})") from exc
        bad = ~np.isfinite(v) | (np.abs(v - np.round(v)) > 1e-9)
        if bad.any():
            first = adata.obs_names[np.flatnonzero(bad)[0]]
            raise SpotSampleError(
                f"{source}: obs[{c!r}] must hold integer array indices; {int(bad.sum())} spots do not (first: {first!r})"
            )
        cols.append(np.round(v).astype(np.int64))
    ij = np.stack(cols, axis=1)
    group = pd.factorize(adata.obs[sample_key])[0] if sample_key is not None else np.zeros(ij.shape[0], dtype=np.int64)
    key = pd.MultiIndex.from_arrays([group, ij[:, 0], ij[:, 1]])
    if key.has_duplicates:
        dup = np.flatnonzero(key.duplicated(keep=False))[:4]
        raise SpotSampleError(
            f"{source}: {int(key.duplicated().sum())} spots share a grid position with another spot "
            f"(e.g. {[str(adata.obs_names[d]) for d in dup]} at {[tuple(int(x) for x in ij[d]) for d in dup]})"
            + ("" if sample_key else "; several samples in one table need sample_key")
        )
    return ij


def lattice_coordinates_um(ij: np.ndarray, *, kind: str, pitch_um: float) -> np.ndarray:
    """Physical (x, y) in µm of lattice indices (row, col): used when a sample has no ``obsm['spatial']``."""
    if kind == VISIUM:
        # columns step by 2 along a row (pitch/2 per index); rows are pitch·√3/2 apart
        return np.column_stack([ij[:, 1] * pitch_um / 2.0, ij[:, 0] * pitch_um * np.sqrt(3.0) / 2.0])
    return np.column_stack([ij[:, 1] * pitch_um, ij[:, 0] * pitch_um]).astype(np.float64)


def as_spot_sample(
    adata: AnnData,
    *,
    kind: str = VISIUM,
    spot_diameter_um: float | None = None,
    bin_size_um: float | None = None,
    array_coords: tuple[str, str] = ("array_row", "array_col"),
    sample_key: str | None = None,
    source: str = "spots",
) -> AnnData:
    """A new AnnData (matrices shared, not copied) marked as a spot-level sample in ``uns['spot']``.

    ``kind="visium"``: hexagonal lattice, ``spot_diameter_um`` defaults to 55 (centre-to-centre
    100 µm); ``kind="visium_hd_bin"``: square lattice of ``bin_size_um`` bins (required; 2, 8 or 16
    from SpaceRanger's binned outputs). The array indices in ``obs[array_coords]`` must be integers,
    one spot per position, and for Visium follow the hexagonal numbering (row + col of one parity).
    ``obsm['spatial']`` is kept when present (SpaceRanger writes image pixels there) and otherwise
    derived in µm from the lattice. ``sample_key``: an obs column when several samples (with
    overlapping array indices) share the table; positions are then unique per sample and
    :func:`grid_neighbors` never connects two samples. The caller's object is not modified.
    """
    if kind not in SPOT_KINDS:
        raise SpotSampleError(f"{source}: unknown spot kind {kind!r}; expected one of {list(SPOT_KINDS)}")
    if adata.n_obs == 0:
        raise SpotSampleError(f"{source}: the spot table has no spots")
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()[:5].tolist()
        raise SpotSampleError(f"{source}: duplicate spot ids in obs_names, e.g. {dup}")
    if kind == VISIUM:
        if bin_size_um is not None:
            raise SpotSampleError(f"{source}: bin_size_um is for kind='visium_hd_bin'; Visium spots have spot_diameter_um")
        diameter = _positive(VISIUM_SPOT_DIAMETER_UM if spot_diameter_um is None else spot_diameter_um, "spot_diameter_um", source)
        pitch, size_key, size = VISIUM_CENTER_TO_CENTER_UM, "spot_diameter_um", diameter
        n_neighbors = 6
    else:
        if spot_diameter_um is not None:
            raise SpotSampleError(f"{source}: spot_diameter_um is for kind='visium'; Visium HD bins have bin_size_um")
        if bin_size_um is None:
            raise SpotSampleError(f"{source}: kind='visium_hd_bin' needs bin_size_um (e.g. 2, 8 or 16)")
        size = _positive(bin_size_um, "bin_size_um", source)
        pitch, size_key = size, "bin_size_um"
        n_neighbors = 4
    if sample_key is not None and sample_key not in adata.obs.columns:
        raise SpotSampleError(f"{source}: sample_key {sample_key!r} not in obs")
    ij = _array_indices(adata, array_coords, source, sample_key)
    if kind == VISIUM:
        parity = np.unique((ij[:, 0] + ij[:, 1]) % 2)
        if parity.size > 1:
            raise SpotSampleError(
                f"{source}: obs[{array_coords[0]!r}] + obs[{array_coords[1]!r}] takes both parities, which is not "
                "the Visium hexagonal numbering (neighbours along a row are 2 columns apart); "
                "square bins are kind='visium_hd_bin'"
            )
    out = share_matrices(adata)
    if SPATIAL_OBSM in out.obsm:
        out.obsm[SPATIAL_OBSM] = checked_coordinates(
            out, out.obsm[SPATIAL_OBSM], where=f"obsm['{SPATIAL_OBSM}']", source=source, error=SpotSampleError
        )[:, :2]
        coord_units = "as given"
    else:
        out.obsm[SPATIAL_OBSM] = lattice_coordinates_um(ij, kind=kind, pitch_um=pitch)
        coord_units = "um (from the lattice)"
    record: dict[str, Any] = {
        "kind": kind,
        size_key: float(size),
        "center_to_center_um": float(pitch),
        "array_coords": list(array_coords),
        "coord_type": "grid",
        "n_neighbors": int(n_neighbors),
        "spatial_units": coord_units,
        "n_spots": int(adata.n_obs),
        "sample_key": sample_key or "",
    }
    out.uns[SPOT_UNS] = record
    return out


def is_spot_sample(adata: AnnData) -> bool:
    """True when ``adata`` went through :func:`as_spot_sample` (``uns['spot']['kind']`` is a spot kind)."""
    rec = adata.uns.get(SPOT_UNS)
    return isinstance(rec, dict) and rec.get("kind") in SPOT_KINDS


def spot_record(adata: AnnData, source: str = "spots") -> dict[str, Any]:
    """``uns['spot']`` of a spot sample, or a :class:`SpotSampleError` saying how to make one."""
    if not is_spot_sample(adata):
        raise SpotSampleError(f"{source}: not a spot-level sample (no uns['{SPOT_UNS}']); call as_spot_sample first")
    return dict(adata.uns[SPOT_UNS])


def _lattice_edges(ij: np.ndarray, offsets: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of every pair of positions one lattice step apart (directed, both ways)."""
    n = ij.shape[0]
    lo = ij.min(axis=0) - 2
    span = ij[:, 1].max() - lo[1] + 3  # > any column reached by an offset: keys never wrap to the next row
    key = (ij[:, 0] - lo[0]) * span + (ij[:, 1] - lo[1])
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    rows, cols = [], []
    for dr, dc in offsets:
        target = key + dr * span + dc
        pos = np.minimum(np.searchsorted(sorted_key, target), n - 1)
        hit = sorted_key[pos] == target
        rows.append(np.flatnonzero(hit))
        cols.append(order[pos[hit]])
    return np.concatenate(rows), np.concatenate(cols)


def grid_neighbors(adata: AnnData, *, n_neighbors: int | None = None, sample_key: str | None = None) -> sp.csr_matrix:
    """Symmetric 0/1 adjacency (float32 CSR, n_spots × n_spots) of the spot lattice.

    Neighbours are exact lattice steps of the array indices, not distances: 6 on the Visium
    hexagonal grid; 4 (default) or 8 (with diagonals) on square Visium HD bins. A missing spot
    (off tissue) simply has no edge. With ``sample_key`` (default: the one given to
    :func:`as_spot_sample`) spots connect only within their own sample. Same layout as squidpy's
    ``obsp['spatial_connectivities']`` for ``coord_type="grid"``.
    """
    rec = spot_record(adata, "adata")
    kind = rec["kind"]
    if kind == VISIUM:
        k = 6 if n_neighbors is None else int(n_neighbors)
        if k != 6:
            raise SpotSampleError(f"adata: the Visium hexagonal grid has 6 neighbours, got n_neighbors={n_neighbors}")
        offsets = _HEX_OFFSETS
    else:
        k = 4 if n_neighbors is None else int(n_neighbors)
        if k not in (4, 8):
            raise SpotSampleError(f"adata: square bins have 4 or 8 neighbours, got n_neighbors={n_neighbors}")
        offsets = _SQUARE4_OFFSETS if k == 4 else _SQUARE8_OFFSETS
    n = adata.n_obs
    sample_key = sample_key or rec.get("sample_key") or None
    if sample_key is None:
        groups = [np.arange(n)]
    else:
        if sample_key not in adata.obs.columns:
            raise SpotSampleError(f"adata: sample_key {sample_key!r} not in obs")
        codes = pd.factorize(adata.obs[sample_key])[0]
        groups = [np.flatnonzero(codes == c) for c in range(codes.max() + 1)]
    rows, cols = [], []
    for g in groups:
        sub = adata[g] if g.size != n else adata
        ij = _array_indices(sub, tuple(rec["array_coords"]), "adata")
        r, c = _lattice_edges(ij, offsets)
        rows.append(g[r])
        cols.append(g[c])
    r, c = np.concatenate(rows), np.concatenate(cols)
    conn = sp.csr_matrix((np.ones(r.size, np.float32), (r, c)), shape=(n, n))
    return sp.csr_matrix(((conn + conn.T) > 0).astype(np.float32))


def grid_graph(
    adata: AnnData, *, n_neighbors: int | None = None, sample_key: str | None = None
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(connectivities, distances) of the lattice, squidpy's ``obsp`` pair: distances are between
    the ``obsm['spatial']`` positions of the connected spots."""
    conn = grid_neighbors(adata, n_neighbors=n_neighbors, sample_key=sample_key).tocoo()
    xy = np.asarray(adata.obsm[SPATIAL_OBSM], dtype=np.float64)[:, :2]
    d = np.linalg.norm(xy[conn.row] - xy[conn.col], axis=1)
    d = np.where(d > 0, d, np.finfo(np.float64).tiny)
    dist = sp.csr_matrix((d, (conn.row, conn.col)), shape=conn.shape)
    return sp.csr_matrix(conn), dist


__all__ = [
    "SPOT_KINDS",
    "SPOT_UNS",
    "SpotSampleError",
    "VISIUM",
    "VISIUM_HD_BIN",
    "as_spot_sample",
    "grid_graph",
    "grid_neighbors",
    "is_spot_sample",
    "lattice_coordinates_um",
    "spot_record",
]
