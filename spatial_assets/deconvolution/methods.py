"""The deconvolution methods, each behind one signature: spot counts + reference → proportions.

* ``rctd`` — RCTD (Cable et al. 2022) via rctd-py: a Poisson-lognormal model of every gene of every
  spot; per-gene platform effects between the reference and the spatial assay are fitted on the
  pseudo-bulk first (``fit_bulk``), which is what makes it robust to a platform shift. Full mode
  (every type may be present), run on CPU without ``torch.compile``. Its likelihood tables are
  computed here (:mod:`.rctd_tables`) instead of downloaded.
* ``flashdeconv`` — FlashDeconv: log-CPM, randomised sketching and spatially regularised
  non-negative least squares (graph Laplacian over the spot neighbours); fast on millions of bins.
* ``nnls`` — the baseline: per-class mean counts of the reference, ``scipy.optimize.nnls`` per spot.

RCTD estimates the share of each spot's *transcripts* coming from each type; a type with large cells
then looks more abundant than it is. Proportions here are fractions of *cells* (``units="cells"``):
each transcript share is divided by the class's mean counts per cell in the reference (over the genes
used) and renormalised — under RCTD's model the per-gene platform factors cancel in that ratio.
``platform_nb`` and NNLS regress on mean counts per cell and estimate cell numbers directly.
FlashDeconv regresses in log-CPM space, so its weights are neither; they are reported as returned.
docs/deconvolution.md has the measurements.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

from spatial_assets.deconvolution.reference import DeconvolutionInputError, DeconvolutionReference

logger = logging.getLogger(__name__)

METHODS = ("platform_nb", "rctd", "flashdeconv", "nnls")
UNITS = ("cells", "transcripts")
#: weights reported as the library returns them (FlashDeconv fits in log-CPM space: its weights are
#: neither cell nor transcript fractions, and converting them measured worse)
AS_RETURNED = "as_returned"


@dataclass
class MethodResult:
    """Proportions (rows of fitted spots sum to 1, columns = reference classes) and what was used."""

    proportions: np.ndarray
    fitted: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    native_units: str = "cells"
    #: (K, G) expected counts per cell of each class on the spatial assay, when the method fits them
    profiles: np.ndarray | None = None


def _normalise_rows(W: np.ndarray) -> np.ndarray:
    W = np.clip(np.nan_to_num(W, nan=0.0), 0.0, None)
    s = W.sum(axis=1, keepdims=True)
    out = np.divide(W, s, out=np.zeros_like(W), where=s > 0)
    return out


def transcripts_to_cells(W: np.ndarray, cell_size: np.ndarray) -> np.ndarray:
    """Transcript shares → cell fractions: divide by each class's counts per cell, renormalise."""
    return _normalise_rows(W / np.maximum(cell_size, 1e-12)[None, :])


# ------------------------------------------------------------------------------------------ NNLS


def run_nnls(Y: sp.csr_matrix, ref: DeconvolutionReference, *, params: Mapping[str, Any] | None = None, **_: Any) -> MethodResult:
    """Per-class mean counts (K × G) as the design, ``scipy.optimize.nnls`` per spot, rows → 1."""
    from scipy.optimize import nnls

    if params:
        raise DeconvolutionInputError(f"nnls takes no method parameters, got {sorted(params)}")

    S = ref.mean_profiles()  # (K, G)
    A = np.ascontiguousarray(S.T)
    n, K = Y.shape[0], S.shape[0]
    W = np.zeros((n, K))
    block = 4096
    for start in range(0, n, block):
        Yb = Y[start : start + block].toarray().astype(np.float64)
        for i in range(Yb.shape[0]):
            if Yb[i].any():
                W[start + i] = nnls(A, Yb[i], maxiter=50 * K)[0]
    fitted = W.sum(axis=1) > 0
    return MethodResult(_normalise_rows(W), fitted, {"profiles": "per-class mean counts per cell"}, "cells")


# ----------------------------------------------------------------------------------- platform NB


