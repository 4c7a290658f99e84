"""Spatially variable genes: Moran's I of every gene over the spatial graph (sparse, no per-gene loop).

Why: on whole-transcriptome data most variable genes are variable for reasons other than tissue
structure (cell-type noise, dropout); genes whose expression is autocorrelated in space are the ones
that carry domains. Domain workflows in the field select them first (SpatialDE before SpaGCN; squidpy's
``spatial_autocorr``), so the default domain engine adds them to its highly variable genes on
whole-transcriptome input, and this function is also the per-sample "spatially variable genes" step.

Statistic: Moran's I with row-standardised weights (each cell's neighbours weigh 1/degree), values
centred *within each sample* so a shift between samples is not mistaken for spatial structure; the
graph is built per sample (``graph.spatial_graph_matrices``, no edge between samples). ``pval_norm`` is
the one-sided p-value of I under the normality assumption (as squidpy's ``pval_norm``), ``qval`` its
Benjamini–Hochberg adjustment over the genes tested. Everything is sparse matrix algebra on the
expression matrix, genes in column blocks, so memory stays near the input's own size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy import stats

from spatial_assets.core.normalization import NormalizationError, library_scale, log_normalized
from spatial_assets.domains.engine import DomainInputError, validate_sample_key, validate_spatial
from spatial_assets.domains.graph import _groups, neighbourhood_graph

SVG_COLUMNS = ("moranI", "pval_norm", "qval")
#: non-zeros per gene block of the product W @ X (bounds the memory of one block)
_BLOCK_NNZ = 4_000_000


def _row_standardised(conn: sp.csr_matrix) -> sp.csr_matrix:
    deg = np.asarray(conn.sum(axis=1), dtype=np.float64).ravel()
    inv = np.divide(1.0, deg, out=np.zeros_like(deg), where=deg > 0)
    return sp.csr_matrix(sp.diags(inv) @ conn.astype(np.float64))


def morans_i(
    x: np.ndarray | sp.spmatrix, w: sp.csr_matrix, groups: Sequence[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(Moran's I per column of ``x``, its variance under normality) for the weight matrix ``w``.

    ``w`` is used as given (row-standardise it for the usual definition); columns are centred within
    each of ``groups`` (row index arrays; all rows one group by default). Constant columns get I = 0.
    """
    n = x.shape[0]
    groups = [np.arange(n)] if groups is None else list(groups)
    xs = sp.csc_matrix(x, dtype=np.float64) if sp.issparse(x) else np.asarray(x, dtype=np.float64)
    w = sp.csr_matrix(w, dtype=np.float64)
    colsum_w = np.asarray(w.sum(axis=0)).ravel()
    n_genes = x.shape[1]
    xwx = np.zeros(n_genes)
    nnz_per_col = max(1.0, (xs.nnz if sp.issparse(xs) else n * n_genes) / max(n_genes, 1))
    step = int(max(1, min(n_genes, _BLOCK_NNZ // (nnz_per_col * max(1.0, w.nnz / max(n, 1))))))
    for start in range(0, n_genes, step):
        block = xs[:, start : start + step]
        wx = w @ block
        prod = block.multiply(wx) if sp.issparse(block) else block * np.asarray(wx)
        xwx[start : start + step] = np.asarray(prod.sum(axis=0)).ravel()
    num = xwx.copy()
    den = np.zeros(n_genes)
    sq = np.asarray((xs.multiply(xs) if sp.issparse(xs) else xs * xs).sum(axis=0)).ravel()
    den += sq
    for g in groups:
        sub = xs[g]
        mu = np.asarray(sub.mean(axis=0)).ravel()
        # z'Wz = x'Wx - mu (c'x) - mu (x'W1) + mu^2 1'W1 on the group's block (W block-diagonal)
        c = colsum_w[g]
        r = np.asarray(w[g].sum(axis=1)).ravel()
        cx = np.asarray(sub.T @ c).ravel()
        rx = np.asarray(sub.T @ r).ravel()
        num -= mu * cx + mu * rx - mu * mu * r.sum()
        den -= g.size * mu * mu
    s0 = float(w.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        i_stat = np.where(den > 1e-12 * np.maximum(sq, 1e-300), (n / s0) * num / den, 0.0)
    # variance under normality (Cliff & Ord): needs S1, S2 of the weight matrix
    wt = w.T.tocsr()
    sym = w + wt
    s1 = 0.5 * float(sym.multiply(sym).sum())
    s2 = float(((np.asarray(w.sum(axis=1)).ravel() + colsum_w) ** 2).sum())
    e_i = -1.0 / (n - 1)
    var = (n * n * s1 - n * s2 + 3 * s0 * s0) / ((n * n - 1) * s0 * s0) - e_i * e_i
    return i_stat, np.full(n_genes, max(var, 1e-300))


def spatially_variable_genes(
    adata: AnnData,
    *,
    sample_key: str | None = None,
    genes: Sequence[str] | None = None,
    n_top: int | None = None,
    inplace: bool = True,
    copy: bool = False,
    target_sum: float | str = "median",
    seed: int = 0,
) -> pd.DataFrame | AnnData | None:
    """Moran's I of every gene on the spatial graph, as a var table ``moranI, pval_norm, qval``.

    Expression: log1p of counts normalised to the dataset's median library size (``target_sum=
    "median"``; a number for a fixed target), detected and applied by ``core.normalization``. The graph
    is the one the default domain engine uses (``graph.neighbourhood_graph``: k-NN for cells, lattice
    neighbours for spots on a grid), built per ``sample_key`` group. ``n_top`` also marks the ``n_top``
    highest-I genes in ``var['spatially_variable']`` (else: ``qval < 0.05`` and I > 0), with
    ``var['moranI_rank']`` (1 = highest I).

    Returns (scanpy convention): ``inplace=False`` → the DataFrame, ``adata`` untouched;
    ``copy=True`` → a new AnnData with the columns; else the columns are added to ``adata.var`` and
    None is returned.
    """
    xy = validate_spatial(adata, "adata")
    validate_sample_key(adata, sample_key, "adata")
    names = list(adata.var_names.astype(str)) if genes is None else [str(g) for g in genes]
    try:
        if target_sum == "median":
            target = library_scale(adata, seed=seed).median
        elif isinstance(target_sum, (int, float)) and target_sum > 0:
            target = float(target_sum)
        else:
            raise DomainInputError(f"target_sum must be 'median' or a positive number, got {target_sum!r}")
        x, _ = log_normalized(adata, target_sum=target, seed=seed, rescale_scaled_log=True)
    except NormalizationError as exc:
        raise DomainInputError(f"adata: {exc}") from exc
    if genes is not None:
        idx = adata.var_names.get_indexer(names)
        missing = [g for g, i in zip(names, idx) if i < 0]
        if missing:
            raise DomainInputError(f"adata: genes not in var_names: {missing[:10]}")
        x = x[:, idx]
    groups = _groups(adata, sample_key)
    conn, _ = neighbourhood_graph(xy, groups)
    i_stat, var = morans_i(x, _row_standardised(conn), groups)
    z = (i_stat + 1.0 / (adata.n_obs - 1)) / np.sqrt(var)
    pval = stats.norm.sf(z)
    table = pd.DataFrame({"moranI": i_stat, "pval_norm": pval}, index=pd.Index(names, name=None))
    table["qval"] = stats.false_discovery_control(np.clip(pval, 0.0, 1.0), method="bh")
    order = np.lexsort((np.arange(len(names)), -i_stat))
    rank = np.empty(len(names), dtype=np.int64)
    rank[order] = np.arange(1, len(names) + 1)
    table["moranI_rank"] = rank
    if n_top is not None:
        table["spatially_variable"] = rank <= int(n_top)
    else:
        table["spatially_variable"] = (table["qval"] < 0.05).to_numpy() & (i_stat > 0)
    if not inplace:
        return table
    target_adata = adata.copy() if copy else adata
    for col in table.columns:
        values = pd.Series(np.nan if col != "spatially_variable" else False, index=target_adata.var_names)
        values.loc[table.index] = table[col].to_numpy()
        target_adata.var[col] = values.to_numpy().astype(table[col].dtype)
    target_adata.uns["spatially_variable_genes"] = {"sample_key": sample_key or "", "target_sum": float(target), "n_top": -1 if n_top is None else int(n_top)}
    return target_adata if copy else None


__all__ = ["SVG_COLUMNS", "morans_i", "spatially_variable_genes"]
