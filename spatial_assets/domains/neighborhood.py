"""The fast offline domain engine: neighbourhood-aggregated expression, PCA, k-means (no weights).

Why this works: a cell's own expression says its *type*; its domain is the *mixture of types around
it*. So every cell is described by its own expression and by the mean expression of its 1..L-hop
spatial neighbourhood (BANKSY / CellCharter idea), the concatenation is reduced by PCA and clustered.

Why fit-then-apply: every fitted quantity (library target, gene means and scales, both PCA loadings,
the k-means centroids of each level) is stored, so a new sample is embedded and assigned to the *same*
domains without refitting the others; the model is npz + json (no pickle).

Why the defaults adapt to the data instead of to one benchmark (each measured on every dataset of
``benchmarks/generality_domains.py``, numbers in docs/domains.md):

- **normalised to the data's own scale** (``target_sum="auto"``): log1p(counts per L), where L is
  either the *median library of the fit data* or 10,000, whichever gives principal components that are
  more autocorrelated in space (variance-weighted Moran's I, :func:`spatial_structure_score`; label-free).
  A panel with libraries of a few hundred keeps one molecule at log1p(~1) under the median instead of
  log1p(~50), where detection noise can dominate the PCs; on very sparse real panels the near-binary
  10,000 wins, and the score tells the two apart (docs/domains.md). Data shipped already library-size
  normalised (spots) is recognised by ``core.normalization.library_scale`` and brought back to its
  molecule scale. L is frozen in the model, so later samples are normalised identically;
- **genes scaled** to unit variance after that normalisation;
- **neighbourhood from the data's own spacing**: cells get a k-NN graph (k=10, a size in cells, not
  in µm); spots/bins on a regular lattice (detected, ``graph.detect_lattice``: nearest-neighbour
  distances all equal) get their lattice ring (6 hexagonal, 4 square) instead of 10 arbitrary tied
  neighbours; 1..3 hops either way;
- **gene selection on whole-transcriptome data** (> ``max_genes`` genes): highly variable genes
  (scanpy, seurat flavour) together with spatially variable genes (Moran's I, ``domains.svg``), 2,000;
- λ=0.8 (BANKSY's published default for domain segmentation) weighs the neighbourhood over the cell;
  one round of majority-vote refinement over the graph (as SpaGCN's ``refine``) after assignment.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from sklearn.cluster import KMeans

from spatial_assets.core.normalization import NormalizationError, library_scale, log_normalized
from spatial_assets.domains.engine import (
    DOMAIN,
    DOMAIN_EMBEDDING_OBSM,
    DOMAINS_UNS,
    MODEL_JSON,
    DomainInputError,
    domain_categorical,
    fit_inputs,
    level_key,
    sample_label,
    validate_sample_key,
    validate_spatial,
)
from spatial_assets.domains.graph import _groups, neighbourhood_graph, spatial_graph_matrices

ENGINE_NAME = "neighborhood"
ARRAYS_NPZ = "arrays.npz"
FORMAT_VERSION = 2
GENE_SELECTIONS = ("variance", "hvg", "svg", "hvg_svg")
#: rows per dense block when accumulating the gene Gram matrix (bounded memory, BLAS speed)
_GRAM_BLOCK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class NeighborhoodParams:
    """Engine configuration; stored in the model so ``assign`` rebuilds exactly the same features."""

    n_neighbors: int = 10  # spatial k-NN per sample, for cells (spots on a lattice: their ring)
    graph_method: str = "knn"  # "knn" (the adaptive graph below); "radius" / "delaunay" for cells
    coord_type: str = "auto"  # "auto": lattice neighbours for spots/bins on a grid, k-NN for cells; "generic": k-NN
    n_hops: int = 3  # neighbourhood = mean over 1..n_hops hops (cells)
    grid_hops: int = 3  # the same on a detected lattice (rings of spots)
    lam: float = 0.8  # weight of the neighbourhood vs the cell itself (BANKSY's lambda)
    n_input_pcs: int = 100  # stage-1 PCA of expression (exact for panels up to 100 genes)
    n_pcs: int = 20  # dimensions of the domain embedding
    max_genes: int = 2000  # above this, select genes (whole-transcriptome data)
    gene_selection: str = "hvg_svg"  # how: "variance", "hvg", "svg", "hvg_svg"
    scale_genes: bool = True  # unit variance per gene after normalisation
    target_sum: float | str = "auto"  # library target: "median" of the fit data, a number, or "auto"
    n_init: int = 10  # k-means restarts
    kmeans_sample: int = 20_000  # k-means fitted on at most this many cells (seeded); all are assigned
    center_samples: bool = True  # subtract each sample's mean expression (simple batch correction)
    smooth_rounds: int = 1  # majority-vote label refinement over the graph after assignment
    max_missing_gene_fraction: float = 0.1  # assign(): missing model genes tolerated (filled with the mean)

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise DomainInputError(f"lam must be in [0, 1], got {self.lam}")
        for name in ("n_hops", "grid_hops", "n_input_pcs", "n_pcs", "max_genes", "n_init", "kmeans_sample"):
            if int(getattr(self, name)) < 1:
                raise DomainInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.smooth_rounds < 0:
            raise DomainInputError(f"smooth_rounds must be >= 0, got {self.smooth_rounds}")
        if self.gene_selection not in GENE_SELECTIONS:
            raise DomainInputError(f"gene_selection must be one of {GENE_SELECTIONS}, got {self.gene_selection!r}")
        if self.coord_type not in ("auto", "generic", "grid"):
            raise DomainInputError(f"coord_type must be 'auto', 'generic' or 'grid', got {self.coord_type!r}")
        if self.target_sum not in ("median", "auto") and not (
            isinstance(self.target_sum, (int, float)) and not isinstance(self.target_sum, bool) and self.target_sum > 0
        ):
            raise DomainInputError(f"target_sum must be 'median', 'auto' or a positive number, got {self.target_sum!r}")


# parameters a format-1 model did not store: what the engine did then
_FORMAT1_DEFAULTS = {"coord_type": "generic", "scale_genes": False, "target_sum": 1e4, "gene_selection": "variance"}


def _log_expression(adata: AnnData, target_sum: float, name: str) -> Any:
    """log1p(counts per ``target_sum``) over all genes of ``adata`` (core.normalization decides how)."""
    try:
        x, _ = log_normalized(adata, target_sum=target_sum, rescale_scaled_log=True)
    except NormalizationError as exc:
        raise DomainInputError(f"{name}: {exc}") from exc
    return x


#: candidate library targets of target_sum="auto" besides the fit data's median
AUTO_FIXED_TARGETS = (1e4,)
#: stage-1 PCs whose spatial autocorrelation scores a candidate normalisation
_AUTO_PCS = 10
#: at most this many (evenly spaced) rows estimate those PCs
_AUTO_GRAM_ROWS = 50_000


#: beyond this many cells in all inputs, target_sum="auto" scores its candidates on tiles spread over
#: each sample, about this many cells in all (the score is a per-neighbourhood statistic; measured in
#: docs/domains.md), and only the winner is normalised in full
_AUTO_SCORE_CELLS = 50_000


def _normalised(adatas: Sequence[AnnData], names: Sequence[str], genes: list[str], target: float) -> list[Any]:
    mats = []
    for a, nm in zip(adatas, names):
        norm = _log_expression(a, target, nm)
        take = a.var_names.get_indexer(genes)
        if take.size != norm.shape[1] or np.any(take != np.arange(take.size)):  # not all genes, in order
            norm = norm[:, take]
        mats.append(_as_matrix(norm))
        del norm
    return mats


#: a window for the ``auto`` score is made of about this many square tiles of the tissue, drawn at random
#: (seeded) so that it covers the whole section, not one region of it
_SCORE_TILES = 10


def spread_tiles(xy: np.ndarray, size: int, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of about ``size`` points: square tiles of ~``size / 10`` points each (a grid over the
    points' extent), drawn in a seeded random order until ``size`` points are covered. Each tile keeps
    its cells' neighbourhoods intact, and the tiles spread over the whole section."""
    n = xy.shape[0]
    if size >= n:
        return np.arange(n)
    per_axis = max(1, int(np.ceil(np.sqrt(_SCORE_TILES * n / max(size, 1)))))
    lo = xy.min(0)
    extent = np.ptp(xy, axis=0)
    extent[extent == 0] = 1.0
    ij = np.minimum(((xy - lo) / extent * per_axis).astype(np.int64), per_axis - 1)
    tile = ij[:, 0] * per_axis + ij[:, 1]
    ids, counts = np.unique(tile, return_counts=True)
    order = np.random.default_rng(seed).permutation(ids.size)
    n_take = int(np.searchsorted(np.cumsum(counts[order]), size) + 1)
    return np.flatnonzero(np.isin(tile, ids[order[:n_take]]))


