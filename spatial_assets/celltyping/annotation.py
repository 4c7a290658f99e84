"""Annotate a spatial (or any) query with a :class:`~spatial_assets.celltyping.training.TrainedModel`.

No celltypist code runs here. The query is streamed in row batches: each batch is sliced from the
query's own matrix, cut to the model's genes, normalised (log1p-10k over exactly those genes, a
row-local operation) and scored with the scaler folded into the weights (``z = x * a + b`` so
``z @ W.T = x @ (a * W).T + b @ W.T``: a sparse product, nothing densified). Peak memory is the
query's own matrix plus one batch plus the outputs; no normalised copy of the query ever exists.
The per-gene query moments needed by the alignment are accumulated in one streaming pass.

Platform shift (scRNA-seq reference → imaging query) is the main source of error. Per gene, an
imaging panel's detection efficiency differs from scRNA-seq's, which shifts and rescales every
gene's log expression; the reference scaler then puts query cells far from every class. Two
alignments are computed and the one under which the query is most likely under the reference's
own class-conditional model is used (``alignment="auto"``):

* ``"none"``: reference scaler as is (what CellTypist does);
* ``"recenter"``: standardise each gene with the query's own mean/sd, then shift every gene to
  the mean the reference would have at the query's composition (``pi @ class_means``); ``pi`` is
  re-estimated from the predictions until it stops moving (EM). Plain per-query standardisation
  would assume the query has the reference's composition; this does not.

See docs/celltyping.md for the measurements behind this choice.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from threadpoolctl import threadpool_limits

from spatial_assets.core import schema
from spatial_assets.core.normalization import NormalizationPlan, plan_normalization
from spatial_assets.celltyping.training import VAR_FLOOR, TrainedModel

logger = logging.getLogger(__name__)

ALIGNMENTS = ("auto", "none", "recenter")
N_LOGLIK_CELLS = 5_000
#: BLAS threads for the alignment's dense log-likelihood products (the only BLAS work here: batch
#: scores are scipy sparse products). They are at most N_LOGLIK_CELLS rows whatever the query size,
#: too small for a second thread to pay off; measured in benchmarks/bench_threads.py (docs/celltyping.md).
ALIGNMENT_BLAS_THREADS = 1
METHOD = "panel logistic regression (sklearn lbfgs, celltypist layout) + composition-aware query alignment"


class GeneMismatchError(ValueError):
    """The query lacks genes the model was trained on."""


class AnnotationError(ValueError):
    """Bad annotation arguments or query content."""


def _softmax(L: np.ndarray) -> np.ndarray:
    L = L - L.max(axis=1, keepdims=True)
    E = np.exp(L)
    return E / E.sum(axis=1, keepdims=True)


def _logsumexp(L: np.ndarray, axis: int = 1, keepdims: bool = False) -> np.ndarray:
    m = L.max(axis=axis, keepdims=True)
    out = m + np.log(np.exp(L - m).sum(axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis=axis)


def _model_gene_index(adata: AnnData, model: TrainedModel, name: str) -> np.ndarray:
    var = pd.Index(adata.var_names.astype(str))
    if not var.is_unique:
        dup = var[var.duplicated()].unique().tolist()[:10]
        raise AnnotationError(f"{name}: duplicated gene names in var_names, e.g. {dup}")
    idx = var.get_indexer(model.genes)
    missing = [g for g, i in zip(model.genes, idx) if i < 0]
    if missing:
        shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise GeneMismatchError(
            f"{name}: {len(missing)} of the model's {len(model.genes)} genes are missing from the query "
            f"(overlap {len(model.genes) - len(missing)}/{len(model.genes)}): {shown}"
        )
    return idx


def _plan(adata: AnnData, model: TrainedModel, name: str) -> NormalizationPlan:
    _model_gene_index(adata, model, name)
    try:
        return plan_normalization(adata, model.genes)
    except ValueError as exc:
        raise type(exc)(f"{name}: {exc}") from exc


def prepare_query(adata: AnnData, model: TrainedModel, *, name: str = "query") -> sp.csr_matrix:
    """log1p-10k over exactly the model's genes (CSR float32) for the whole query.

    Library size is recomputed over the model genes so reference and query are normalised over the
    same gene set; raw counts are taken from ``layers['counts']`` / ``raw`` when present. This
    materialises the normalised query: :func:`annotate` streams batches instead.
    """
    plan = _plan(adata, model, name)
    return plan.rows(0, plan.n_obs)


class _Linear:
    """The model as arrays: logits = z @ W.T + c with z = x * a + b (a, b per gene)."""

    def __init__(self, model: TrainedModel) -> None:
        clf, sc = model.classifier, model.scaler
        self.W = np.asarray(clf.coef_, dtype=np.float64)  # (K', G); K' = 1 for a binary model
        self.c = np.asarray(clf.intercept_, dtype=np.float64)
        G = self.W.shape[1]
        scale = np.asarray(sc.scale_, dtype=np.float64) if getattr(sc, "scale_", None) is not None else np.ones(G)
        mean = np.asarray(sc.mean_, dtype=np.float64) if getattr(sc, "with_mean", True) else np.zeros(G)
        self.a_ref = 1.0 / scale
        self.b_ref = -mean / scale
        self.binary = self.W.shape[0] == 1

    def fold(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weights acting on normalised x directly: (float32 (G, K') matrix, float64 (K',) offset)."""
        return (self.W * a[None, :]).T.astype(np.float32), self.c + self.W @ b

    def logits(self, S: np.ndarray) -> np.ndarray:
        """Multinomial logits from raw scores; binary models get ``[0, s]`` (softmax == predict_proba)."""
        return np.column_stack([np.zeros_like(S[:, 0]), S[:, 0]]) if self.binary else S

    def decision(self, S: np.ndarray) -> np.ndarray:
        """celltypist's decision-score convention (binary: ``[-s, s]``)."""
        return np.column_stack([-S[:, 0], S[:, 0]]) if self.binary else S


