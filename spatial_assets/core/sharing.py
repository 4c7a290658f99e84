"""New AnnData objects that share the (read-only) matrices of their input.

Why: the training-set steps (ontology harmonisation, balancing) only add obs columns or pick rows;
``adata.copy()`` duplicated the expression matrix and the counts layer at every step, which is
most of the pipeline's peak memory. These helpers give a new object (new obs/var/uns, safe to
modify) whose matrices are the input's own arrays; callers never write into matrices in place.
"""

from __future__ import annotations

import copy

import numpy as np
from anndata import AnnData


def share_matrices(adata: AnnData, rows: np.ndarray | None = None) -> AnnData:
    """New AnnData with copied obs/var/uns; matrices shared when ``rows`` is None or selects every row in order.

    Otherwise (a real subset) the rows are copied, as ``adata[rows].copy()`` would.
    """
    if rows is not None and not (len(rows) == adata.n_obs and np.array_equal(rows, np.arange(adata.n_obs))):
        return adata[rows].copy()
    if adata.is_view:
        return adata.copy()
    out = AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        uns=copy.deepcopy(dict(adata.uns)),
        obsm=dict(adata.obsm.items()),
        varm=dict(adata.varm.items()),
        obsp=dict(adata.obsp.items()),
        varp=dict(adata.varp.items()),
        layers=dict(adata.layers.items()),
    )
    if adata.raw is not None:
        out.raw = adata.raw.to_adata()
    return out
