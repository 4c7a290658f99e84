"""The fast offline domain engine: neighbourhood-aggregated expression, PCA, k-means (no weights).

Why this works: a cell's own expression says its *type*; its domain is the *mixture of types around
it*. So every cell is described by its own expression and by the mean expression of its 1..L-hop
spatial neighbourhood (BANKSY / CellCharter idea), the concatenation is reduced by PCA and clustered.

Why fit-then-apply: every fitted quantity (gene means, both PCA loadings, the k-means centroids of
each level) is stored, so a new sample is embedded and assigned to the *same* domains without
refitting the others; the model is npz + json (no pickle).

Why these defaults are scale-free (no micrometres anywhere):
- the graph is a k-NN graph per sample (k=10): it adapts to cell density and coordinate units, and
  works the same for cells and for spots/bins;
- the neighbourhood is the mean over 1..3 hops, i.e. ~k·(1..3)² cells: a size in *cells*, not in µm;
- genes are only centred, not scaled: domain signal lives in the well-expressed marker genes and
  unit-variance scaling lets noisy, barely detected genes weigh as much (measured: worse on STARmap
  and no better on the synthetic tissue, see docs/domains.md);
- λ=0.8 (BANKSY's published default for domain segmentation) weighs the neighbourhood over the cell.
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

from spatial_assets.core.normalization import NormalizationError, log_normalized
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
from spatial_assets.domains.graph import _groups, spatial_graph_matrices

ENGINE_NAME = "neighborhood"
ARRAYS_NPZ = "arrays.npz"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class NeighborhoodParams:
    """Engine configuration; stored in the model so ``assign`` rebuilds exactly the same features."""

    n_neighbors: int = 10  # spatial k-NN per sample (coord_type='grid': 4, 6 or 8)
    graph_method: str = "knn"
    coord_type: str = "generic"
    n_hops: int = 3  # neighbourhood = mean over 1..n_hops hops
    lam: float = 0.8  # weight of the neighbourhood vs the cell itself (BANKSY's lambda)
    n_input_pcs: int = 100  # stage-1 PCA of expression (exact for panels up to 100 genes)
    n_pcs: int = 20  # dimensions of the domain embedding
    max_genes: int = 2000  # above this, keep the most variable genes (whole-transcriptome data)
    scale_genes: bool = False
    target_sum: float = 1e4
    n_init: int = 10  # k-means restarts
    center_samples: bool = True  # subtract each sample's mean expression (simple batch correction)
    smooth_rounds: int = 1  # majority-vote label smoothing over the graph after assignment
    max_missing_gene_fraction: float = 0.1  # assign(): missing model genes tolerated (filled with the mean)

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise DomainInputError(f"lam must be in [0, 1], got {self.lam}")
        for name in ("n_hops", "n_input_pcs", "n_pcs", "max_genes", "n_init"):
            if int(getattr(self, name)) < 1:
                raise DomainInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.smooth_rounds < 0:
            raise DomainInputError(f"smooth_rounds must be >= 0, got {self.smooth_rounds}")


def _log_expression(adata: AnnData, target_sum: float, name: str) -> Any:
    """log1p(counts per ``target_sum``) over all genes of ``adata`` (core.normalization decides how)."""
    try:
        x, _ = log_normalized(adata, target_sum=target_sum)
    except NormalizationError as exc:
        raise DomainInputError(f"{name}: {exc}") from exc
    return x


def _as_csr(x: Any) -> sp.csr_matrix | np.ndarray:
    if sp.issparse(x):
        return sp.csr_matrix(x, dtype=np.float64)
    return np.asarray(x, dtype=np.float64)


def _check_matrix(x: Any, name: str) -> None:
    data = x.data if sp.issparse(x) else np.asarray(x)
    if data.size and not np.isfinite(data).all():
        raise DomainInputError(f"{name}: expression matrix X contains NaN or inf")


def _gene_stats(mats: list[Any]) -> tuple[np.ndarray, np.ndarray, int]:
    """Pooled mean and variance per gene without densifying."""
    n = sum(m.shape[0] for m in mats)
    s = sum(np.asarray(m.sum(0)).ravel() for m in mats)
    sq = sum(np.asarray((m.multiply(m) if sp.issparse(m) else m * m).sum(0)).ravel() for m in mats)
    mean = s / n
    var = np.maximum(sq / n - mean * mean, 0.0)
    return mean, var, n


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


class NeighborhoodDomainModel:
    """Fitted gene means, two PCA projections and per-level centroids; see the module docstring."""

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
        norm = _log_expression(adata, self.params.target_sum, name)
        take = adata.var_names.get_indexer([g for g in self.genes if g not in set(missing)])
        x = _as_csr(norm[:, take])
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
        return np.asarray(x @ w) - (self.gene_mean / self.gene_scale) @ self.loadings1

    def _features(self, p: np.ndarray, xy: np.ndarray, groups: list[np.ndarray]) -> tuple[np.ndarray, sp.csr_matrix]:
        if self.params.center_samples:  # per-sample location correction (additive batch effect in log space)
            p = p.copy()
            for g in groups:
                p[g] -= p[g].mean(0)
        conn, _, _ = spatial_graph_matrices(
            xy,
            groups,
            method=self.params.graph_method,  # type: ignore[arg-type]
            n_neighbors=self.params.n_neighbors,
            coord_type=self.params.coord_type,  # type: ignore[arg-type]
        )
        a = _smoothing_operator(conn)
        h, acc = p, np.zeros_like(p)
        for _ in range(self.params.n_hops):
            h = a @ h
            acc += h
        s = acc / self.params.n_hops
        lam = self.params.lam
        own_sd, nbr_sd = self.block_scale
        return np.hstack([np.sqrt(1.0 - lam) * p / own_sd, np.sqrt(lam) * s / nbr_sd]), conn

    def embed(self, adata: AnnData, *, sample_key: str | None = None, name: str = "input") -> tuple[np.ndarray, sp.csr_matrix, int]:
        """(domain embedding, spatial connectivities, n missing genes) of one AnnData."""
        xy = validate_spatial(adata, name)
        validate_sample_key(adata, sample_key, name)
        x, n_missing = self._expression(adata, name)
        f, conn = self._features(self._stage1(x), xy, _groups(adata, sample_key))
        return (f - self.mean2) @ self.loadings2, conn, n_missing

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

    def assign(self, adata: AnnData, *, sample_key: str | None = None) -> AnnData:
        """New AnnData with ``domain_level_{k}``, ``domain``, ``obsm['X_domain_embedding']``, ``uns['domains']``."""
        name = sample_label(adata, 0)
        e, conn, n_missing = self.embed(adata, sample_key=sample_key, name=name)
        out = adata.copy()
        for k in self.levels:
            lab = self._smooth(self._nearest(e, k), conn, k)
            out.obs[level_key(k)] = domain_categorical(k, lab)
        out.obs[DOMAIN] = out.obs[level_key(self.n_domains)].copy()
        out.obsm[DOMAIN_EMBEDDING_OBSM] = e.astype(np.float32)
        meta = self.metadata()
        meta["n_missing_genes"] = int(n_missing)
        meta["sample_key"] = sample_key
        out.uns[DOMAINS_UNS] = _jsonable(meta)
        return out

    # ------------------------------------------------------------------ persistence
    def metadata(self) -> dict[str, Any]:
        return {
            "engine": ENGINE_NAME,
            "format_version": FORMAT_VERSION,
            "levels": list(self.levels),
            "n_domains": self.n_domains,
            "seed": self.seed,
            "n_genes": len(self.genes),
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
        if meta.get("format_version") != FORMAT_VERSION:
            raise DomainInputError(f"{directory}: unsupported format_version {meta.get('format_version')!r}")
        known = {f.name for f in fields(NeighborhoodParams)}
        params = NeighborhoodParams(**{k: v for k, v in meta["params"].items() if k in known})
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
        adatas, lv, names = fit_inputs(adatas, levels, n_domains)
        p = self.params
        for a, nm in zip(adatas, names):
            validate_spatial(a, nm)
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
        mats = []
        for a, nm in zip(adatas, names):
            norm = _log_expression(a, p.target_sum, nm)
            mats.append(_as_csr(norm[:, a.var_names.get_indexer(genes)]))
            del norm
        mean, var, n = _gene_stats(mats)
        if len(genes) > p.max_genes:  # whole-transcriptome input: keep the most variable genes
            keep = np.sort(np.argsort(-var, kind="stable")[: p.max_genes])
            genes = [genes[i] for i in keep]
            mats = [m[:, keep] for m in mats]
            mean, var = mean[keep], var[keep]
        scale = np.sqrt(var) if p.scale_genes else np.ones_like(var)
        scale[scale == 0] = 1.0
        # stage 1: exact PCA of the pooled, centred expression from the gene covariance
        gram = sum((m.T @ m).toarray() if sp.issparse(m) else m.T @ m for m in mats)
        cov = (gram / n - np.outer(mean, mean)) / np.outer(scale, scale)
        d1 = int(min(p.n_input_pcs, len(genes), max(n - 1, 1)))
        loadings1 = _pca_from_cov(cov, d1)
        model = NeighborhoodDomainModel(
            params=p,
            genes=genes,
            levels=lv,
            n_domains=int(n_domains),
            gene_mean=mean,
            gene_scale=scale,
            loadings1=loadings1,
            mean2=np.zeros(2 * d1),
            loadings2=np.eye(2 * d1),
            centroids={},
            seed=seed,
        )
        # stage 2: neighbourhood features per sample (own graph each), PCA on all samples pooled
        feats, conns = [], []
        for a, m in zip(adatas, mats):
            f, conn = model._features(model._stage1(m), validate_spatial(a), _groups(a, sample_key))
            feats.append(f)
            conns.append(conn)
        del mats
        f_all = np.vstack(feats)
        del feats
        # put cell and neighbourhood blocks on equal total variance first, so that lam is the share of
        # variance given to the neighbourhood (the cell block otherwise dominates: averaging shrinks variance)
        block_sd = []
        for blk, w in ((slice(0, d1), 1.0 - p.lam), (slice(d1, 2 * d1), p.lam)):
            tot = float(np.sqrt(f_all[:, blk].var(0).sum() / w)) if w > 0 else 0.0
            block_sd.append(tot if tot > 0 else 1.0)
            f_all[:, blk] /= block_sd[-1]
        model.block_scale = (block_sd[0], block_sd[1])
        mean2 = f_all.mean(0)
        fc = f_all - mean2
        d2 = int(min(p.n_pcs, fc.shape[1], max(n - 1, 1)))
        loadings2 = _pca_from_cov(fc.T @ fc / n, d2)
        emb = fc @ loadings2
        del f_all, fc
        model.mean2, model.loadings2 = mean2, loadings2
        # clustering: one k-means per level; ids ordered by size (largest = D0) so they are deterministic
        stats: dict[str, Any] = {"n_cells": int(n), "n_inputs": len(adatas), "n_genes": len(genes), "inertia": {}}
        labels_by_level: dict[int, np.ndarray] = {}
        for k in lv:
            km = KMeans(n_clusters=k, n_init=p.n_init, random_state=seed).fit(emb)
            sizes = np.bincount(km.labels_, minlength=k)
            order = np.lexsort((np.arange(k), -sizes))
            model.centroids[k] = km.cluster_centers_[order]
            remap = np.empty(k, dtype=np.int64)
            remap[order] = np.arange(k)
            labels_by_level[k] = remap[km.labels_]
            stats["inertia"][str(k)] = float(km.inertia_)
        # hierarchy: which coarser domain each finer domain mostly falls into (for display / lineage)
        parents: dict[str, dict[str, int]] = {}
        for fine, coarse in zip(lv[1:], lv[:-1]):
            tab = pd.crosstab(labels_by_level[fine], labels_by_level[coarse])
            parents[f"{fine}->{coarse}"] = {str(i): int(tab.loc[i].idxmax()) for i in tab.index}
        stats["parents"] = parents
        model.fit_stats = stats
        return model


__all__ = ["ENGINE_NAME", "NeighborhoodDomainEngine", "NeighborhoodDomainModel", "NeighborhoodParams"]
