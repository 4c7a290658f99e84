"""Annotate a spatial (or any) query with a :class:`~spatial_assets.training.TrainedModel`.

No celltypist code runs here: the query is prepared explicitly (subset to the model's genes,
log1p-10k over exactly those genes, model scaler) and scored in row batches, so peak memory is the
query's own sparse matrix plus one dense batch.

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

from spatial_assets import schema
from spatial_assets.training import VAR_FLOOR, TrainedModel, class_logits

logger = logging.getLogger(__name__)

ALIGNMENTS = ("auto", "none", "recenter")
N_LOGLIK_CELLS = 5_000
METHOD = "panel logistic regression (sklearn lbfgs, celltypist layout) + composition-aware query alignment"


class GeneMismatchError(ValueError):
    """The query lacks genes the model was trained on."""


class AnnotationError(ValueError):
    """Bad annotation arguments or query content."""


def _softmax(L: np.ndarray) -> np.ndarray:
    L = L - L.max(axis=1, keepdims=True)
    E = np.exp(L)
    return E / E.sum(axis=1, keepdims=True)


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


def prepare_query(adata: AnnData, model: TrainedModel, *, name: str = "query") -> sp.csr_matrix:
    """log1p-10k over exactly the model's genes (CSR float32), via ``ensure_normalized``.

    Library size is recomputed over the model genes so reference and query are normalised over the
    same gene set; raw counts are taken from ``layers['counts']`` / ``raw`` when present.
    """
    from spatial_assets.normalization import ensure_normalized

    idx = _model_gene_index(adata, model, name)
    layers: dict[str, Any] = {}
    for key in ("counts", "raw_counts", "raw"):
        if key in adata.layers:
            layers[key] = adata.layers[key][:, idx]
    if adata.raw is not None and "raw" not in layers:
        raw_var = pd.Index(adata.raw.var_names.astype(str))
        ridx = raw_var.get_indexer(model.genes)
        if (ridx >= 0).all():
            layers["raw"] = adata.raw.X[:, ridx]
    sub = AnnData(X=adata.X[:, idx], obs=pd.DataFrame(index=adata.obs_names.astype(str)), layers=layers)
    sub.var_names = list(model.genes)
    try:
        norm = ensure_normalized(sub)
    except ValueError as exc:
        raise type(exc)(f"{name}: {exc}") from exc
    X = norm.X
    return sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else sp.csr_matrix(np.asarray(X, dtype=np.float32))


def _gene_moments(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    n = X.shape[0]
    s = np.asarray(X.sum(axis=0), dtype=np.float64).ravel()
    sq = X.copy()
    sq.data = sq.data.astype(np.float64) ** 2
    s2 = np.asarray(sq.sum(axis=0), dtype=np.float64).ravel()
    mean = s / n
    var = np.maximum(s2 / n - mean**2, 0.0)
    return mean, np.sqrt(var)


class _Transform:
    """Affine per-gene map from log1p-10k to the model's scaled space: ``z = x * a + b``."""

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        self.a = a.astype(np.float32)
        self.b = b.astype(np.float32)

    def __call__(self, X: sp.csr_matrix | np.ndarray) -> np.ndarray:
        D = X.toarray() if sp.issparse(X) else np.asarray(X)
        D = D.astype(np.float32, copy=False)
        D *= self.a
        D += self.b
        return D


def _scaler_transform(model: TrainedModel) -> _Transform:
    sc = model.scaler
    scale = np.asarray(sc.scale_, dtype=np.float64) if sc.scale_ is not None else np.ones(len(model.genes))
    mean = np.asarray(sc.mean_, dtype=np.float64) if getattr(sc, "with_mean", True) else np.zeros(len(model.genes))
    return _Transform(1.0 / scale, -mean / scale)


def _mixture_loglik(Z: np.ndarray, means: np.ndarray, variances: np.ndarray, n_iter: int = 30) -> float:
    """Mean per-gene log-likelihood of ``Z`` under the reference's diagonal Gaussian class mixture.

    Mixture weights are fitted by EM so a query with a different composition is not penalised.
    """
    from scipy.special import logsumexp

    v = variances + VAR_FLOOR
    inv = 1.0 / v
    # ||z - mu||^2 / v expanded: avoids a cells x classes x genes array
    quad = (Z**2) @ inv.T - 2.0 * Z @ (means * inv).T + ((means**2) * inv).sum(axis=1)[None, :]
    L = -0.5 * (quad + np.log(2 * np.pi * v).sum(axis=1)[None, :])
    log_pi = np.full(means.shape[0], -np.log(means.shape[0]))
    for _ in range(n_iter):
        R = L + log_pi
        R -= logsumexp(R, axis=1, keepdims=True)
        pi = np.exp(R).mean(axis=0) + 1e-12
        log_pi = np.log(pi / pi.sum())
    return float(logsumexp(L + log_pi, axis=1).mean() / Z.shape[1])


