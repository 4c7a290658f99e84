"""Spots with a known composition: pseudo-spots summed from real single cells, and synthetic bins.

Pseudo-spots are the field's standard ground truth for deconvolution: the cells of a single-cell
resolved spatial sample (MERFISH, Xenium…) are summed into square bins, so each bin's counts are
real cells' counts and its true composition is known. Synthetic Visium HD-sized samples (100k bins)
exercise speed and memory without any data file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.spatial import cKDTree

from spatial_assets.deconvolution.spots import VISIUM_HD_BIN, as_spot_sample

TRUTH_KEY = "true_proportions"


def cell_spacing(xy: np.ndarray) -> float:
    """Median distance from a cell to its nearest neighbour (the sample's natural length unit)."""
    d, _ = cKDTree(np.asarray(xy, dtype=np.float64)[:, :2]).query(xy[:, :2], k=2)
    return float(np.median(d[:, 1]))


def undo_per_cell_scaling(X: np.ndarray | sp.spmatrix, *, tol: float = 1e-3) -> tuple[sp.csr_matrix, np.ndarray, float]:
    """Integer counts from counts scaled per cell (e.g. MERFISH transcripts / cell volume × 1000).

    Each cell's values are integer multiples of one unit (1 transcript / that cell's volume); the
    unit is taken as the cell's smallest non-zero value and ``round(value / unit)`` are its counts.
    Returns (counts, unit per cell, fraction of non-zero values within ``tol`` of an integer multiple)
    — the last number says whether the assumption holds (≈1) or not.
    """
    M = sp.csr_matrix(X, dtype=np.float64)
    M.eliminate_zeros()
    lengths = np.diff(M.indptr)
    unit = np.ones(M.shape[0])
    has = lengths > 0
    unit[has] = np.minimum.reduceat(M.data, M.indptr[:-1][has]) if M.nnz else 1.0
    ratio = M.data / np.repeat(unit, lengths)
    frac = float(np.mean(np.abs(ratio - np.round(ratio)) <= tol)) if ratio.size else 1.0
    C = sp.csr_matrix((np.round(ratio), M.indices.copy(), M.indptr.copy()), shape=M.shape)
    C.eliminate_zeros()
    return C, unit, frac


def pseudo_spots(
    counts: sp.spmatrix | np.ndarray,
    xy: np.ndarray,
    labels: Sequence[str],
    genes: Sequence[str],
    *,
    bin_size: float,
    ignore_labels: Sequence[str] = (),
    classes: Sequence[str] | None = None,
) -> AnnData:
    """Sum cells into square bins of ``bin_size`` (units of ``xy``); truth = class fractions of the bin's cells.

    Every cell's counts go into its bin (as in a real spot); cells whose label is in
    ``ignore_labels`` (e.g. ``Ambiguous``) add counts but are left out of the truth, which is the
    composition of the bin's labelled cells. Bins without a labelled cell are dropped. Returns a
    Visium HD-like spot sample (``array_row``/``array_col``, µm coordinates of bin centres) with
    ``obsm['true_proportions']`` and ``obs['n_cells']``.
    """
    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    labels = np.asarray(labels, dtype=object).astype(str)
    C = sp.csr_matrix(counts)
    if C.shape[0] != xy.shape[0] or labels.size != xy.shape[0]:
        raise ValueError(f"counts ({C.shape[0]}), xy ({xy.shape[0]}) and labels ({labels.size}) differ in length")
    ij = np.floor((xy - xy.min(axis=0)) / float(bin_size)).astype(np.int64)
    key = ij[:, 1] * (ij[:, 0].max() + 1) + ij[:, 0]
    uniq, inv = np.unique(key, return_inverse=True)
    n_bins = uniq.size
    A = sp.csr_matrix((np.ones(inv.size), (inv, np.arange(inv.size))), shape=(n_bins, inv.size))
    Y = sp.csr_matrix(A @ C)
    scored = ~np.isin(labels, list(ignore_labels))
    cls = list(classes) if classes is not None else sorted(set(labels[scored]))
    code = pd.Categorical(labels, categories=cls).codes
    ok = scored & (code >= 0)
    T = sp.csr_matrix((np.ones(ok.sum()), (inv[ok], code[ok])), shape=(n_bins, len(cls))).toarray()
    n_scored = T.sum(axis=1)
    keep = n_scored > 0
    first = np.zeros(n_bins, dtype=np.int64)
    first[inv[::-1]] = np.arange(inv.size)[::-1]
    rows, cols = ij[first, 1], ij[first, 0]
    spots = AnnData(
        X=sp.csr_matrix(Y[keep], dtype=np.float32),
        obs=pd.DataFrame(
            {
                "array_row": rows[keep],
                "array_col": cols[keep],
                "n_cells": np.asarray(A.sum(axis=1)).ravel()[keep].astype(np.int64),
                "n_labelled_cells": n_scored[keep].astype(np.int64),
            },
            index=pd.Index([f"bin_{r}_{c}" for r, c in zip(rows[keep], cols[keep])]),
        ),
        var=pd.DataFrame(index=pd.Index([str(g) for g in genes])),
    )
    spots.obsm["spatial"] = (np.column_stack([cols[keep], rows[keep]]) + 0.5) * float(bin_size) + xy.min(axis=0)
    out = as_spot_sample(spots, kind=VISIUM_HD_BIN, bin_size_um=float(bin_size), source="pseudo-spots")
    out.obsm[TRUTH_KEY] = pd.DataFrame(T[keep] / n_scored[keep, None], index=out.obs_names.copy(), columns=pd.Index(cls))
    return out


def synthetic_bins(
    n_bins: int = 100_000,
    n_genes: int = 500,
    n_types: int = 12,
    *,
    bin_size_um: float = 8.0,
    counts_per_cell: float = 60.0,
    cells_per_bin: float = 1.5,
    n_reference_cells: int = 300,
    seed: int = 0,
) -> tuple[AnnData, AnnData]:
    """A Visium HD-like sample of ``n_bins`` bins on a square lattice and a matching reference.

    Types have log-normal gene profiles with a few markers each; the composition varies smoothly
    over the tissue (a sum of random Gaussian blobs per type); each bin holds Poisson(``cells_per_bin``)
    cells (at least one) whose counts are Poisson draws. Returns (spots, reference); the reference
    has ``n_reference_cells`` cells per type labelled ``obs['cell_type']``; spots carry
    ``obsm['true_proportions']``.
    """
    rng = np.random.default_rng(seed)
    types = [f"type_{k:02d}" for k in range(n_types)]
    base = rng.lognormal(mean=0.0, sigma=1.0, size=(1, n_genes))
    prof = base * rng.lognormal(mean=0.0, sigma=0.6, size=(n_types, n_genes))
    for k in range(n_types):  # markers
        prof[k, rng.choice(n_genes, size=max(3, n_genes // (4 * n_types)), replace=False)] *= 8.0
    prof /= prof.sum(axis=1, keepdims=True)
    size = counts_per_cell * rng.lognormal(0.0, 0.3, size=n_types)  # type-specific cell sizes

    side = int(np.ceil(np.sqrt(n_bins)))
    r, c = np.divmod(np.arange(n_bins), side)
    centers = rng.uniform(0, side, size=(n_types, 3, 2))
    logit = np.zeros((n_bins, n_types))
    for k in range(n_types):
        for cy, cx in centers[k]:
            logit[:, k] += 2.0 * np.exp(-((r - cy) ** 2 + (c - cx) ** 2) / (2 * (side / 6.0) ** 2))
    w = np.exp(logit)
    w /= w.sum(axis=1, keepdims=True)
    n_cells = np.maximum(1, rng.poisson(cells_per_bin, size=n_bins))
    # each cell's type drawn from the bin's composition (inverse CDF: one uniform per cell)
    cdf = np.cumsum(w, axis=1)
    owner = np.repeat(np.arange(n_bins), n_cells)
    kind = np.minimum((rng.random(owner.size)[:, None] > cdf[owner]).sum(axis=1), n_types - 1)
    comp = np.zeros((n_bins, n_types))
    np.add.at(comp, (owner, kind), 1.0)
    parts = []
    for start in range(0, n_bins, 10_000):  # Poisson draws in blocks: the dense rates never exist whole
        lam = (comp[start : start + 10_000] * size[None, :]) @ prof
        parts.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    Y = sp.vstack(parts, format="csr")
    spots = AnnData(
        X=Y,
        obs=pd.DataFrame({"array_row": r, "array_col": c, "n_cells": n_cells}, index=pd.Index([f"s_{i:06d}" for i in range(n_bins)])),
        var=pd.DataFrame(index=pd.Index([f"gene_{g:04d}" for g in range(n_genes)])),
    )
    spots = as_spot_sample(spots, kind=VISIUM_HD_BIN, bin_size_um=bin_size_um, source="synthetic bins")
    spots.obsm[TRUTH_KEY] = pd.DataFrame(comp / comp.sum(axis=1, keepdims=True), index=spots.obs_names.copy(), columns=pd.Index(types))

    labels = np.repeat(types, n_reference_cells)
    cell_size = np.repeat(size, n_reference_cells) * rng.lognormal(0.0, 0.3, size=labels.size)
    ref_lam = cell_size[:, None] * np.repeat(prof, n_reference_cells, axis=0)
    reference = AnnData(
        X=sp.csr_matrix(rng.poisson(ref_lam).astype(np.float32)),
        obs=pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=pd.Index([f"c_{i:06d}" for i in range(labels.size)])),
        var=pd.DataFrame(index=spots.var_names.copy()),
    )
    return spots, reference
