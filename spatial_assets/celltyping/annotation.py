"""Annotate a spatial (or any) query with a :class:`~spatial_assets.celltyping.training.TrainedModel`.

No celltypist code runs here. The query is streamed in row batches: each batch is sliced from the
query's own matrix, cut to the model's genes, normalised (log1p-10k over exactly those genes, a
row-local operation) and scored with the scaler folded into the weights (``z = x * a + b`` so
``z @ W.T = x @ (a * W).T + b @ W.T``: a sparse product, nothing densified). Peak memory is the
query's own matrix plus one batch plus the outputs; no normalised copy of the query ever exists.
The per-gene query moments needed by the alignment are accumulated in one streaming pass.

Platform shift (scRNA-seq reference → imaging query) is the main source of error, and the
remedies for it (query alignment, strong shrinkage) cost accuracy when there is none. So the
decision is measured, not guessed: the composition-adjusted dispersion index of
:mod:`spatial_assets.celltyping.shift` compares the query's per-gene spread with the reference
mixture's at the query's own composition. Above :data:`~spatial_assets.celltyping.shift.SHIFT_INDEX_THRESHOLD`
the model's ``shifted`` regime is used (strongly shrunk coefficients) with ``alignment="auto"``
meaning ``"recenter"``; below it the ``same_platform`` regime (cross-validated shrinkage) with no
alignment:

* ``"none"``: reference scaler as is (what CellTypist does);
* ``"recenter"``: standardise each gene with the query's own mean/sd, then shift every gene to
  the mean the reference would have at the query's composition (``pi @ class_means``); ``pi`` is
  re-estimated from the predictions until it stops moving (EM). Plain per-query standardisation
  would assume the query has the reference's composition; this does not.

Confidence is the regime's temperature-scaled softmax maximum; the default threshold is the
regime's (the confidence at which out-of-fold reference cells reach the target precision), and is
marked unverified when a shift was detected (reference cells then say little about the query).
See docs/celltyping.md for the measurements behind this choice.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from spatial_assets.celltyping.calibration import coverage_curve
from spatial_assets.celltyping.shift import MIN_CELLS_FOR_INDEX, SHIFT_INDEX_THRESHOLD, dispersion_shift_index
from spatial_assets.core import schema
from spatial_assets.core.normalization import NormalizationPlan, plan_normalization
from spatial_assets.celltyping.training import REGIMES, TrainedModel

logger = logging.getLogger(__name__)

ALIGNMENTS = ("auto", "none", "recenter")
METHOD = (
    "panel logistic regression (sklearn lbfgs, celltypist layout); regime and query alignment chosen by a "
    "composition-adjusted dispersion (platform-shift) index"
)


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

    def __init__(self, model: TrainedModel, regime: str = "same_platform") -> None:
        sc = model.scaler
        W, c = model.coefficients(regime)
        self.W = W  # (K', G); K' = 1 for a binary model
        self.c = c
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


def _query_index(model: TrainedModel, lin: _Linear, qmean: np.ndarray, qsd: np.ndarray, n_obs: int) -> dict[str, Any]:
    """The platform-shift index in the model's standardised space (``z = x * a_ref + b_ref``)."""
    if n_obs < MIN_CELLS_FOR_INDEX:
        return {"index": float("nan"), "mean_index": float("nan"), "n_genes": 0, "composition": None}
    return dispersion_shift_index(model.class_means, model.class_vars, qmean * lin.a_ref + lin.b_ref, qsd * lin.a_ref)


