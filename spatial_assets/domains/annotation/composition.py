"""Cell-type composition per sample x domain, and domain marker genes (one-vs-rest Wilcoxon).

Both are long tables with plain str/int/float columns, so they write to parquet as they are.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy import stats

from spatial_assets.core.schema import CELL_TYPE, DOMAIN, SAMPLE_KEY, UNASSIGNED
from spatial_assets.domains.annotation.ranking import (
    _domain_labels,
    _group_codes,
    _mwu_from_rank_sums,
    _natural_key,
    _rank_sums_dense,
    _rank_sums_sparse,
)
from spatial_assets.domains.annotation.signatures import DomainAnnotationError, log_normalized_expression

# --------------------------------------------------------------------------------------------
# composition and markers
# --------------------------------------------------------------------------------------------


def domain_composition(
    adata: AnnData,
    *,
    domain_key: str = DOMAIN,
    cell_type_key: str = CELL_TYPE,
    sample_key: str | None = SAMPLE_KEY,
) -> pd.DataFrame:
    """Long table ``sample_id, domain, cell_type, n_cells, fraction`` (fraction within
    sample x domain), plain str/int/float columns so it writes to parquet as is.

    Without a sample column (``sample_key=None``, or the default ``sample_id`` absent) all
    cells form one sample called ``"all"``; an explicitly named but absent column is an error.
    """
    for key in (domain_key, cell_type_key):
        if key not in adata.obs:
            raise DomainAnnotationError(
                f"obs column {key!r} not found; available: {list(adata.obs.columns)}"
            )
    if sample_key is not None and sample_key not in adata.obs:
        if sample_key != SAMPLE_KEY:
            raise DomainAnnotationError(
                f"sample column {sample_key!r} not found; available: {list(adata.obs.columns)}"
            )
        sample_key = None
    frame = pd.DataFrame(
        {
            "sample_id": adata.obs[sample_key].astype(str).to_numpy() if sample_key else "all",
            "domain": adata.obs[domain_key].astype(object).to_numpy(),
            "cell_type": adata.obs[cell_type_key].astype(object).to_numpy(),
        }
    )
    n_missing = int(frame["domain"].isna().sum())
    if n_missing:
        warnings.warn(f"{n_missing} cells without a domain left out of the composition",
                      UserWarning, stacklevel=2)
        frame = frame[frame["domain"].notna()]
    frame["cell_type"] = frame["cell_type"].where(frame["cell_type"].notna(), UNASSIGNED)
    frame = frame.astype({"domain": str, "cell_type": str})
    counts = frame.groupby(["sample_id", "domain", "cell_type"], sort=False).size()
    out = counts.rename("n_cells").reset_index()
    totals = out.groupby(["sample_id", "domain"])["n_cells"].transform("sum")
    out["fraction"] = (out["n_cells"] / totals).astype(np.float64)
    out["n_cells"] = out["n_cells"].astype(np.int64)
    domain_order = sorted(out["domain"].unique(), key=_natural_key)
    out["_d"] = out["domain"].map({d: i for i, d in enumerate(domain_order)})
    out = out.sort_values(["sample_id", "_d", "n_cells", "cell_type"],
                          ascending=[True, True, False, True], kind="mergesort")
    return out.drop(columns="_d").reset_index(drop=True).astype(
        {"sample_id": str, "domain": str, "cell_type": str}
    )


def domain_marker_genes(
    adata: AnnData,
    *,
    domain_key: str = DOMAIN,
    n_genes: int = 10,
    layer: str | None = None,
    chunk_genes: int = 64,
) -> pd.DataFrame:
    """Top marker genes per domain: one-vs-rest Wilcoxon rank-sum on log1p-10k expression.

    Same test as ``rank_signatures_by_domain`` (scipy-equivalent Mann-Whitney U, tie- and
    continuity-corrected); no scanpy/numba import. Sparse input is ranked on its non-zeros only
    (zeros are one tie block), dense input in blocks of ``chunk_genes`` genes, so memory stays
    near the input's own size. Long table ``domain, gene, score`` (z),
    ``logfoldchange`` (log2 of the ratio of mean expm1 expression, scanpy's convention),
    ``pval, pval_adj`` (BH over all genes within the domain), ``rank`` (1 = highest z); only
    genes with z > 0 (higher in the domain) are reported. Domains with fewer than 2 cells are
    skipped with a warning.
    """
    if n_genes < 1:
        raise ValueError(f"n_genes must be >= 1, got {n_genes}")
    labels, domains = _domain_labels(adata, domain_key)
    sizes = {d: int(np.sum(labels == d)) for d in domains}
    small = [d for d in domains if sizes[d] < 2]
    if small:
        warnings.warn(f"domains with < 2 cells skipped for markers: {small}", UserWarning,
                      stacklevel=2)
    testable = [d for d in domains if sizes[d] >= 2]
    if len(testable) < 2:
        raise DomainAnnotationError(
            f"obs[{domain_key!r}] needs at least 2 domains with >= 2 cells for marker genes"
        )
    x, var_names, _ = log_normalized_expression(adata, layer=layer)
    keep = np.isin(labels, testable)
    x = x[keep] if not keep.all() else x
    codes = _group_codes(labels[keep], testable)
    n, n_var, n_dom = x.shape[0], x.shape[1], len(testable)
    n_in = np.bincount(codes, minlength=n_dom)
    sums = np.empty((n_dom, n_var))
    lin = np.empty((n_dom, n_var))
    ties = np.empty(n_var)
    if sp.issparse(x) and (x.nnz == 0 or x.data.min() >= 0):
        x = sp.csc_matrix(x, dtype=np.float64, copy=True)
        x.eliminate_zeros()  # stored zeros must join the implicit zero tie block
        for start in range(0, n_var, chunk_genes):
            stop = min(start + chunk_genes, n_var)
            sl = slice(start, stop)
            sums[:, sl], ties[sl], lin[:, sl] = _rank_sums_sparse(x[:, sl], codes, n_dom)
    else:
        onehot = sp.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, n_dom))
        for start in range(0, n_var, chunk_genes):
            stop = min(start + chunk_genes, n_var)
            block = x[:, start:stop]
            block = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)
            sums[:, start:stop], ties[start:stop] = _rank_sums_dense(block, codes, n_dom)
            lin[:, start:stop] = np.asarray(onehot.T @ np.expm1(block))
    res = _mwu_from_rank_sums(sums, n_in, n, ties)
    z, p = res["z"], res["p"]
    total = lin.sum(axis=0, keepdims=True)
    mean_in = lin / n_in[:, None]
    mean_out = (total - lin) / (n - n_in)[:, None]
    lfc = np.log2((mean_in + 1e-9) / (mean_out + 1e-9))
    genes = np.asarray(pd.Index(var_names).astype(str), dtype=object)
    frames = []
    for i, dom in enumerate(testable):
        padj = stats.false_discovery_control(p[i], method="bh")
        order = np.lexsort((genes, -z[i]))  # z descending, gene name breaks ties
        order = order[z[i][order] > 0][:n_genes]
        frames.append(pd.DataFrame({
            "domain": dom,
            "gene": genes[order],
            "score": z[i][order],
            "logfoldchange": lfc[i][order],
            "pval": p[i][order],
            "pval_adj": padj[order],
            "rank": np.arange(1, len(order) + 1, dtype=np.int64),
        }))
    out = pd.concat(frames, ignore_index=True)
    return out.astype({"domain": str, "gene": str})
