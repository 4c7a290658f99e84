"""Bringing a landed spatial sample to the platform's AnnData contract (no Dagster)."""

from __future__ import annotations

import re
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from spatial_assets.core.ids import validate_id
from spatial_assets.core.lineage import content_hash
from spatial_assets.core.schema import SAMPLE_KEY, SPATIAL_OBSM


class SpatialInputError(ValueError):
    """A spatial sample that cannot be used as given (names the file and column)."""


_CONTROL_PREFIXES = ("blank", "negcontrol", "negprb", "unassigned", "deprecated", "antisense", "intergenic")


def panel_genes(adata: ad.AnnData) -> list[str]:
    """Panel genes: var_names without control probes (Blank-*, NegControl*, … or ``var['is_blank']``)."""
    names = [str(g) for g in adata.var_names]
    blank = np.array(
        [g.lower().replace("-", "").replace("_", "").startswith(_CONTROL_PREFIXES) for g in names], dtype=bool
    )
    if "is_blank" in adata.var.columns:
        blank |= adata.var["is_blank"].fillna(False).astype(bool).to_numpy()
    return [g for g, b in zip(names, blank) if not b]


def check_unique_cell_ids(adata: ad.AnnData, source: str, *, error: type[ValueError] = SpatialInputError) -> None:
    """Refuse duplicated ``obs_names``: annotations, domains and lineage are all keyed by cell id."""
    if adata.obs_names.is_unique:
        return
    names = adata.obs_names
    dup = names[names.duplicated()].unique()
    n_cells = int(names.isin(dup).sum())
    shown = ", ".join(repr(str(d)) for d in dup[:5]) + (", ..." if len(dup) > 5 else "")
    raise error(f"{source}: {len(dup):,} duplicate cell ids in obs_names ({n_cells:,} cells), e.g. {shown}")


#: matrices checked for NaN/inf besides X: the raw-count sources normalization may read instead of X
_COUNT_LAYERS = ("counts", "raw_counts", "raw")
#: elements per block when scanning a dense matrix (bounds the temporary boolean array)
_FINITE_BLOCK = 4_000_000