def _recenter(
    model: TrainedModel,
    lin: _Linear,
    qmean: np.ndarray,
    qsd: np.ndarray,
    Xs: sp.csr_matrix,
    *,
    max_em_iter: int = 30,
    tol: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Composition-aware recentering ``z = (x - mean_q) / sd_q + pi @ class_means`` (EM for ``pi``)."""
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
    info = {
        "em_iterations": n_iter,
        "estimated_proportions": {str(k): float(p) for k, p in zip(model.classes, pi)},
        "n_cells_fit": int(Xs.shape[0]),
    }
    return a, b_own + pi @ means, info


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
    confidence_threshold: float | None = None,
    batch_size: int = 10_000,
    alignment: str = "auto",
    seed: int = 0,
    n_fit_cells: int = 20_000,
    shift_threshold: float = SHIFT_INDEX_THRESHOLD,
    regime: str = "auto",
    name: str = "query",
) -> AnnData:
    """Return a new AnnData with calls, decision scores and calibrated confidence in obs/obsm/uns.

    ``confidence_threshold=None`` (the default everywhere) takes the model's threshold for the
    regime used: the confidence at which out-of-fold reference cells reached the model's target
    precision. ``alignment``: ``auto`` (recenter only when the shift index says there is a platform
    shift), ``none`` or ``recenter`` (forced; the regime still follows the index). ``regime``:
    ``auto`` (by the index), or ``same_platform`` / ``shifted`` forced (for ablations; with
    ``alignment="auto"`` the alignment then follows the forced regime).
    Missing model genes are an error (naming them): zero-filling would silently bias every
    decision score. ``cell_type_confidence`` is the temperature-scaled softmax maximum, so it
    spans [1/K, 1] for any K, including K=2. Everything decided (index, regime, alignment,
    threshold, and why) is recorded in ``uns['celltyping']``. The returned object shares
    X/layers with ``adata`` (never modified); obs/uns are new.
    """
    if alignment not in ALIGNMENTS:
        raise AnnotationError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if regime not in ("auto",) + REGIMES:
        raise AnnotationError(f"regime must be 'auto' or one of {REGIMES}, got {regime!r}")
    if confidence_threshold is not None and not 0.0 <= confidence_threshold <= 1.0:
        raise AnnotationError(f"confidence_threshold must be in [0, 1] or None (the model's), got {confidence_threshold}")
    if batch_size < 1:
        raise AnnotationError(f"batch_size must be >= 1, got {batch_size}")
    if adata.n_obs == 0:
        raise AnnotationError(f"{name}: query has no cells")

    plan = _plan(adata, model, name)
    n = plan.n_obs
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=n_fit_cells, replace=False)) if n > n_fit_cells else np.arange(n)
    qmean, qsd, Xs = _scan_query(plan, rows, batch_size)
    base = _Linear(model, "same_platform")
    shift = _query_index(model, base, qmean, qsd, n)
    measured = bool(np.isfinite(shift["index"]))
    shifted = measured and shift["index"] > shift_threshold
    if not measured:
        why = f"fewer than {MIN_CELLS_FOR_INDEX} query cells: shift not measurable, same-platform regime"
    else:
        rel = ">" if shifted else "<="
        why = f"shift index {shift['index']:.3f} {rel} {shift_threshold:g}: " + (
            "platform shift, strong-shrinkage regime" if shifted else "no platform shift, cross-validated regime"
        )
    if regime == "auto":
        regime = "shifted" if shifted else "same_platform"
    else:
        why = f"regime {regime} forced by the caller ({why})"
        shifted = regime == "shifted"
    used = ("recenter" if shifted else "none") if alignment == "auto" else alignment
    lin = base if regime == "same_platform" else _Linear(model, regime)
    info: dict[str, Any] = {}
    if used == "recenter":
        a, b, info = _recenter(model, lin, qmean, qsd, Xs)
    else:
        a, b = lin.a_ref, lin.b_ref
    del Xs
    reg_info = model.regime(regime)
    T = np.float32(reg_info.get("temperature", model.temperature))
    model_thr = reg_info.get("threshold", {})
    if confidence_threshold is None:
        if "threshold" not in model_thr:
            raise AnnotationError(f"{name}: the model records no default confidence threshold; pass confidence_threshold")
        threshold = float(model_thr["threshold"])
        source = f"model ({regime} regime): out-of-fold reference cells reach precision {model_thr['target_precision']:g}"
    else:
        threshold = float(confidence_threshold)
        source = "caller"
    verified = source != "caller" and not shifted and bool(model_thr.get("target_reached", False))

    Wf, c = lin.fold(a, b)
    c32 = c.astype(np.float32)
    K = len(model.classes)
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
    assigned = conf >= threshold
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
    reg = reg_info.get("reg_per_cell", "")
    record: dict[str, Any] = {
        "method": METHOD,
        "shift_index": float(shift["index"]),
        "shift_mean_index": float(shift["mean_index"]),
        "shift_index_threshold": float(shift_threshold),
        "shift_index_genes": int(shift["n_genes"]),
        "platform_shift": bool(shifted),
        "regime": regime,
        "regime_reason": why,
        "alignment_requested": alignment,
        "alignment": used,
        "reg_per_cell": reg if reg is not None else "C given by the caller",
        "regularization_reason": str(reg_info.get("why", "")),
        "confidence_threshold": threshold,
        "threshold_source": source,
        "threshold_target_precision": float(model_thr.get("target_precision", float("nan"))),
        "threshold_expected_coverage": float(model_thr.get("expected_coverage", float("nan"))) if source != "caller" else float("nan"),
        "threshold_verified": bool(verified),
        "threshold_note": (
            "held-out reference precision applies: no platform shift detected"
            if verified
            else "unverified: a platform shift was detected, reference cells do not bound the query's precision"
            if shifted and source != "caller"
            else "set by the caller" if source == "caller" else "target precision not reached on held-out cells"
        ),
        "confidence": "temperature-scaled softmax maximum",
        "temperature": float(T),
        "classes": list(model.classes),
        "rare_classes": list(model.card.get("rare_classes", [])),
        "model_sha256": model.sha256 or "",
        "n_genes": len(model.genes),
        "gene_overlap": 1.0,
        "unassigned_fraction": float(1.0 - assigned.mean()),
        "coverage_curve_reference": dict(reg_info.get("curve", {})),
        "coverage_curve_query": coverage_curve(conf),
        "normalization": plan.record(),
        **info,
    }
    if shift["composition"] is not None:
        record["composition_from_means"] = {k: float(p) for k, p in zip(classes, shift["composition"])}
    uns[schema.CELLTYPING_UNS] = record
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
