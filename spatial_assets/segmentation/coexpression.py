"""ComSeg's gene co-expression step, vectorised (same numbers, minutes → milliseconds).

``comseg.dataset.ComSegDataset.get_dict_proba_edge_in_situ`` (comseg 1.8.5) computes the
correlation of every pair of genes' neighbourhood expression with one ``scipy.stats.pearsonr``
call per pair in a Python double loop: n_genes²/2 calls on a ~10k-row matrix. On the CosMx FOV
(979 genes: 480k pairs) that loop alone is what took ComSeg 33 min before it failed
(docs/segmentation.md; cProfile: 35k ``pearsonr`` calls in 455 s). The same matrix is one
``numpy.corrcoef``. :func:`fast_coexpression` swaps the method in for the duration of a ComSeg run
and restores it afterwards; :func:`coexpression_dict` returns exactly the structure ComSeg expects
(``dict[gene_source][gene_target] = correlation``, NaN — a gene constant over the sample — as -1,
as in ComSeg).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np


def coexpression_matrix(count_matrix: np.ndarray, distance: str = "pearson") -> np.ndarray:
    """Gene × gene correlation of the columns of ``count_matrix`` (NaN → -1, as ComSeg does)."""
    if distance not in ("pearson", "spearman"):
        raise ValueError(f"distance must be 'pearson' or 'spearman', got {distance!r}")
    x = np.asarray(count_matrix, dtype=np.float64)
    if distance == "spearman":
        from scipy.stats import rankdata

        x = rankdata(x, axis=0)
    x = x - x.mean(0)
    norm = np.sqrt((x * x).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = (x.T @ x) / np.outer(norm, norm)
    corr = np.clip(corr, -1.0, 1.0)
    corr[~np.isfinite(corr)] = -1.0
    return corr


def coexpression_dict(genes: Sequence[str], count_matrix: np.ndarray, distance: str = "pearson") -> dict:
    """``dict[gene_source][gene_target] = correlation``, ComSeg's ``dict_co_expression``."""
    corr = coexpression_matrix(count_matrix, distance)
    genes = list(genes)
    return {g: dict(zip(genes, corr[i].tolist())) for i, g in enumerate(genes)}


@contextlib.contextmanager
def fast_coexpression() -> Iterator[None]:
    """Within the block, ComSeg computes its co-expression matrix with :func:`coexpression_dict`."""
    from comseg.dataset import ComSegDataset

    original = ComSegDataset.get_dict_proba_edge_in_situ

    def get_dict_proba_edge_in_situ(self, count_matrix, distance="pearson"):
        return coexpression_dict(self.selected_genes, count_matrix, distance)

    ComSegDataset.get_dict_proba_edge_in_situ = get_dict_proba_edge_in_situ
    try:
        yield
    finally:
        ComSegDataset.get_dict_proba_edge_in_situ = original


__all__ = ["coexpression_dict", "coexpression_matrix", "fast_coexpression"]