def _score_windows(
    adatas: Sequence[AnnData],
    coords: Sequence[np.ndarray],
    graphs: Sequence[tuple[sp.csr_matrix, dict[str, Any]]],
    groups: Sequence[list[np.ndarray]],
    limit: int,
) -> tuple[list[AnnData], list[tuple[sp.csr_matrix, dict[str, Any]]], list[list[np.ndarray]]]:
    """Tiles of each sample (:func:`spread_tiles`; ``limit`` cells in all, shared in proportion to sample
    size) with the induced subgraph of its spatial graph: what ``target_sum="auto"`` scores beyond
    ``limit`` cells."""
    n_total = sum(a.n_obs for a in adatas)
    sub_adatas, sub_graphs, sub_groups = [], [], []
    for a, xy, (conn, info), gr in zip(adatas, coords, graphs, groups):
        picked = [g[spread_tiles(xy[g], int(np.ceil(g.size * limit / n_total)))] for g in gr]
        idx = np.sort(np.concatenate(picked)) if picked else np.arange(0)
        sub_adatas.append(a[idx])
        sub_graphs.append((sp.csr_matrix(conn[idx][:, idx]), info))
        sub_groups.append([np.searchsorted(idx, np.sort(g)) for g in picked])
    return sub_adatas, sub_graphs, sub_groups