def _fit_alignment(
    X: sp.csr_matrix,
    model: TrainedModel,
    alignment: str,
    *,
    seed: int,
    n_fit: int,
    max_em_iter: int = 30,
    tol: float = 1e-3,
) -> tuple[_Transform, dict[str, Any]]:
    """Choose and fit the query → model-space transform on a seeded subsample of ``n_fit`` cells."""
    plain = _scaler_transform(model)
    if alignment == "none":
        return plain, {"alignment": "none"}
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    rows = np.sort(rng.choice(n, size=n_fit, replace=False)) if n > n_fit else np.arange(n)
    Xs = X[rows]
    qmean, qsd = _gene_moments(X)
    a = np.where(qsd > 0, 1.0 / np.where(qsd > 0, qsd, 1.0), 0.0)
    means = model.class_means
    clf = model.classifier
    own = _Transform(a, -qmean * a)(Xs)
    P = _softmax(class_logits(clf, own))
    pi = P.mean(axis=0)
    n_iter = 0
    for n_iter in range(1, max_em_iter + 1):
        P = _softmax(class_logits(clf, own + (pi @ means).astype(np.float32)))
        new_pi = P.mean(axis=0)
        delta = float(np.abs(new_pi - pi).max())
        pi = new_pi
        if delta < tol:
            break
    offset = pi @ means
    recenter = _Transform(a, -qmean * a + offset)
    info: dict[str, Any] = {
        "em_iterations": n_iter,
        "estimated_proportions": {str(k): float(p) for k, p in zip(model.classes, pi)},
        "n_cells_fit": int(len(rows)),
    }
    if alignment == "recenter":
        info["alignment"] = "recenter"
        return recenter, info
    m = min(len(rows), N_LOGLIK_CELLS)  # the mean log-likelihood is stable on a few thousand cells
    ll_none = _mixture_loglik(plain(Xs[:m]).astype(np.float64), means, model.class_vars)
    ll_rec = _mixture_loglik((own[:m] + offset.astype(np.float32)).astype(np.float64), means, model.class_vars)
    chosen = "recenter" if ll_rec > ll_none else "none"
    info.update({"alignment": chosen, "loglik_none": ll_none, "loglik_recenter": ll_rec})
    return (recenter if chosen == "recenter" else plain), info


def annotate(
    adata: AnnData,
    model: TrainedModel,
    *,
    confidence_threshold: float = 0.5,
    batch_size: int = 50_000,
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
    from scipy.special import expit

    X = prepare_query(adata, model, name=name)
    transform, info = _fit_alignment(X, model, alignment, seed=seed, n_fit=n_fit_cells)
    clf = model.classifier
    K = len(model.classes)
    T = model.temperature
    n = X.shape[0]
    scores = np.empty((n, K), dtype=np.float32)
    conf = np.empty(n, dtype=np.float32)
    best = np.empty(n, dtype=np.int64)
    for start in range(0, n, batch_size):
        Z = transform(X[start : start + batch_size])
        s = clf.decision_function(Z)
        D = np.column_stack([-s, s]) if s.ndim == 1 else s  # celltypist's decision-score convention
        L = np.column_stack([np.zeros_like(s), s]) if s.ndim == 1 else s
        scores[start : start + len(D)] = D
        best[start : start + len(D)] = D.argmax(axis=1)
        conf[start : start + len(D)] = _softmax(L / T).max(axis=1)
    classes = np.asarray(model.classes, dtype=object)
    predicted = classes[best]
    raw_conf = expit(scores[np.arange(n), best]).astype(np.float32)

    ontology = model.card.get("ontology", {})
    assigned = conf >= confidence_threshold
    call = np.where(assigned, predicted, schema.UNASSIGNED)
    term = np.array([ontology.get(str(c), {}).get("term_id", "unknown") for c in predicted], dtype=object)
    tlabel = np.array([ontology.get(str(c), {}).get("label", str(c)) for c in predicted], dtype=object)
    term[~assigned] = schema.UNASSIGNED_ONTOLOGY_ID
    tlabel[~assigned] = schema.UNASSIGNED_ONTOLOGY_LABEL

    obs = adata.obs.copy()
    cats = list(model.classes)
    obs[schema.PREDICTED] = pd.Categorical(predicted, categories=cats)
    obs[schema.CONFIDENCE_RAW] = raw_conf
    obs[schema.CONFIDENCE] = conf
    obs[schema.CELL_TYPE] = pd.Categorical(call, categories=cats + [schema.UNASSIGNED])
    obs[schema.CELL_TYPE_ONTOLOGY_ID] = pd.Categorical(term)
    obs[schema.CELL_TYPE_ONTOLOGY_LABEL] = pd.Categorical(tlabel)

    uns = dict(adata.uns)
    label_map = model.card.get("label_map", {})
    uns[schema.LABEL_MAP_UNS] = {str(k): list(label_map.get(str(k), [str(k)])) for k in model.classes}
    uns[schema.CELLTYPING_UNS] = {
        "method": METHOD,
        "confidence_threshold": float(confidence_threshold),
        "confidence": "temperature-scaled softmax maximum",
        "temperature": float(T),
        "classes": list(model.classes),
        "model_sha256": model.sha256 or "",
        "n_genes": len(model.genes),
        "gene_overlap": 1.0,
        "unassigned_fraction": float(1.0 - assigned.mean()),
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
