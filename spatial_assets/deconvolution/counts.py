"""The raw count matrix of a spot table, checked exactly.

Why exact: every deconvolution model here (Poisson-lognormal RCTD, log-CPM FlashDeconv, NNLS on mean
counts) reads a spot as a sum of cells' counts. Normalised, scaled or per-area values would be
explained as the wrong number of cells without any error, so where the counts are is found by
``core.normalization`` and then every stored value of the chosen matrix is checked: finite,
non-negative, integer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from spatial_assets.core.normalization import detect_normalization
from spatial_assets.deconvolution.reference import DeconvolutionInputError

_INTEGER_TOL = 1e-6


def _matrix(adata: AnnData, source: str):
    """The matrix a detection ``raw_source`` names: ``X``, ``raw.X`` or ``layers['<name>']``."""
    if source == "X":
        return adata.X
    if source == "raw.X":
        return adata.raw[:, adata.var_names].X
    return adata.layers[source[len("layers['") : -len("']")]]


def _first(adata: AnnData, M: sp.csr_matrix, bad: np.ndarray) -> str:
    """'spot S, gene G' of the first flagged stored value of CSR ``M``."""
    k = int(np.flatnonzero(bad)[0])
    row = int(np.searchsorted(M.indptr, k, side="right") - 1)
    return f"spot {adata.obs_names[row]!r}, gene {adata.var_names[M.indices[k]]!r}: {M.data[k]!r}"


def spot_counts(adata: AnnData, genes: Sequence[str] | None = None, *, name: str = "spots") -> tuple[sp.csr_matrix, str]:
    """(CSR float32 counts of ``genes`` (all genes when None), where they came from).

    Raw counts are looked for in ``layers['counts'|'raw_counts'|'raw']``, ``raw.X`` and ``X`` (same
    detection as cell typing); negative, non-finite or non-integer values are an error naming the
    spot and gene, because proportions computed from them would be silently wrong.
    """
    if adata.n_obs == 0:
        raise DeconvolutionInputError(f"spot table {name} has no spots")
    if adata.n_vars == 0:
        raise DeconvolutionInputError(f"spot table {name} has no genes")
    status = detect_normalization(adata)
    source = status.raw_source or "X"
    M = _matrix(adata, source)
    if M is None:
        raise DeconvolutionInputError(f"spot table {name} has no count matrix (X is empty)")
    M = sp.csr_matrix(M)
    if not np.issubdtype(M.dtype, np.number):
        raise DeconvolutionInputError(f"spot table {name}: {source} is not numeric ({M.dtype})")
    where = "X" if source == "X" else source
    data = M.data
    nonfinite = ~np.isfinite(data)
    if nonfinite.any():
        raise DeconvolutionInputError(
            f"spot table {name}: {where} has {int(nonfinite.sum())} NaN/infinite values (first at {_first(adata, M, nonfinite)})"
        )
    neg = data < 0
    if neg.any():
        raise DeconvolutionInputError(
            f"spot table {name}: {where} has {int(neg.sum())} negative values (first at {_first(adata, M, neg)}); "
            "deconvolution needs raw counts"
        )
    frac = np.abs(data - np.round(data)) > _INTEGER_TOL
    if frac.any():
        raise DeconvolutionInputError(
            f"spot table {name}: {where} has {int(frac.sum())} non-integer values (first at {_first(adata, M, frac)}); "
            f"deconvolution needs raw integer counts ({status.describe()}; put them in layers['counts'])"
        )
    if genes is not None:
        idx = pd.Index(adata.var_names.astype(str)).get_indexer([str(g) for g in genes])
        if (idx < 0).any():
            missing = [g for g, i in zip(genes, idx) if i < 0][:10]
            raise DeconvolutionInputError(f"spot table {name}: genes not in var_names: {missing}")
        M = M[:, idx]
    M = sp.csr_matrix(M, dtype=np.float32, copy=True)  # never the caller's arrays
    M.sum_duplicates()
    return M, where