def _nonfinite(X: object) -> tuple[int, int, tuple[int, int] | None]:
    """(non-finite values, cells holding them, first (row, col)) of a dense or sparse matrix."""
    if sp.issparse(X):
        csr = X.tocsr() if X.format != "csr" else X
        bad = ~np.isfinite(csr.data)
        if not bad.any():
            return 0, 0, None
        rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))[bad]
        first = int(np.flatnonzero(bad)[0])
        return int(bad.sum()), int(np.unique(rows).size), (int(rows[0]), int(csr.indices[first]))
    n_rows = int(X.shape[0])  # type: ignore[attr-defined]
    step = max(1, _FINITE_BLOCK // max(int(X.shape[1]), 1))  # type: ignore[attr-defined]
    total = cells = 0
    first = None
    for start in range(0, n_rows, step):
        block = np.asarray(X[start : start + step])  # type: ignore[index]
        if not np.issubdtype(block.dtype, np.floating):
            continue  # integer matrices cannot hold NaN/inf
        bad = ~np.isfinite(block)
        if bad.any():
            total += int(bad.sum())
            cells += int(bad.any(axis=1).sum())
            if first is None:
                r, c = np.argwhere(bad)[0]
                first = (start + int(r), int(c))
    return total, cells, first


def check_finite_expression(adata: ad.AnnData, source: str, *, error: type[ValueError] = SpatialInputError) -> None:
    """Refuse NaN/inf in X (and in the count layers normalization may use instead of X).

    Why refuse rather than ignore: a non-finite value propagates through normalization (its whole
    row becomes NaN) and into the per-gene query statistics the alignment uses, so it moves the calls
    of other cells too (issue 7: one ``inf`` changed 563 of 1,500 calls, silently). Counts the
    values and names the first.
    """
    matrices: list[tuple[str, object]] = [("X", adata.X)]
    matrices += [(f"layers['{k}']", adata.layers[k]) for k in _COUNT_LAYERS if k in adata.layers]
    if adata.raw is not None:
        matrices.append(("raw.X", adata.raw.X))
    for where, X in matrices:
        if X is None:
            continue
        n_bad, n_cells, first = _nonfinite(X)
        if n_bad:
            r, c = first  # type: ignore[misc]
            genes = adata.raw.var_names if where == "raw.X" else adata.var_names
            raise error(
                f"{source}: {where} has {n_bad:,} non-finite values (NaN or infinite) in {n_cells:,} cells "
                f"(first: cell {str(adata.obs_names[r])!r}, gene {str(genes[c])!r}); fix or drop them first"
            )


def validate_spatial(adata: ad.AnnData, name: str) -> np.ndarray:
    """Refuse empty samples, duplicate cell ids, NaN/inf expression and bad coordinates; return the (n, 2) coordinates.

    The one validation of a spatial sample: the platform (:func:`prepare_spatial_cells`, the
    ``spatial_cells`` asset) and the ``celltype`` command (through ``run_celltyping``) both call it,
    so both refuse the same inputs with the same message.
    """
    if adata.n_obs == 0:
        raise SpatialInputError(f"{name}: spatial sample has no cells")
    check_unique_cell_ids(adata, name)
    check_finite_expression(adata, name)
    return spatial_coordinates(adata, name)


def checked_coordinates(
    adata: ad.AnnData, coords: object, *, where: str, source: str, error: type[ValueError] = SpatialInputError
) -> np.ndarray:
    """``coords`` as a finite (n_obs, ≥2) float array, or ``error`` naming ``source`` and ``where``."""
    coords = coords.to_numpy() if isinstance(coords, pd.DataFrame) else coords
    try:
        coords = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise error(f"{source}: {where} has non-numeric coordinates ({exc})") from exc
    if coords.ndim != 2 or coords.shape[0] != adata.n_obs or coords.shape[1] < 2:
        raise error(f"{source}: {where} must be (n_obs, >= 2), got shape {coords.shape}")
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        first = adata.obs_names[np.flatnonzero(bad)[0]]
        raise error(f"{source}: {where} has NaN/infinite coordinates in {int(bad.sum())} cells (first: {first!r})")
    return coords


def spatial_coordinates(adata: ad.AnnData, source: str = "spatial data") -> np.ndarray:
    """``obsm['spatial']`` (or obs x/y columns) as a finite (n, 2) float array; errors name the column."""
    if SPATIAL_OBSM in adata.obsm:
        coords, where = adata.obsm[SPATIAL_OBSM], f"obsm['{SPATIAL_OBSM}']"
    elif {"x", "y"} <= set(adata.obs.columns):
        coords, where = adata.obs[["x", "y"]], "obs['x'], obs['y']"
    else:
        raise SpatialInputError(f"{source}: no coordinates: expected obsm['{SPATIAL_OBSM}'] or obs columns 'x' and 'y'")
    return checked_coordinates(adata, coords, where=where, source=source)[:, :2]


#: an Ensembl gene id (ENSG…, ENSMUSG…, with an optional version suffix)
ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def check_gene_symbols(var_names: Any, source: str) -> None:
    """Refuse gene names that are Ensembl ids: references, models and signatures use symbols, so such
    a sample would match no gene (a new 'panel' of its own, nothing to train or annotate it with)."""
    names = [str(g) for g in var_names]
    ids = [g for g in names if ENSEMBL_ID.match(g)]
    if names and len(ids) > len(names) // 2:
        raise SpatialInputError(
            f"{source}: {len(ids)} of {len(names)} gene names are Ensembl ids (e.g. {ids[:3]}), not gene symbols: "
            "put the symbols in var_names (keep the ids in a var column, e.g. var['gene_ids'])"
        )


def prepare_spatial_cells(adata: ad.AnnData, *, sample_id: str, source: str) -> ad.AnnData:
    """Validated copy with ``obsm['spatial']``, ``obs['sample_id']`` and a content hash in ``uns``."""
    validate_id(sample_id, "sample id")
    coords = validate_spatial(adata, source)
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()][:5].tolist()
        raise SpatialInputError(f"{source}: duplicate gene names, e.g. {dup}")
    check_gene_symbols(adata.var_names, source)
    out = adata.copy()
    out.obsm[SPATIAL_OBSM] = coords
    out.obs[SAMPLE_KEY] = pd.Categorical([sample_id] * out.n_obs)
    out.uns["content_sha256"] = content_hash(out)
    out.uns["source_uri"] = source
    return out