def spatial_structure_score(
    mats: Sequence[Any],
    graphs: Sequence[tuple[sp.csr_matrix, dict[str, Any]]],
    groups: Sequence[list[np.ndarray]],
    *,
    scale_genes: bool,
    max_genes: int,
    n_pcs: int = _AUTO_PCS,
) -> float:
    """Variance-weighted mean Moran's I of the top ``n_pcs`` principal components (label-free).

    Why: domains are spatially coherent; of two normalisations of the same counts, the one whose main
    axes of variation are more autocorrelated in space carries more of the tissue structure and less
    detection noise. Used by ``target_sum="auto"`` (measured in docs/domains.md).
    """
    from spatial_assets.domains.svg import _row_standardised, morans_i

    mean, var, n = _gene_stats(list(mats))
    keep = np.sort(np.argsort(-var, kind="stable")[:max_genes]) if var.size > max_genes else np.arange(var.size)
    sub = [m[:, keep] for m in mats] if keep.size < var.size else list(mats)
    mean, var = mean[keep], var[keep]
    scale = np.sqrt(var) if scale_genes else np.ones_like(var)
    scale[scale == 0] = 1.0
    # the axes only need to be approximately right to score a normalisation: rows evenly subsampled
    step = max(1, -(-n // _AUTO_GRAM_ROWS))
    rows = [m[::step] for m in sub]
    n_rows = sum(r.shape[0] for r in rows)
    r_mean, _, _ = _gene_stats(rows)
    cov = (gram_matrix(rows) / n_rows - np.outer(r_mean, r_mean)) / np.outer(scale, scale)
    load = _pca_from_cov(cov, int(min(n_pcs, keep.size)))
    w = load / scale[:, None]
    num = den = 0.0
    for m, (conn, _), gr in zip(sub, graphs, groups):
        pcs = np.asarray(m @ w, dtype=np.float64)
        i_stat, _ = morans_i(pcs, _row_standardised(conn), gr)
        v = pcs.var(0) * m.shape[0]
        num += float((i_stat * v).sum())
        den += float(v.sum())
    return num / den if den > 0 else 0.0


def _library_target(
    adatas: Sequence[AnnData],
    names: Sequence[str],
    genes: list[str],
    params: NeighborhoodParams,
    graphs: Sequence[tuple[sp.csr_matrix, dict[str, Any]]],
    groups: Sequence[list[np.ndarray]],
    coords: Sequence[np.ndarray] | None = None,
) -> tuple[float, dict[str, Any], list[Any]]:
    """(library size every cell is normalised to, how it was chosen, the normalised matrices).

    A fixed number; ``"median"``: the fit data's median library (``core.normalization.library_scale``,
    which also recovers molecule units of data shipped normalised); ``"auto"``: the median or 10,000,
    whichever gives the more spatially structured principal components (:func:`spatial_structure_score`).
    """
    if params.target_sum not in ("median", "auto"):
        target = float(params.target_sum)
        return target, {"source": "fixed", "target": target}, _normalised(adatas, names, genes, target)
    # keyed by input position, not name: names are paths / URIs, and "/" cannot be an h5ad uns key
    sizes, per_input = [], {}
    for a, nm in zip(adatas, names):
        try:
            scale = library_scale(a)
        except NormalizationError as exc:
            raise DomainInputError(f"{nm}: {exc}") from exc
        sizes.append(scale.sizes)
        per_input[str(len(per_input))] = {"input": nm, **scale.record()}
    allsizes = np.concatenate(sizes)
    pos = allsizes[allsizes > 0]
    median = float(np.median(pos)) if pos.size else 1.0
    info: dict[str, Any] = {"source": str(params.target_sum), "median_library": median, "per_input": per_input}
    if params.target_sum == "median":
        info["target"] = median
        return median, info, _normalised(adatas, names, genes, median)
    n_total = int(allsizes.size)
    windowed = coords is not None and n_total > _AUTO_SCORE_CELLS
    s_adatas, s_graphs, s_groups = (
        _score_windows(adatas, coords, graphs, groups, _AUTO_SCORE_CELLS) if windowed else (adatas, graphs, groups)  # type: ignore[arg-type]
    )
    best: tuple[float, float, list[Any] | None] | None = None
    scores = {}
    for target in (median, *AUTO_FIXED_TARGETS):
        mats = _normalised(s_adatas, names, genes, target)
        score = spatial_structure_score(mats, s_graphs, s_groups, scale_genes=params.scale_genes, max_genes=params.max_genes)
        scores[f"{target:.6g}"] = score
        if best is None or score > best[0]:
            best = (score, target, None if windowed else mats)
        del mats
    assert best is not None
    info.update({"target": best[1], "structure_scores": scores})
    info["scored_cells"] = int(sum(a.n_obs for a in s_adatas))
    mats = best[2] if best[2] is not None else _normalised(adatas, names, genes, best[1])
    return best[1], info, mats


def _as_matrix(x: Any) -> sp.csr_matrix | np.ndarray:
    if sp.issparse(x):
        return sp.csr_matrix(x)
    return np.asarray(x)


def _check_matrix(x: Any, name: str) -> None:
    data = x.data if sp.issparse(x) else np.asarray(x)
    if data.size and not np.isfinite(data).all():
        raise DomainInputError(f"{name}: expression matrix X contains NaN or inf")


def _gene_stats(mats: list[Any]) -> tuple[np.ndarray, np.ndarray, int]:
    """Pooled mean and variance per gene without densifying."""
    n = sum(m.shape[0] for m in mats)
    s = sum(np.asarray(m.sum(0), dtype=np.float64).ravel() for m in mats)
    sq = sum(np.asarray((m.multiply(m) if sp.issparse(m) else m * m).sum(0), dtype=np.float64).ravel() for m in mats)
    mean = s / n
    var = np.maximum(sq / n - mean * mean, 0.0)
    return mean, var, n


def gram_matrix(mats: Sequence[Any]) -> np.ndarray:
    """Σ mᵀm over the matrices, float64, from dense row blocks.

    Why dense blocks: a sparse ``m.T @ m`` of an expression matrix (a few hundred genes, most cells
    expressing many of them) produces a dense result through sparse bookkeeping; measured 13 s of a
    46 s run at 300k cells. Densifying a block of rows and using BLAS gives the same matrix much faster
    (ratio printed by benchmarks/bench_domains_scale.py), with memory bounded by the block size.
    """
    g = mats[0].shape[1]
    gram = np.zeros((g, g))
    rows = max(1, _GRAM_BLOCK_ELEMENTS // max(g, 1))
    for m in mats:
        for start in range(0, m.shape[0], rows):
            block = m[start : start + rows]
            block = block.toarray() if sp.issparse(block) else np.asarray(block)
            block = np.asarray(block, dtype=np.float64)
            gram += block.T @ block
    return gram


def _pca_from_cov(cov: np.ndarray, d: int) -> np.ndarray:
    """Top-``d`` eigenvectors with a fixed sign (largest-|loading| positive) for determinism."""
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    v = v[:, ::-1][:, :d]
    sign = np.sign(v[np.abs(v).argmax(0), np.arange(v.shape[1])])
    sign[sign == 0] = 1
    return v * sign


def _smoothing_operator(conn: sp.csr_matrix) -> sp.csr_matrix:
    """Row-stochastic neighbour mean; an isolated cell is its own neighbourhood."""
    deg = np.asarray(conn.sum(1)).ravel()
    lonely = deg == 0
    a = conn + sp.diags(lonely.astype(np.float64))
    deg = np.where(lonely, 1.0, deg)
    return sp.csr_matrix(sp.diags(1.0 / deg) @ a)


def _select_genes(
    mats: list[Any],
    var: np.ndarray,
    graphs: list[tuple[sp.csr_matrix, list[np.ndarray]]],
    batches: list[np.ndarray],
    params: NeighborhoodParams,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Indices (sorted) of the genes kept on whole-transcriptome input, and how they were chosen."""
    n_keep = params.max_genes
    how = params.gene_selection
    by_variance = np.argsort(-var, kind="stable")
    if how == "variance":
        return np.sort(by_variance[:n_keep]), {"method": how}
    ranks: list[np.ndarray] = []
    if how in ("hvg", "hvg_svg"):
        ranks.append(_hvg_order(mats, batches))
    if how in ("svg", "hvg_svg"):
        ranks.append(_svg_order(mats, graphs))
    if len(ranks) == 1:
        return np.sort(ranks[0][:n_keep]), {"method": how}
    # union of the two top lists, grown in step until it holds n_keep genes
    chosen: list[int] = []
    seen: set[int] = set()
    for i in range(len(ranks[0])):
        for order in ranks:
            g = int(order[i])
            if g not in seen:
                seen.add(g)
                chosen.append(g)
        if len(chosen) >= n_keep:
            break
    return np.sort(np.asarray(chosen[:n_keep])), {"method": how}


def _hvg_order(mats: list[Any], batches: list[np.ndarray]) -> np.ndarray:
    """Genes by scanpy's highly-variable rank (seurat flavour, on the log data; batch-aware)."""
    import scanpy as sc

    x = sp.vstack([sp.csr_matrix(m) for m in mats]).tocsr() if any(sp.issparse(m) for m in mats) else np.vstack(mats)
    tmp = AnnData(X=x, var=pd.DataFrame(index=[f"g{i}" for i in range(x.shape[1])]))
    batch = np.concatenate(batches)
    key = None
    if len(np.unique(batch)) > 1:
        tmp.obs["batch"] = pd.Categorical(batch.astype(str))
        key = "batch"
    hv = sc.pp.highly_variable_genes(tmp, flavor="seurat", n_top_genes=x.shape[1], batch_key=key, inplace=False)
    disp = hv["dispersions_norm"].to_numpy(dtype=np.float64)
    disp = np.where(np.isfinite(disp), disp, -np.inf)
    if key is not None and "highly_variable_nbatches" in hv:
        nb = hv["highly_variable_nbatches"].to_numpy(dtype=np.float64)
        return np.lexsort((np.arange(disp.size), -disp, -nb))
    return np.lexsort((np.arange(disp.size), -disp))


def _svg_order(mats: list[Any], graphs: list[tuple[sp.csr_matrix, list[np.ndarray]]]) -> np.ndarray:
    """Genes by Moran's I on each input's own graph (centred per sample), averaged over inputs."""
    from spatial_assets.domains.svg import _row_standardised, morans_i

    total = np.zeros(mats[0].shape[1])
    weight = 0
    for m, (conn, groups) in zip(mats, graphs):
        i_stat, _ = morans_i(m, _row_standardised(conn), groups)
        total += i_stat * m.shape[0]
        weight += m.shape[0]
    score = total / max(weight, 1)
    return np.lexsort((np.arange(score.size), -score))


class NeighborhoodDomainModel:
    """Fitted library target, gene means/scales, two PCA projections and per-level centroids."""

    engine = ENGINE_NAME

    def __init__(
        self,
        *,
        params: NeighborhoodParams,
        genes: list[str],
        levels: list[int],
        n_domains: int,
        gene_mean: np.ndarray,
        gene_scale: np.ndarray,
        loadings1: np.ndarray,
        mean2: np.ndarray,
        loadings2: np.ndarray,
        centroids: dict[int, np.ndarray],
        seed: int,
        fit_stats: dict[str, Any] | None = None,
        block_scale: Sequence[float] | None = None,
        library_target: float | None = None,
    ) -> None:
        self.params = params
        self.genes = list(genes)
        self.levels = [int(k) for k in levels]
        self.n_domains = int(n_domains)
        self.gene_mean = gene_mean
        self.gene_scale = gene_scale
        self.loadings1 = loadings1
        self.mean2 = mean2
        self.loadings2 = loadings2
        self.block_scale = (1.0, 1.0) if block_scale is None else (float(block_scale[0]), float(block_scale[1]))
        self.centroids = {int(k): np.asarray(v, dtype=np.float64) for k, v in centroids.items()}
        self.seed = int(seed)
        self.fit_stats = dict(fit_stats or {})
        if library_target is None:
            library_target = float(params.target_sum) if params.target_sum not in ("median", "auto") else 1e4
        self.library_target = float(library_target)

    # ------------------------------------------------------------------ features
    def _expression(self, adata: AnnData, name: str) -> tuple[Any, int]:
        """Normalised expression restricted to (and ordered as) the model genes."""
        if not adata.var_names.is_unique:
            dup = adata.var_names[adata.var_names.duplicated()][:5].tolist()
            raise DomainInputError(f"{name}: duplicated gene names in var_names, e.g. {dup}")
        present = pd.Index(self.genes).isin(adata.var_names)
        missing = [g for g, ok in zip(self.genes, present) if not ok]
        if len(missing) > self.params.max_missing_gene_fraction * len(self.genes):
            raise DomainInputError(
                f"{name}: {len(missing)} of the model's {len(self.genes)} genes are missing "
                f"(e.g. {missing[:10]}); the model was fitted on a different panel"
            )
        _check_matrix(adata.X, name)
        norm = _log_expression(adata, self.library_target, name)
        take = adata.var_names.get_indexer([g for g in self.genes if g not in set(missing)])
        x = _as_matrix(norm[:, take])
        if missing:  # a missing gene is set to the model mean: it then contributes nothing
            full = np.zeros((adata.n_obs, len(self.genes)))
            cols = np.flatnonzero(present)
            block = x.toarray() if sp.issparse(x) else x
            full[:, cols] = block
            full[:, ~present] = self.gene_mean[~present]
            x = full
        return x, len(missing)

    def _stage1(self, x: Any) -> np.ndarray:
        """(x - mean) / scale @ loadings1, without densifying a sparse x."""
        w = self.loadings1 / self.gene_scale[:, None]
        return np.asarray(x @ w, dtype=np.float64) - (self.gene_mean / self.gene_scale) @ self.loadings1

    def _graph(self, xy: np.ndarray, groups: list[np.ndarray]) -> tuple[sp.csr_matrix, dict[str, Any]]:
        p = self.params
        if p.graph_method != "knn":
            conn, _, info = spatial_graph_matrices(xy, groups, method=p.graph_method, n_neighbors=p.n_neighbors)  # type: ignore[arg-type]
            return conn, {"graph_per_group": [p.graph_method] * len(groups)}
        return neighbourhood_graph(xy, groups, n_neighbors=p.n_neighbors, coord_type=p.coord_type)

    def _neighbourhood(
        self,
        p: np.ndarray,
        xy: np.ndarray,
        groups: list[np.ndarray],
        graph: tuple[sp.csr_matrix, dict[str, Any]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix, dict[str, Any]]:
        """(cell block, neighbourhood block, graph, graph info): the expensive part, computed once."""
        if self.params.center_samples:  # per-sample location correction (additive batch effect in log space)
            p = p.copy()
            for g in groups:
                p[g] -= p[g].mean(0)
        conn, info = self._graph(xy, groups) if graph is None else graph
        a = _smoothing_operator(conn)
        lattice = [k.endswith("_lattice") for k in info["graph_per_group"]]
        hops = np.full(xy.shape[0], self.params.n_hops)
        for g, is_grid in zip(groups, lattice):
            if is_grid:
                hops[g] = self.params.grid_hops
        h, acc = p, np.zeros_like(p)
        for hop in range(1, int(hops.max()) + 1):
            h = a @ h
            active = hops >= hop
            if active.all():  # the usual case: no boolean-mask copies of an n x d block
                acc += h
            else:
                acc[active] += h[active]
        acc /= hops[:, None]
        s = acc
        return p, s, conn, info

    def _features(self, p: np.ndarray, s: np.ndarray) -> np.ndarray:
        lam = self.params.lam
        own_sd, nbr_sd = self.block_scale
        return np.hstack([np.sqrt(1.0 - lam) * p / own_sd, np.sqrt(lam) * s / nbr_sd])

    def _project(self, p: np.ndarray, s: np.ndarray) -> np.ndarray:
        return (self._features(p, s) - self.mean2) @ self.loadings2

    def embed(self, adata: AnnData, *, sample_key: str | None = None, name: str = "input") -> tuple[np.ndarray, sp.csr_matrix, int]:
        """(domain embedding, spatial connectivities, n missing genes) of one AnnData."""
        xy = validate_spatial(adata, name)
        validate_sample_key(adata, sample_key, name)
        x, n_missing = self._expression(adata, name)
        p, s, conn, _ = self._neighbourhood(self._stage1(x), xy, _groups(adata, sample_key))
        return self._project(p, s), conn, n_missing

    # ------------------------------------------------------------------ assignment
    def _nearest(self, e: np.ndarray, k: int) -> np.ndarray:
        c = self.centroids[k]
        d = (e * e).sum(1)[:, None] - 2 * e @ c.T + (c * c).sum(1)[None, :]
        return d.argmin(1)

    def _smooth(self, labels: np.ndarray, conn: sp.csr_matrix, k: int) -> np.ndarray:
        """Majority vote over each cell and its graph neighbours; the cell's own label breaks ties."""
        n = labels.size
        for _ in range(self.params.smooth_rounds):
            onehot = sp.csr_matrix((np.ones(n), (np.arange(n), labels)), shape=(n, k))
            votes = np.asarray((conn @ onehot).todense()) + 1.5 * onehot.toarray()
            labels = votes.argmax(1)
        return labels

    def _output(self, adata: AnnData, e: np.ndarray, conn: sp.csr_matrix, n_missing: int, sample_key: str | None) -> AnnData:
        out = adata.copy()
        for k in self.levels:
            lab = self._smooth(self._nearest(e, k), conn, k)
            out.obs[level_key(k)] = domain_categorical(k, lab)
        out.obs[DOMAIN] = out.obs[level_key(self.n_domains)].copy()
        out.obsm[DOMAIN_EMBEDDING_OBSM] = e.astype(np.float32)
        meta = self.metadata()
        meta["n_missing_genes"] = int(n_missing)
        meta["sample_key"] = sample_key if sample_key is not None else ""
        out.uns[DOMAINS_UNS] = _jsonable(meta)
        return out

    def assign(self, adata: AnnData, *, sample_key: str | None = None) -> AnnData:
        """New AnnData with ``domain_level_{k}``, ``domain``, ``obsm['X_domain_embedding']``, ``uns['domains']``."""
        name = sample_label(adata, 0)
        e, conn, n_missing = self.embed(adata, sample_key=sample_key, name=name)
        return self._output(adata, e, conn, n_missing, sample_key)

    # ------------------------------------------------------------------ persistence
    def metadata(self) -> dict[str, Any]:
        return {
            "engine": ENGINE_NAME,
            "format_version": FORMAT_VERSION,
            "levels": list(self.levels),
            "n_domains": self.n_domains,
            "seed": self.seed,
            "n_genes": len(self.genes),
            "library_target": self.library_target,
            "params": asdict(self.params),
            "fit_stats": dict(self.fit_stats),
        }

    def save(self, directory: str | Path) -> None:
        """npz (arrays) + json (everything else), written to a temp dir then renamed into place."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-domain-model-", dir=directory.parent))
        try:
            arrays = {
                "gene_mean": self.gene_mean,
                "gene_scale": self.gene_scale,
                "loadings1": self.loadings1,
                "mean2": self.mean2,
                "loadings2": self.loadings2,
                "block_scale": np.asarray(self.block_scale, dtype=np.float64),
            }
            arrays.update({f"centroids_{k}": v for k, v in self.centroids.items()})
            np.savez(tmp / ARRAYS_NPZ, **arrays)
            meta = self.metadata()
            meta["genes"] = self.genes
            (tmp / MODEL_JSON).write_text(json.dumps(_jsonable(meta), indent=1))
            if directory.exists():
                old = directory.with_name(directory.name + ".old-" + tmp.name[-8:])
                os.replace(directory, old)
                os.replace(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: str | Path) -> "NeighborhoodDomainModel":
        directory = Path(directory)
        try:
            meta = json.loads((directory / MODEL_JSON).read_text())
        except FileNotFoundError as exc:
            raise DomainInputError(f"{directory}: {MODEL_JSON} missing, not a saved domain model") from exc
        if meta.get("engine") != ENGINE_NAME:
            raise DomainInputError(f"{directory}: model of engine {meta.get('engine')!r}, not {ENGINE_NAME!r}")
        version = meta.get("format_version")
        if version not in (1, FORMAT_VERSION):
            raise DomainInputError(f"{directory}: unsupported format_version {version!r}")
        known = {f.name for f in fields(NeighborhoodParams)}
        stored = {k: v for k, v in meta["params"].items() if k in known}
        if version == 1:  # what the engine did before these parameters existed
            stored = {**_FORMAT1_DEFAULTS, **stored}
        params = NeighborhoodParams(**stored)
        with np.load(directory / ARRAYS_NPZ, allow_pickle=False) as z:
            arr = {k: z[k] for k in z.files}
        levels = [int(k) for k in meta["levels"]]
        genes = list(meta["genes"])
        g, d1 = arr["loadings1"].shape
        if g != len(genes) or arr["gene_mean"].shape != (g,) or arr["loadings2"].shape[0] != 2 * d1:
            raise DomainInputError(f"{directory}: arrays do not match the gene list / each other")
        centroids = {}
        for k in levels:
            c = arr.get(f"centroids_{k}")
            if c is None or c.shape != (k, arr["loadings2"].shape[1]):
                raise DomainInputError(f"{directory}: centroids for level {k} missing or malformed")
            centroids[k] = c
        return cls(
            params=params,
            genes=genes,
            levels=levels,
            n_domains=int(meta["n_domains"]),
            gene_mean=arr["gene_mean"],
            gene_scale=arr["gene_scale"],
            loadings1=arr["loadings1"],
            mean2=arr["mean2"],
            loadings2=arr["loadings2"],
            centroids=centroids,
            seed=int(meta["seed"]),
            fit_stats=meta.get("fit_stats", {}),
            block_scale=arr["block_scale"].tolist() if "block_scale" in arr else None,
            library_target=meta.get("library_target"),
        )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


class NeighborhoodDomainEngine:
    """Fits one :class:`NeighborhoodDomainModel` on all samples pooled (shared embedding)."""

    name = ENGINE_NAME
    model_class = NeighborhoodDomainModel

    def __init__(self, **config: Any) -> None:
        known = {f.name for f in fields(NeighborhoodParams)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise DomainInputError(f"unknown neighborhood engine option(s) {unknown}; known: {sorted(known)}")
        self.params = NeighborhoodParams(**config)

    def fit(
        self,
        adatas: Sequence[AnnData],
        *,
        levels: Sequence[int],
        n_domains: int,
        seed: int = 0,
        sample_key: str | None = None,
    ) -> NeighborhoodDomainModel:
        return self._fit(adatas, levels=levels, n_domains=n_domains, seed=seed, sample_key=sample_key)[0]

    def fit_assign(
        self,
        adatas: Sequence[AnnData],
        *,
        levels: Sequence[int],
        n_domains: int,
        seed: int = 0,
        sample_key: str | None = None,
    ) -> tuple[NeighborhoodDomainModel, list[AnnData]]:
        """``fit`` then ``assign`` of every input, computing normalisation, graphs and neighbourhood
        features once (``assign`` would recompute them); outputs equal ``model.assign(a)``."""
        adatas = fit_inputs(adatas, levels, n_domains)[0]
        model, cached = self._fit(adatas, levels=levels, n_domains=n_domains, seed=seed, sample_key=sample_key)
        return model, [model._output(a, e, conn, 0, sample_key) for a, (e, conn) in zip(adatas, cached)]

    def _fit(
        self,
        adatas: Sequence[AnnData],
        *,
        levels: Sequence[int],
        n_domains: int,
        seed: int,
        sample_key: str | None,
    ) -> tuple[NeighborhoodDomainModel, list[tuple[np.ndarray, sp.csr_matrix]]]:
        adatas, lv, names = fit_inputs(adatas, levels, n_domains)
        p = self.params
        coords = []
        for a, nm in zip(adatas, names):
            coords.append(validate_spatial(a, nm))
            validate_sample_key(a, sample_key, nm)
            if not a.var_names.is_unique:
                dup = a.var_names[a.var_names.duplicated()][:5].tolist()
                raise DomainInputError(f"{nm}: duplicated gene names in var_names, e.g. {dup}")
            _check_matrix(a.X, nm)
        n_total = sum(a.n_obs for a in adatas)
        if n_total < max(lv):
            raise DomainInputError(f"{n_total} cells in all inputs is fewer than the {max(lv)} domains asked for")
        # genes: those every input has, in the first input's order
        common = set(adatas[0].var_names)
        for a in adatas[1:]:
            common &= set(a.var_names)
        genes = [g for g in adatas[0].var_names if g in common]
        if not genes:
            raise DomainInputError(f"the inputs share no gene names ({', '.join(names)})")
        groups = [_groups(a, sample_key) for a in adatas]
        model = NeighborhoodDomainModel(
            params=p,
            genes=genes,
            levels=lv,
            n_domains=int(n_domains),
            gene_mean=np.zeros(len(genes)),
            gene_scale=np.ones(len(genes)),
            loadings1=np.eye(len(genes), 1),
            mean2=np.zeros(2),
            loadings2=np.eye(2),
            centroids={},
            seed=seed,
        )
        graphs = [model._graph(xy, g) for xy, g in zip(coords, groups)]
        target, target_info, mats = _library_target(adatas, names, genes, p, graphs, groups, coords)
        model.library_target = target
        mean, var, n = _gene_stats(mats)
        selection: dict[str, Any] = {"method": "all genes"}
        if len(genes) > p.max_genes:  # whole-transcriptome input: keep highly / spatially variable genes
            batches = []
            for i, (a, gr) in enumerate(zip(adatas, groups)):
                b = np.empty(a.n_obs, dtype=object)
                for j, g in enumerate(gr):
                    b[g] = f"{i}:{j}"
                batches.append(b)
            keep, selection = _select_genes(mats, var, [(c, g) for (c, _), g in zip(graphs, groups)], batches, p)
            genes = [genes[i] for i in keep]
            mats = [m[:, keep] for m in mats]
            mean, var = mean[keep], var[keep]
        scale = np.sqrt(var) if p.scale_genes else np.ones_like(var)
        scale[scale == 0] = 1.0
        # stage 1: exact PCA of the pooled, centred (and scaled) expression from the gene covariance
        cov = (gram_matrix(mats) / n - np.outer(mean, mean)) / np.outer(scale, scale)
        d1 = int(min(p.n_input_pcs, len(genes), max(n - 1, 1)))
        model.genes, model.gene_mean, model.gene_scale = genes, mean, scale
        model.loadings1 = _pca_from_cov(cov, d1)
        # stage 2: neighbourhood features per sample (own graph each), PCA on all samples pooled
        blocks = []
        for m, xy, g, graph in zip(mats, coords, groups, graphs):
            own, nbr, conn, _ = model._neighbourhood(model._stage1(m), xy, g, graph)
            blocks.append((own, nbr, conn))
        del mats
        # put cell and neighbourhood blocks on equal total variance first, so that lam is the share of
        # variance given to the neighbourhood (the cell block otherwise dominates: averaging shrinks variance)
        # (pooled over the samples block by block: no stacked copy of all cells' features)
        block_sd = []
        for j, w in ((0, 1.0 - p.lam), (1, p.lam)):
            mu = sum(b[j].sum(0) for b in blocks) / n
            tot = float(np.sqrt(sum(float(((b[j] - mu) ** 2).sum()) for b in blocks) / n / w)) if w > 0 else 0.0
            block_sd.append(tot if tot > 0 else 1.0)
        model.block_scale = (block_sd[0], block_sd[1])
        feats = []
        for i, (own, nbr, conn) in enumerate(blocks):
            feats.append(model._features(own, nbr))
            blocks[i] = (None, None, conn)  # type: ignore[assignment]  # free the blocks as we go
        mean2 = sum(f.sum(0) for f in feats) / n
        cov2 = np.zeros((feats[0].shape[1], feats[0].shape[1]))
        for f in feats:
            f -= mean2
            cov2 += f.T @ f
        d2 = int(min(p.n_pcs, cov2.shape[0], max(n - 1, 1)))
        model.mean2 = mean2
        model.loadings2 = _pca_from_cov(cov2 / n, d2)
        embs = [f @ model.loadings2 for f in feats]  # = model._project(own, nbr): the features are centred
        del feats
        cached = [(e, conn) for e, (_, _, conn) in zip(embs, blocks)]
        del blocks
        emb = np.vstack(embs)
        # clustering: one k-means per level; ids ordered by size (largest = D0) so they are deterministic
        stats: dict[str, Any] = {
            "n_cells": int(n),
            "n_inputs": len(adatas),
            "n_genes": len(genes),
            "library_target": target_info,
            "gene_selection": selection,
            "graph": {str(i): {"input": nm, **info} for i, (nm, (_, info)) in enumerate(zip(names, graphs))},
            "inertia": {},
        }
        # k-means on a seeded subsample beyond kmeans_sample cells: centroids of a few domains in 20
        # dimensions are pinned down by tens of thousands of cells, and every cell is then assigned to its
        # nearest centroid anyway (measured at 100k-300k cells: benchmarks/bench_domains_scale.py)
        rng = np.random.default_rng(seed)
        train = np.sort(rng.choice(n, p.kmeans_sample, replace=False)) if n > p.kmeans_sample else np.arange(n)
        stats["kmeans_cells"] = int(train.size)
        labels_by_level: dict[int, np.ndarray] = {}
        for k in lv:
            km = KMeans(n_clusters=k, n_init=p.n_init, random_state=seed).fit(emb[train])
            model.centroids[k] = km.cluster_centers_
            lab = model._nearest(emb, k)
            sizes = np.bincount(lab, minlength=k)
            order = np.lexsort((np.arange(k), -sizes))
            model.centroids[k] = km.cluster_centers_[order]
            remap = np.empty(k, dtype=np.int64)
            remap[order] = np.arange(k)
            labels_by_level[k] = remap[lab]
            stats["inertia"][str(k)] = float(km.inertia_)
        # hierarchy: which coarser domain each finer domain mostly falls into (for display / lineage)
        parents: dict[str, dict[str, int]] = {}
        for fine, coarse in zip(lv[1:], lv[:-1]):
            tab = pd.crosstab(labels_by_level[fine], labels_by_level[coarse])
            parents[f"{fine}->{coarse}"] = {str(i): int(tab.loc[i].idxmax()) for i in tab.index}
        stats["parents"] = parents
        model.fit_stats = stats
        return model, cached


__all__ = [
    "ENGINE_NAME",
    "GENE_SELECTIONS",
    "NeighborhoodDomainEngine",
    "NeighborhoodDomainModel",
    "NeighborhoodParams",
    "gram_matrix",
]