def _mixture_loglik(Z: np.ndarray, means: np.ndarray, variances: np.ndarray, n_iter: int = 30) -> float:
    """Mean per-gene log-likelihood of ``Z`` under the reference's diagonal Gaussian class mixture.

    Mixture weights are fitted by EM so a query with a different composition is not penalised.
    """
    v = variances + VAR_FLOOR
    inv = 1.0 / v
    # ||z - mu||^2 / v expanded: avoids a cells x classes x genes array
    quad = (Z**2) @ inv.T - 2.0 * Z @ (means * inv).T + ((means**2) * inv).sum(axis=1)[None, :]
    L = -0.5 * (quad + np.log(2 * np.pi * v).sum(axis=1)[None, :])
    log_pi = np.full(means.shape[0], -np.log(means.shape[0]))
    for _ in range(n_iter):
        R = L + log_pi
        R -= _logsumexp(R, axis=1, keepdims=True)
        pi = np.exp(R).mean(axis=0) + 1e-12
        log_pi = np.log(pi / pi.sum())
    return float(_logsumexp(L + log_pi, axis=1).mean() / Z.shape[1])


def _scan_query(
    plan: NormalizationPlan, rows: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """One streaming pass: per-gene mean and sd of the normalised query, and the rows ``rows``."""
    n = plan.n_obs
    s1 = s2 = None
    picked: list[sp.csr_matrix] = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        Xb = plan.rows(start, stop)
        ones = np.ones(Xb.shape[0], dtype=Xb.dtype)
        sq = sp.csr_matrix((np.square(Xb.data), Xb.indices, Xb.indptr), shape=Xb.shape)
        # per-batch column sums (float32 over <= batch_size rows), accumulated across batches in float64
        b1 = np.asarray(Xb.T @ ones, dtype=np.float64)
        b2 = np.asarray(sq.T @ ones, dtype=np.float64)
        s1, s2 = (b1, b2) if s1 is None else (s1 + b1, s2 + b2)
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi > lo:
            picked.append(Xb[rows[lo:hi] - start])
    mean = s1 / n
    var = np.maximum(s2 / n - mean**2, 0.0)
    return mean, np.sqrt(var), sp.vstack(picked, format="csr")


def _fit_alignment(
    plan: NormalizationPlan,
    model: TrainedModel,
    lin: _Linear,
    alignment: str,
    *,
    seed: int,
    n_fit: int,
    batch_size: int,
    max_em_iter: int = 30,
    tol: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Choose and fit the per-gene map ``z = x * a + b`` (query moments streamed; EM on a seeded subsample)."""
    if alignment == "none":
        return lin.a_ref, lin.b_ref, {"alignment": "none"}
    rng = np.random.default_rng(seed)
    n = plan.n_obs
    rows = np.sort(rng.choice(n, size=n_fit, replace=False)) if n > n_fit else np.arange(n)
    qmean, qsd, Xs = _scan_query(plan, rows, batch_size)
    a = np.where(qsd > 0, 1.0 / np.where(qsd > 0, qsd, 1.0), 0.0)
    b_own = -qmean * a
    means = model.class_means
    Wf, c_own = lin.fold(a, b_own)
    S0 = np.asarray(Xs @ Wf, dtype=np.float64) + c_own  # scores of the query standardised by its own moments
    P = _softmax(lin.logits(S0))
    pi = P.mean(axis=0)
    n_iter = 0
    for n_iter in range(1, max_em_iter + 1):
        P = _softmax(lin.logits(S0 + lin.W @ (pi @ means)))  # a shift of z by pi @ means moves scores by W @ it
        new_pi = P.mean(axis=0)
        delta = float(np.abs(new_pi - pi).max())
        pi = new_pi
        if delta < tol:
            break
    offset = pi @ means
    info: dict[str, Any] = {
        "em_iterations": n_iter,
        "estimated_proportions": {str(k): float(p) for k, p in zip(model.classes, pi)},
        "n_cells_fit": int(len(rows)),
    }
    if alignment == "recenter":
        info["alignment"] = "recenter"
        return a, b_own + offset, info
    m = min(len(rows), N_LOGLIK_CELLS)  # the mean log-likelihood is stable on a few thousand cells
    D = Xs[:m].toarray().astype(np.float64)
    with threadpool_limits(limits=ALIGNMENT_BLAS_THREADS, user_api="blas"):
        ll_none = _mixture_loglik(D * lin.a_ref + lin.b_ref, means, model.class_vars)
        ll_rec = _mixture_loglik(D * a + (b_own + offset), means, model.class_vars)
    chosen = "recenter" if ll_rec > ll_none else "none"
    info.update({"alignment": chosen, "loglik_none": ll_none, "loglik_recenter": ll_rec})
    return (a, b_own + offset, info) if chosen == "recenter" else (lin.a_ref, lin.b_ref, info)


def _categorical(values_per_code: list[str], codes: np.ndarray) -> pd.Categorical:
    """``pd.Categorical(values_per_code[codes])`` without building a per-cell object array."""
    used = np.unique(codes)
    cats = sorted({values_per_code[i] for i in used})
    pos = {v: i for i, v in enumerate(cats)}
    lookup = np.array([pos.get(v, -1) for v in values_per_code], dtype=np.int64)  # -1: code unused
    return pd.Categorical.from_codes(lookup[codes], categories=cats)


def annotate(
    adata: AnnData,
    model: TrainedModel,
    *,
    confidence_threshold: float = 0.5,
    batch_size: int = 10_000,
    alignment: str = "auto",
    seed: int = 0,
    n_fit_cells: int = 20_000,
    name: str = "query",
) -> AnnData:
    """Return a new AnnData with calls, decision scores and calibrated confidence in obs/obsm/uns.

    Missing model genes are an error (naming them): zero-filling would silently bias every
    decision score. ``cell_type_confidence`` is the temperature-scaled softmax maximum (temperature
    from held-out reference cells at training), so it spans [1/K, 1] for any K, including K=2.
    The returned object shares X/layers with ``adata`` (never modified); obs/uns are new.
    """
    if alignment not in ALIGNMENTS:
        raise AnnotationError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if not 0.0 <= confidence_threshold <= 1.0:
        raise AnnotationError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
    if batch_size < 1:
        raise AnnotationError(f"batch_size must be >= 1, got {batch_size}")
    if adata.n_obs == 0:
        raise AnnotationError(f"{name}: query has no cells")

    plan = _plan(adata, model, name)
    lin = _Linear(model)
    a, b, info = _fit_alignment(plan, model, lin, alignment, seed=seed, n_fit=n_fit_cells, batch_size=batch_size)
    Wf, c = lin.fold(a, b)
    c32 = c.astype(np.float32)
    K = len(model.classes)
    T = np.float32(model.temperature)
    n = plan.n_obs
    scores = np.empty((n, K), dtype=np.float32)
    conf = np.empty(n, dtype=np.float32)
    best = np.empty(n, dtype=np.int64)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        S = np.asarray(plan.rows(start, stop) @ Wf, dtype=np.float32)
        S += c32
        D = lin.decision(S)
        scores[start:stop] = D
        best[start:stop] = D.argmax(axis=1)
        conf[start:stop] = _softmax(lin.logits(S) / T).max(axis=1)
    top = scores[np.arange(n), best]
    raw_conf = (1.0 / (1.0 + np.exp(-top.astype(np.float64)))).astype(np.float32)

    classes = [str(k) for k in model.classes]
    ontology = model.card.get("ontology", {})
    assigned = conf >= confidence_threshold
    call_codes = np.where(assigned, best, K)
    terms = [ontology.get(k, {}).get("term_id", "unknown") for k in classes] + [schema.UNASSIGNED_ONTOLOGY_ID]
    tlabels = [ontology.get(k, {}).get("label", k) for k in classes] + [schema.UNASSIGNED_ONTOLOGY_LABEL]

    obs = adata.obs.copy()
    obs[schema.PREDICTED] = pd.Categorical.from_codes(best, categories=classes)
    obs[schema.CONFIDENCE_RAW] = raw_conf
    obs[schema.CONFIDENCE] = conf
    obs[schema.CELL_TYPE] = pd.Categorical.from_codes(call_codes, categories=classes + [schema.UNASSIGNED])
    obs[schema.CELL_TYPE_ONTOLOGY_ID] = _categorical(terms, call_codes)
    obs[schema.CELL_TYPE_ONTOLOGY_LABEL] = _categorical(tlabels, call_codes)

    uns = dict(adata.uns)
    label_map = model.card.get("label_map", {})
    uns[schema.LABEL_MAP_UNS] = {str(k): list(label_map.get(str(k), [str(k)])) for k in model.classes}
    uns[schema.CELLTYPING_UNS] = {
        "method": METHOD,
        "confidence_threshold": float(confidence_threshold),
        "confidence": "temperature-scaled softmax maximum",
        "temperature": float(model.temperature),
        "classes": list(model.classes),
        "model_sha256": model.sha256 or "",
        "n_genes": len(model.genes),
        "gene_overlap": 1.0,
        "unassigned_fraction": float(1.0 - assigned.mean()),
        "normalization": plan.record(),
        **{k: v for k, v in info.items()},
    }
    obsm = dict(adata.obsm.items())
    obsm[schema.DECISION_SCORES_OBSM] = scores
    return AnnData(
        X=adata.X,
        obs=obs,
        var=adata.var.copy(),
        obsm=obsm,
        varm=dict(adata.varm.items()),
        obsp=dict(adata.obsp.items()),
        layers=dict(adata.layers.items()),
        uns=uns,
    )