def _mu_fit(
    Y: np.ndarray,
    S: np.ndarray,
    W: np.ndarray,
    *,
    phi: np.ndarray | None,
    n_iter: int,
    tol: float,
    dtype: type = np.float32,
    excess: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Non-negative W maximising the (weighted) Poisson likelihood of Y ≈ W·S by multiplicative updates.

    With ``phi`` (per-gene negative-binomial dispersion) every update uses the IRLS weights
    c = 1/(1 + φλ) at the current λ, so a fixed point solves the NB score equations
    Σ_g c_g S_kg (y_g/λ_g − 1) = 0. Rows stop being updated once their proportions move less than
    ``tol`` in an iteration; the working block is compacted when a third of its rows have stopped.
    The spots × genes arrays are float32 by default (the weights stay float64): they dominate memory
    traffic.
    """
    W = np.array(W, dtype=np.float64)
    S32 = np.ascontiguousarray(S, dtype=dtype)
    colsum = S.sum(axis=1)
    phi32 = None if phi is None else np.asarray(phi, dtype=dtype)[None, :]
    E32 = None if excess is None else np.ascontiguousarray(excess, dtype=dtype)
    rows = np.arange(W.shape[0])  # rows of the working block
    Yw = np.asarray(Y, dtype=dtype)
    one, floor = dtype(1.0), dtype(1e-20)
    live = np.ones(rows.size, dtype=bool)  # within the working block
    it = 0
    for it in range(1, n_iter + 1):
        Wa = W[rows]
        L = Wa.astype(dtype) @ S32
        np.maximum(L, floor, out=L)
        if phi32 is not None:
            C = L * phi32
            C += one
            np.reciprocal(C, out=C)  # c = 1 / (1 + φλ)
        elif E32 is not None:
            C = Wa.astype(dtype) @ E32
            C += L
            np.divide(L, C, out=C)  # c = λ / (λ + Σ_k w_k e_k)
        np.divide(Yw, L, out=L)  # L now holds y / λ
        if phi32 is None and E32 is None:
            num = L @ S32.T
            den = colsum[None, :]
        else:
            L *= C
            num = L @ S32.T
            den = C @ S32.T
        Wn = Wa * num / np.maximum(den, 1e-300)
        tot_old = np.maximum(Wa.sum(axis=1, keepdims=True), 1e-300)
        tot_new = np.maximum(Wn.sum(axis=1, keepdims=True), 1e-300)
        change = np.abs(Wn / tot_new - Wa / tot_old).max(axis=1)
        W[rows[live]] = Wn[live]
        live &= change >= tol
        if not live.any():
            break
        if live.sum() < 0.67 * live.size:
            rows, Yw, live = rows[live], Yw[live], np.ones(int(live.sum()), dtype=bool)
    return W, it


def _dispersion_moments(Y: np.ndarray, W: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Per gene sums over spots of a = (y−λ)² − y and d = λ², and of a², a·d, d² (for their noise); λ = W·S."""
    L = W @ S
    a = (Y - L) ** 2 - Y
    d = L**2
    return np.stack([a.sum(axis=0), d.sum(axis=0), (a * a).sum(axis=0), (a * d).sum(axis=0), (d * d).sum(axis=0)])


def shrunk_dispersion(m: np.ndarray, mode: str = "eb") -> tuple[np.ndarray, float]:
    """Per-gene NB dispersion from the moment sums of :func:`_dispersion_moments`.

    φ̂_g = Σa/Σd (method of moments, Σ over spots) has a sampling variance v_g (delta method, from
    the same sums). ``"eb"``: normal–normal empirical Bayes — each φ̂_g is pulled towards the pooled
    value φ₀ = ΣΣa/ΣΣd by v_g / (v_g + τ²), τ² = the spread of the true φ_g across genes (variance of
    φ̂_g minus the mean v_g). Few spots → noisy φ̂_g → close to φ₀; many → each gene its own.
    ``"global"``: φ₀ for every gene.
    """
    A, D, AA, AD, DD = m
    D = np.maximum(D, 1e-300)
    phi0 = max(0.0, float(A.sum() / D.sum()))
    if mode == "global":
        return np.full(A.size, phi0), phi0
    phi_hat = A / D
    v = np.maximum(AA - 2 * phi_hat * AD + phi_hat**2 * DD, 0.0) / D**2
    tau2 = max(0.0, float(np.var(phi_hat) - np.mean(v)))
    weight = tau2 / (tau2 + v) if tau2 > 0 else np.zeros_like(v)
    return np.maximum(0.0, phi0 + weight * (phi_hat - phi0)), phi0


PLATFORM_NB_PARAMS = ("platform_effects", "per_gene_dispersion", "variance", "n_iter", "tol", "dispersion_spots", "block_size")


def run_platform_nb(
    Y: sp.csr_matrix,
    ref: DeconvolutionReference,
    *,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    **_: Any,
) -> MethodResult:
    """Platform-normalised negative-binomial regression of every spot on the reference's mean profiles.

    1. Profiles S (K × G): per-class mean counts per cell, so the weights are numbers of cells.
    2. Platform effects, as RCTD's ``fitBulk``: the pseudo-bulk of all spots is fitted with S
       (Poisson), and each gene's profile is rescaled by observed / fitted bulk — a gene the spatial
       assay detects 5× better than scRNA-seq gets 5× its reference expression.
    3. A Poisson fit of the spots (of a seeded sample of 20,000 when there are more) gives each
       gene's overdispersion by the method of moments, φ̂_g = Σ((y−λ)² − y) / Σλ², shrunk towards the
       all-gene value by normal–normal empirical Bayes (:func:`shrunk_dispersion`: the noisier φ̂_g,
       the stronger the pull); genes that vary beyond their mean from spot to spot then count less.
    4. The NB fit of every spot with those φ_g; proportions = weights / their sum.

    ``method_params``: ``platform_effects`` (True), ``per_gene_dispersion`` (True; False = one φ for
    all genes), ``variance`` ("nb"; "reference" = the variance of a sum of cells from the reference's
    own per-class variances instead of φ), ``n_iter`` (300), ``tol`` (1e-4, largest change of a
    spot's proportions in an iteration), ``dispersion_spots`` (20,000), ``block_size`` (10,000).
    All measured in docs/deconvolution.md.
    """
    p = dict(params or {})
    unknown = sorted(set(p) - set(PLATFORM_NB_PARAMS))
    if unknown:
        raise DeconvolutionInputError(f"platform_nb: unknown method parameter(s) {unknown}; it takes {list(PLATFORM_NB_PARAMS)}")
    n_iter = int(p.get("n_iter", 300))
    tol = float(p.get("tol", 1e-4))
    block = int(p.get("block_size", 10_000))
    platform = bool(p.get("platform_effects", True))
    per_gene = bool(p.get("per_gene_dispersion", True))
    variance = str(p.get("variance", "nb"))
    if variance not in ("nb", "reference"):
        raise DeconvolutionInputError(f"platform_nb: variance must be 'nb' or 'reference', got {variance!r}")
    S_full = ref.mean_profiles()
    ysum = np.asarray(Y.sum(axis=0)).ravel().astype(np.float64)
    genes = np.flatnonzero((S_full.sum(axis=0) > 0) & (ysum > 0))
    n, K = Y.shape[0], S_full.shape[0]
    W_out = np.zeros((n, K))
    info: dict[str, Any] = {
        "n_genes_used": int(genes.size),
        "platform_effects": platform,
        "per_gene_dispersion": per_gene,
        "variance": variance,
    }
    if genes.size == 0:
        return MethodResult(W_out, np.zeros(n, dtype=bool), info, "cells")
    S = S_full[:, genes]
    Yg = sp.csr_matrix(Y[:, genes], dtype=np.float64)
    Yg.sum_duplicates()
    factor = np.ones(S_full.shape[1])
    if platform:
        yb = ysum[genes][None, :]
        b0 = np.full((1, K), ysum[genes].sum() / S.sum())
        b, _ = _mu_fit(yb, S, b0, phi=None, n_iter=20_000, tol=1e-10, dtype=np.float64)
        f = ysum[genes] / np.maximum((b @ S)[0], 1e-300)
        S = S * f[None, :]
        factor[genes] = f
        info["platform_factor_quantiles"] = np.quantile(f / np.median(f), [0.05, 0.5, 0.95])
    totals = np.asarray(Yg.sum(axis=1)).ravel()
    has = totals > 0
    W_out[:] = (totals / S.sum())[:, None]
    # dispersion from a Poisson fit of (a seeded sample of) the spots: per-gene moments need no more
    n_disp = int(p.get("dispersion_spots", 20_000))
    sub = np.flatnonzero(has)
    if sub.size > n_disp:
        sub = np.sort(np.random.default_rng(seed).choice(sub, size=n_disp, replace=False))
    moments = np.zeros((5, genes.size))
    iters = []
    for start in range(0, sub.size, block):
        rows = sub[start : start + block]
        Yb = Yg[rows].toarray()
        W_out[rows], it = _mu_fit(Yb, S, W_out[rows], phi=None, n_iter=n_iter, tol=tol)
        iters.append(it)
        moments += _dispersion_moments(Yb, W_out[rows], S)
    phi, phi_all = shrunk_dispersion(moments, "eb" if per_gene else "global")
    excess = None
    if variance == "reference":
        ex = ref.excess_variance()[:, genes]
        excess = ex * (factor[genes] ** 2)[None, :]
    info["dispersion_all_genes"] = phi_all
    info["dispersion_quantiles"] = np.quantile(phi, [0.05, 0.5, 0.95])
    info["dispersion_spots"] = int(sub.size)
    nb = phi if (phi > 0).any() and excess is None else None
    if nb is not None or excess is not None or sub.size < n:
        for start in range(0, n, block):
            stop = min(start + block, n)
            W_out[start:stop], it = _mu_fit(Yg[start:stop].toarray(), S, W_out[start:stop], phi=nb, n_iter=n_iter, tol=tol, excess=excess)
            iters.append(it)
    info["max_iterations_used"] = int(max(iters, default=0))
    info["n_iter"], info["tol"] = n_iter, tol
    W_out[~has] = 0.0
    res = MethodResult(_normalise_rows(W_out), has & (W_out.sum(axis=1) > 0), info, "cells")
    res.profiles = S_full * factor[None, :]
    return res


# ----------------------------------------------------------------------------------- FlashDeconv


def run_flashdeconv(
    Y: sp.csr_matrix, ref: DeconvolutionReference, *, coords: np.ndarray, seed: int = 0, params: Mapping[str, Any] | None = None, **_: Any
) -> MethodResult:
    """FlashDeconv on the spots with counts; its spatial graph is its own k-NN over ``coords``."""
    from flashdeconv import FlashDeconv

    import inspect

    kw: dict[str, Any] = {"random_state": int(seed), "verbose": False}
    allowed = set(inspect.signature(FlashDeconv.__init__).parameters) - {"self"}
    unknown = sorted(set(params or {}) - allowed)
    if unknown:
        raise DeconvolutionInputError(f"flashdeconv: unknown method parameter(s) {unknown}; FlashDeconv takes {sorted(allowed)}")
    kw.update(dict(params or {}))
    has = np.asarray(Y.sum(axis=1)).ravel() > 0
    W = np.zeros((Y.shape[0], len(ref.classes)))
    model = FlashDeconv(**kw)
    if has.sum() >= 2:
        W[has] = model.fit_transform(Y[has], ref.mean_profiles(), np.asarray(coords, dtype=np.float64)[has])
    used = {k: v for k, v in kw.items() if k != "verbose"}
    used["lambda_used"] = float(getattr(model, "lambda_used_", np.nan))
    used["converged"] = bool((model.info_ or {}).get("converged", False)) if model.info_ else False
    return MethodResult(_normalise_rows(W), has & (W.sum(axis=1) > 0), used, AS_RETURNED)


# ------------------------------------------------------------------------------------------ RCTD


def _rctd_imports() -> Any:
    try:
        import rctd  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:  # optional extra
        raise DeconvolutionInputError(
            "method 'rctd' needs rctd-py and torch (pip install 'spatial_assets[rctd]')"
        ) from exc
    import rctd

    return rctd


def _choose_sigma(obj: Any, tables: Any, config: Any) -> tuple[int, int]:
    """rctd-py's ``choose_sigma``, given the tables of a ±8-step window around the current σ.

    ``choose_sigma`` only scores the σ values it has tables for, so it is called on a window and
    called again around its answer while that answer sits on the window's edge: the same fixed
    point spacexr reaches with all 126 tables, computed for ~20 of them.
    """
    from rctd._sigma import SIGMA_ALL, choose_sigma

    all_s = [int(s) for s in SIGMA_ALL]
    current, rounds = 100, 0
    while True:
        i = all_s.index(current)
        window = all_s[max(0, i - 8) : i + 9]
        q = tables.tables(window)
        sq = {k: tables.spline(int(k)) for k in q}
        best = int(
            choose_sigma(
                spatial_counts=obj.counts,
                spatial_numi=obj.nUMI,
                norm_profiles=obj.norm_profiles,
                q_matrices=q,
                x_vals=tables.x_vals,
                sigma_init=current,
                min_umi=config.UMI_min_sigma,
                n_fit=config.N_fit,
                n_epoch=config.N_epoch,
                k_val=tables.k_val,
                sq_matrices=sq,
                device="cpu",
            )
        )
        rounds += 1
        edge = best in (window[0], window[-1]) and best not in (all_s[0], all_s[-1])
        if best == current or not edge or rounds >= 6:
            return best, rounds
        current = best


def _fit_platform_effects(obj: Any, tables: Any, sigma100: int | None = None) -> dict[str, Any]:
    """rctd-py 0.4.0 ``RCTD.fit_platform_effects`` with the likelihood tables from :mod:`.rctd_tables`.

    Steps as in rctd-py (and spacexr ``create.RCTD`` / ``fitBulk`` / ``choose_sigma_c``): DE gene
    lists for the bulk fit and for the per-spot fit, the ``counts_MIN`` spot filter, the bulk
    platform-effect fit and the renormalised profiles, then σ.
    """
    import torch
    from rctd._normalize import fit_bulk

    config = obj.config
    ref = obj.reference
    common = obj.common_genes
    common_idx = {g: i for i, g in enumerate(common)}
    bulk_common = obj.counts.sum(axis=0)
    bulk_full = np.zeros(ref.n_genes, dtype=np.float32)
    ref_pos = {g: i for i, g in enumerate(ref.gene_names)}
    for g in common:
        bulk_full[ref_pos[g]] = bulk_common[common_idx[g]]
    genes_bulk = ref.get_de_genes(spatial_bulk=bulk_full, fc_thresh=config.fc_cutoff, expr_thresh=config.gene_cutoff, min_obs=config.MIN_OBS)
    genes_reg = ref.get_de_genes(spatial_bulk=bulk_full, fc_thresh=config.fc_cutoff_reg, expr_thresh=config.gene_cutoff_reg, min_obs=config.MIN_OBS)
    if len(genes_bulk) < 10:
        genes_bulk = common
    if len(genes_reg) < 10:
        genes_reg = genes_bulk
    genes_bulk = sorted(set(genes_bulk) & set(common))
    genes_reg = sorted(set(genes_reg) & set(genes_bulk))
    bulk_idx = [common_idx[g] for g in genes_bulk]
    bulk_counts = obj.counts[:, bulk_idx]
    if config.counts_MIN > 0:
        ok = bulk_counts.sum(axis=1) >= config.counts_MIN
        if not ok.all():
            obj.counts, obj.nUMI, bulk_counts = obj.counts[ok], obj.nUMI[ok], bulk_counts[ok]
            true_idx = np.flatnonzero(obj._pixel_mask)
            obj._pixel_mask[true_idx[~ok]] = False
    if obj.counts.shape[0] == 0:
        raise DeconvolutionInputError(f"rctd: no spot has {config.counts_MIN} counts on the {len(genes_bulk)} genes of the bulk fit")
    dev = torch.device("cpu")
    _, norm_bulk = fit_bulk(
        cell_type_profiles=torch.tensor(ref.get_profiles_for_genes(genes_bulk), device=dev),
        spatial_counts=torch.tensor(bulk_counts, device=dev),
        spatial_nUMI=torch.tensor(obj.nUMI, device=dev),
        min_change=config.MIN_CHANGE_BULK,
    )
    norm_bulk = norm_bulk.cpu().numpy()
    pos_bulk = {g: i for i, g in enumerate(genes_bulk)}
    obj.norm_profiles = norm_bulk[[pos_bulk[g] for g in genes_reg]]
    obj.counts = obj.counts[:, [common_idx[g] for g in genes_reg]]
    obj._gene_list_bulk, obj._gene_list_reg = genes_bulk, genes_reg
    obj.x_vals = tables.x_vals
    if sigma100 is None:
        sigma, rounds = _choose_sigma(obj, tables, config)
    else:  # rctd-py's sigma_override: 100 × σ, e.g. from an R run (round(100 * myRCTD@internal_vars$sigma))
        sigma, rounds = int(sigma100), 0
    obj.sigma = sigma
    obj.q_mat = tables.get(sigma)
    obj.sq_mat = tables.spline(sigma)
    obj.is_normalized = True
    return {"sigma": sigma / 100.0, "sigma_rounds": rounds, "n_genes_bulk": len(genes_bulk), "n_genes_reg": len(genes_reg)}


def run_rctd(
    Y: sp.csr_matrix,
    ref: DeconvolutionReference,
    *,
    Y_all: sp.csr_matrix,
    genes_all: list[str],
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    **_: Any,
) -> MethodResult:
    """RCTD full mode on all spots with counts; ``Y_all`` (all panel genes) gives each spot's nUMI, as in spacexr."""
    rctd = _rctd_imports()
    import pandas as pd
    import torch
    from anndata import AnnData
    from rctd._full import run_full_mode

    from spatial_assets.deconvolution.rctd_tables import K_VAL_MAX, QTables

    p = dict(params or {})
    cache_dir = p.pop("table_dir", None)
    n_threads = p.pop("n_threads", None)
    batch_size = int(p.pop("batch_size", 10_000))
    sigma100 = p.pop("sigma", None)
    numi = np.asarray(Y_all.sum(axis=1)).ravel()
    umi_min = float(p.pop("UMI_min", 1))
    fit_numi = numi[numi >= umi_min]
    if fit_numi.size == 0:
        raise DeconvolutionInputError(f"rctd: no spot has at least {umi_min:g} counts")
    # sigma is estimated on spots above 300 counts (spacexr); on sparse bins use the best-covered half
    sigma_min = float(p.pop("UMI_min_sigma", min(300.0, float(np.median(fit_numi)))))
    max_count = int(Y.max()) if Y.nnz else 1
    k_val = int(p.pop("K_val", min(K_VAL_MAX, max(max_count, 10))))
    cfg_kw: dict[str, Any] = dict(compile=False, device="cpu", UMI_min=umi_min, counts_MIN=1, UMI_min_sigma=sigma_min, K_val=k_val)
    unknown = sorted(set(p) - set(rctd.RCTDConfig._fields))
    if unknown:
        raise DeconvolutionInputError(
            f"rctd: unknown method parameter(s) {unknown}; RCTDConfig fields are {list(rctd.RCTDConfig._fields)} "
            "(plus table_dir, n_threads, batch_size, sigma)"
        )
    cfg_kw.update(p)
    config = rctd.RCTDConfig(**cfg_kw)

    ref_ad = AnnData(
        X=ref.counts,
        obs=pd.DataFrame({"cell_type": pd.Categorical(ref.labels, categories=ref.classes)}, index=[str(i) for i in range(len(ref.labels))]),
        var=pd.DataFrame(index=pd.Index(ref.genes)),
    )
    spatial = AnnData(X=Y_all, var=pd.DataFrame(index=pd.Index(genes_all)))
    spatial.obs_names = [str(i) for i in range(spatial.n_obs)]
    tables = QTables(k_val, cache_dir=cache_dir)
    out = io.StringIO()
    prev_threads = torch.get_num_threads()
    if n_threads:
        torch.set_num_threads(int(n_threads))
    try:
        torch.manual_seed(int(seed))
        with contextlib.redirect_stdout(out):
            R = rctd.Reference(ref_ad, "cell_type", cell_min=int(ref.record.get("min_cells_per_type", 5)), n_max_cells=10**9, min_UMI=1)
            obj = rctd.RCTD(spatial, R, config)
            fit_info = _fit_platform_effects(obj, tables, None if sigma100 is None else int(sigma100))
            res = run_full_mode(
                spatial_counts=obj.counts.astype(np.float64),
                spatial_numi=obj.nUMI.astype(np.float64),
                norm_profiles=obj.norm_profiles.astype(np.float64),
                cell_type_names=list(R.cell_type_names),
                q_mat=obj.q_mat,
                sq_mat=obj.sq_mat,
                x_vals=tables.x_vals,
                batch_size=batch_size,
                device="cpu",
                pixel_mask=obj._pixel_mask,
            )
    finally:
        torch.set_num_threads(prev_threads)
        for line in out.getvalue().splitlines():
            logger.debug("rctd: %s", line)
    names = [str(c) for c in res.cell_type_names]
    W = np.zeros((Y.shape[0], len(ref.classes)))
    rows = np.flatnonzero(res.pixel_mask)
    col = {c: i for i, c in enumerate(ref.classes)}
    weights = np.clip(np.asarray(res.weights, dtype=np.float64), 0, None)
    for j, name in enumerate(names):
        W[rows, col[name]] = weights[:, j]
    fitted = np.zeros(Y.shape[0], dtype=bool)
    fitted[rows] = True
    fitted &= W.sum(axis=1) > 0
    used = {
        "mode": "full",
        "UMI_min": umi_min,
        "UMI_min_sigma": sigma_min,
        "K_val": k_val,
        "n_tables_computed": tables.n_computed,
        "n_converged": int(np.asarray(res.converged).sum()),
        **fit_info,
        **{k: v for k, v in p.items()},
    }
    return MethodResult(_normalise_rows(W), fitted, used, "transcripts")


RUNNERS: dict[str, Callable[..., MethodResult]] = {
    "platform_nb": run_platform_nb,
    "rctd": run_rctd,
    "flashdeconv": run_flashdeconv,
    "nnls": run_nnls,
}
