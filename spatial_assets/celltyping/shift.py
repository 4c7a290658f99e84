"""A measured platform-shift index between a reference and a query (no classifier involved).

Why: query alignment and strong shrinkage help across platforms (scRNA-seq → imaging) and cost
4–13 points when there is no shift; a likelihood test between the two alignments picked the
recentred one even without a shift (it fits 2G parameters on the query itself and compared
densities in different coordinates). What separates the cases is whether the query's per-gene
*spread* is what the reference would have at the query's composition:

1. composition: least squares on the simplex of the query's per-gene means against the
   reference's per-class means (``min ||M.T pi - m||²``, ``pi >= 0``, ``sum pi = 1``);
2. index: median over genes of ``|log(query sd / sd of the reference mixture at pi)|``, the mixture
   sd including the between-class spread (``sum pi (var_k + mu_k²) - (sum pi mu_k)²``).

Measured and not used (docs/celltyping.md): discounting each gene's sampling noise (``var(log sd)
≈ (kurtosis - 1) / 4n``) removed the signal of a mild simulated platform effect, which lives in the
sparsely detected genes, more than the slice-to-slice differences of same-platform pairs; the
median standardised residual of the composition fit (``mean_index``, still recorded) does not
separate the cases either.

A composition change alone moves the means and the mixture sd together (the index stays near
0); a platform effect (per-gene detection efficiency, depth) rescales genes independently of the
classes, so the ratio moves gene by gene. Everything is computed in the model's own space
(log1p-10k over the model genes, standardised by the training scaler); the ratio of sds does not
depend on the per-gene scaling, the composition fit weights genes in standardised units.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: index above which a query is treated as coming from another platform. Chosen from the
#: separation measured on every shift/no-shift task of benchmarks/bench_generality.py (the
#: geometric midpoint of the largest same-platform and the smallest shifted value; see
#: docs/celltyping.md), not from one dataset.
SHIFT_INDEX_THRESHOLD = 0.1
#: below this many query cells the per-gene sd is too noisy to measure a shift (not attempted)
MIN_CELLS_FOR_INDEX = 50
#: sd floor in standardised units (the reference's overall sd of every gene is 1): a gene never
#: detected in the query then counts as a large ratio instead of an infinite one
SD_FLOOR = 0.01


def composition_from_means(class_means: np.ndarray, query_mean: np.ndarray) -> np.ndarray:
    """Class proportions ``pi`` (on the simplex) whose mixture mean best matches ``query_mean``."""
    from scipy.optimize import nnls

    M = np.asarray(class_means, dtype=np.float64)  # (K, G)
    m = np.asarray(query_mean, dtype=np.float64)
    K, G = M.shape
    # the sum-to-one constraint as a heavily weighted extra equation (exact in the limit)
    lam = 1e3 * max(1.0, float(np.abs(M).max())) * np.sqrt(G)
    A = np.vstack([M.T, np.full((1, K), lam)])
    b = np.concatenate([m, [lam]])
    pi, _ = nnls(A, b, maxiter=50 * K)
    s = pi.sum()
    return pi / s if s > 0 else np.full(K, 1.0 / K)


def dispersion_shift_index(
    class_means: np.ndarray,
    class_vars: np.ndarray,
    query_mean: np.ndarray,
    query_sd: np.ndarray,
    *,
    sd_floor: float = SD_FLOOR,
) -> dict[str, Any]:
    """The composition-adjusted dispersion index (module docstring) and what it was computed from.

    All inputs are in the same standardised space. Genes with no spread in the reference
    (every class constant) carry no information and are left out.
    """
    M = np.asarray(class_means, dtype=np.float64)
    V = np.asarray(class_vars, dtype=np.float64)
    pi = composition_from_means(M, query_mean)
    mix_mean = pi @ M
    mix_var = np.maximum(pi @ (V + M**2) - mix_mean**2, 0.0)
    ref_spread = (V.max(axis=0) > 0) | (np.ptp(M, axis=0) > 0)
    sd_mix = np.maximum(np.sqrt(mix_var), sd_floor)
    sd_q = np.maximum(np.asarray(query_sd, dtype=np.float64), sd_floor)
    d = np.log(sd_q / sd_mix)[ref_spread]
    if d.size == 0:
        return {"index": float("nan"), "mean_index": float("nan"), "n_genes": 0, "composition": pi}
    resid = ((np.asarray(query_mean, dtype=np.float64) - mix_mean) / sd_mix)[ref_spread]
    return {
        "index": float(np.median(np.abs(d))),
        "mean_index": float(np.median(np.abs(resid))),
        "median_log_sd_ratio": float(np.median(d)),
        "n_genes": int(d.size),
        "composition": pi,
    }
