"""Expression-threshold classification: call cells positive/negative for a marker (set).

Used where no reference atlas exists, and to validate reference-based calls with markers that
biologists trust. Only the marker columns are ever materialised densely, so it scales to any
number of cells.

Expression scale
----------------
Metagenes are computed on **linear-scale** expression that is comparable between cells:
depth-normalised counts (e.g. CP10k), per-volume MERFISH values, or raw counts (fine for on/off
markers; library size then adds spread). If the chosen matrix is log1p data (``log_input=True``,
or auto-detected: ``uns['log1p']`` for ``X``, else ``normalization.detect_normalization``), the
marker columns are ``expm1``-ed back first. So the usual pipeline output (``X`` = log1p of 10k
normalised counts, raw counts in ``layers['counts']``) works with ``layer=None``. ``target_sum``
optionally depth-normalises a raw-count matrix on the fly (row totals come from the sparse
matrix without densifying it).

Thresholds
----------
``gmm``: 2-component Gaussian mixture on the score (on ``log(score + pseudocount)`` for the two
mean metagenes; the first-PC score already lives on a standardised log scale), seeded, best of
3 initialisations. The component with the larger mean is "positive"; a cell is positive when its
(monotonised, see :func:`_gmm_probability`) posterior of that component is ≥ ``posterior_cutoff``.
When ≥ 20 % of cells share the lowest score and the negative component collapses onto them, the
split is effectively "detected vs not": a :class:`ZeroInflationWarning` says so and
``uns[...]['zero_spike']`` records it.

``ks``: for zero-inflated markers, where a Gaussian mixture spends one component on the spike of
zeros and lumps low-level background together with true positives. Cells in which no marker is
detected are negative (probability 0). Among detected cells, on log(score) (mean metagenes:
scores are > 0 there, and low-level background is roughly log-normal, i.e. symmetric on this
scale, which the fit below needs; the first-PC score is used as is), a unimodal *null*
(background) reference N(m, s) is fitted: m is the lowest kernel-density peak at least 25 % as
tall as the tallest, s the root mean square deviation of the cells *below* m (a half-normal fit,
so the positive tail cannot inflate it), floored at the kernel bandwidth. The cutoff is ``t* = argmax_t F_null(t) − F_emp(t)``, a
one-sided Kolmogorov–Smirnov distance. Because ``F_emp = π0·F_null + π1·F_pos``, this equals
``π1·(F_null − F_pos)``: t* maximises Youden's J (specificity + sensitivity − 1), i.e. it is where
the background and positive densities cross. If that distance is not significant (below the KS
critical value at α = 0.01) the detected cells form one population and are all called positive:
detection itself is then the signal. Probability = logistic((y − t_mid)/s), t_mid halfway
between t* and the next observed value, so probability > 0.5 exactly for positives;
``posterior_cutoff`` is not used by ``ks``. Measured limit: a marker whose background is a long
left tail rather than a separate mode (Mbp in the bundled MERFISH data) gets no split, so every
detected cell is called positive.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.mixture import GaussianMixture

from spatial_assets.core.normalization import detect_normalization

METAGENES = ("shifted_geometric_mean", "arithmetic_mean", "first_pc")
METHODS = ("gmm", "ks")
POSITIVE = "positive"
NEGATIVE = "negative"
UNS_KEY = "threshold_classification"

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_KS_C_ALPHA_001 = 1.628  # one-sample KS critical constant, alpha = 0.01


class ThresholdInputError(ValueError):
    """The AnnData or the arguments cannot be used for threshold classification."""


class MissingMarkerError(ThresholdInputError):
    """Marker genes are not in ``var_names`` (or the requested symbol column)."""


class ZeroInflationWarning(UserWarning):
    """The GMM spent a component on the spike of non-detected cells; ``method='ks'`` fits better."""


def classify_by_threshold(
    adata: ad.AnnData,
    markers: str | Sequence[str],
    *,
    prefix: str | None = None,
    metagene: str = "shifted_geometric_mean",
    method: str = "gmm",
    posterior_cutoff: float = 0.3,
    layer: str | None = None,
    pseudocount: float = 1.0,
    seed: int = 0,
    log_input: bool | None = None,
    target_sum: float | None = None,
    gene_symbols: str | None = None,
) -> ad.AnnData:
    """Return a copy of ``adata`` with obs ``{prefix}_score/_probability/_cluster``.

    ``prefix`` defaults to the markers joined by '_'. ``gene_symbols`` names a var column to
    look markers up in (CellxGene files keep Ensembl ids in ``var_names``). Parameters of the
    fit go to ``uns['threshold_classification'][prefix]`` so the call can be audited.
    """
    marker_list = [markers] if isinstance(markers, str) else list(markers)
    if not marker_list or not all(isinstance(m, str) and m for m in marker_list):
        raise ThresholdInputError(f"markers must be a non-empty gene name or list of names, got {markers!r}")
    if len(set(marker_list)) != len(marker_list):
        raise ThresholdInputError(f"markers contain duplicates: {marker_list}")
    if metagene not in METAGENES:
        raise ThresholdInputError(f"metagene must be one of {METAGENES}, got {metagene!r}")
    if method not in METHODS:
        raise ThresholdInputError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 < posterior_cutoff < 1.0:
        raise ThresholdInputError(f"posterior_cutoff must be in (0, 1), got {posterior_cutoff}")
    if not pseudocount > 0:
        raise ThresholdInputError(f"pseudocount must be > 0, got {pseudocount}")
    if adata.n_obs < 2:
        raise ThresholdInputError(f"need at least 2 cells to fit a threshold, got {adata.n_obs}")
    prefix = prefix if prefix is not None else "_".join(marker_list)

    matrix = _matrix(adata, layer)
    idx = _marker_indices(adata, marker_list, gene_symbols)
    is_log = _detect_log(adata, matrix, layer) if log_input is None else bool(log_input)
    if target_sum is not None and is_log:
        raise ThresholdInputError(
            f"target_sum needs a linear-scale matrix, but {_where(layer)} holds log1p data; "
            "use the raw-count layer or drop target_sum"
        )
    expr = _dense_columns(matrix, idx)
    if is_log:
        expr = np.expm1(expr)
    if target_sum is not None:
        totals = _row_totals(matrix)
        with np.errstate(divide="ignore", invalid="ignore"):
            expr = np.where(totals[:, None] > 0, expr / totals[:, None] * target_sum, 0.0)
    if not np.isfinite(expr).all():
        raise ThresholdInputError(f"non-finite values in marker columns {marker_list} of {_where(layer)}")
    if (expr < 0).any():
        bad = [marker_list[j] for j in np.flatnonzero((expr < 0).any(axis=0))]
        raise ThresholdInputError(
            f"negative expression for {bad} in {_where(layer)}: expected counts, normalised counts or log1p "
            "values, not scaled/centred data"
        )

    score, fit_values, log_scale = _metagene(expr, metagene, pseudocount)
    detected = (expr > 0).any(axis=1)
    if method == "gmm":
        probability, positive, info = _gmm_threshold(fit_values, posterior_cutoff, seed)
    else:
        # among detected cells the mean scores are > 0, so plain log(score) is used: background
        # expression is roughly log-normal, symmetric there, which the half-normal null fit needs
        # (log(score + pseudocount) squeezes its left side and the null comes out too narrow)
        ks_values = fit_values if not log_scale else np.log(np.where(detected, score, 1.0))
        probability, positive, info = _ks_threshold(ks_values, detected)

    out = adata.copy()
    out.obs[f"{prefix}_score"] = score.astype(np.float64)
    out.obs[f"{prefix}_probability"] = probability.astype(np.float64)
    out.obs[f"{prefix}_cluster"] = pd.Categorical(
        np.where(positive, POSITIVE, NEGATIVE), categories=[NEGATIVE, POSITIVE]
    )
    record: dict[str, Any] = {
        "markers": marker_list,
        "metagene": metagene,
        "method": method,
        "layer": layer if layer is not None else "X",
        "log_input": is_log,
        "target_sum": target_sum,
        "pseudocount": pseudocount,
        # "cutoff" below is on this scale; "score_cutoff" is the lowest score called positive
        "fit_scale": ("log(score + pseudocount)" if method == "gmm" else "log(score)") if log_scale else "score",
        "score_cutoff": float(score[positive].min()) if positive.any() else None,
        "posterior_cutoff": posterior_cutoff if method == "gmm" else None,
        "seed": seed,
        "n_positive": int(positive.sum()),
        **info,
    }
    uns = dict(out.uns.get(UNS_KEY, {}))
    uns[prefix] = record
    out.uns[UNS_KEY] = uns
    return out


# ---------------------------------------------------------------- input helpers


def _where(layer: str | None) -> str:
    return "X" if layer is None else f"layers[{layer!r}]"


def _matrix(adata: ad.AnnData, layer: str | None) -> Any:
    if layer is None:
        if adata.X is None:
            raise ThresholdInputError("adata.X is empty; pass layer=")
        return adata.X
    if layer not in adata.layers:
        raise ThresholdInputError(f"layer {layer!r} not found; available layers: {list(adata.layers)}")
    return adata.layers[layer]


def _marker_indices(adata: ad.AnnData, markers: list[str], gene_symbols: str | None) -> np.ndarray:
    if gene_symbols is not None:
        if gene_symbols not in adata.var.columns:
            raise ThresholdInputError(
                f"var column {gene_symbols!r} (gene_symbols) not found; var columns: {list(adata.var.columns)}"
            )
        names = pd.Index(adata.var[gene_symbols].astype(str))
        where = f"var[{gene_symbols!r}]"
    else:
        names = pd.Index(adata.var_names.astype(str))
        where = "var_names"
    missing = [m for m in markers if m not in names]
    if missing:
        raise MissingMarkerError(_missing_message(adata, names, where, missing))
    positions = []
    for m in markers:
        loc = names.get_indexer_for([m])
        positions.append(int(loc[0]))  # first occurrence if a symbol is duplicated
    return np.asarray(positions, dtype=np.int64)


def _missing_message(adata: ad.AnnData, names: pd.Index, where: str, missing: list[str]) -> str:
    msg = f"marker genes not found in {where}: {missing}"
    sample = [str(n) for n in names[:200]]
    n_ens = sum(bool(_ENSEMBL_RE.match(s)) for s in sample)
    if sample and n_ens / len(sample) > 0.5:
        msg += f" ({where} look like Ensembl ids, e.g. {sample[0]!r}, not gene symbols"
        cols = [c for c in adata.var.columns if adata.var[c].dtype == object or isinstance(adata.var[c].dtype, pd.CategoricalDtype)]
        if cols:
            msg += f"; pass gene_symbols= one of the var columns {cols}"
        msg += ")"
    elif sample:
        msg += f" ({where} look like gene symbols, e.g. {sample[0]!r})"
    lower = {s.lower(): s for s in names.astype(str)}
    hints = {m: lower[m.lower()] for m in missing if m.lower() in lower}
    if hints:
        msg += f"; case-insensitive matches: {hints} (mouse symbols are Title-case, human UPPER-case)"
    return msg


def looks_log_transformed(adata: ad.AnnData, layer: str | None = None) -> bool:
    """Whether ``X`` (or ``layer``) holds log1p data, so it can be ``expm1``-ed back to linear.

    ``uns['log1p']`` (scanpy's marker) for ``X``, else the scale measured by
    :func:`spatial_assets.core.normalization.detect_normalization` on a row sample.
    """
    return _detect_log(adata, _matrix(adata, layer), layer)


def _detect_log(adata: ad.AnnData, matrix: Any, layer: str | None) -> bool:
    if layer is None and "log1p" in adata.uns:
        return True
    probe = adata if layer is None else ad.AnnData(X=matrix)  # no copy: AnnData wraps the matrix
    return detect_normalization(probe).x_state.startswith("log1p")


def _dense_columns(matrix: Any, idx: np.ndarray) -> np.ndarray:
    sub = matrix[:, idx]
    if sp.issparse(sub):
        sub = sub.toarray()
    return np.asarray(sub, dtype=np.float64).reshape(matrix.shape[0], len(idx))


def _row_totals(matrix: Any) -> np.ndarray:
    return np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()


# ---------------------------------------------------------------- metagenes


def _metagene(expr: np.ndarray, metagene: str, pseudocount: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """Return (score, values the threshold is fitted on, whether those are log(score + pc))."""
    if metagene == "shifted_geometric_mean":
        score = np.exp(np.log(expr + pseudocount).mean(axis=1)) - pseudocount
        return score, np.log(score + pseudocount), True
    if metagene == "arithmetic_mean":
        score = expr.mean(axis=1)
        return score, np.log(score + pseudocount), True
    # first principal component of log-scaled, standardised markers
    z = np.log(expr + pseudocount)
    sd = z.std(axis=0)
    if np.any(sd == 0):
        raise ThresholdInputError("first_pc metagene: a marker is constant across cells, cannot standardise it")
    z = (z - z.mean(axis=0)) / sd
    if z.shape[1] == 1:
        score = z[:, 0]
    else:
        _, _, vt = np.linalg.svd(z, full_matrices=False)
        loading = vt[0]
        if loading.sum() < 0:  # sign is arbitrary in SVD; make higher = more marker expression
            loading = -loading
        score = z @ loading
    return score, score, False


# ---------------------------------------------------------------- thresholds


def _gmm_threshold(y: np.ndarray, posterior_cutoff: float, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    if np.ptp(y) == 0:
        raise ThresholdInputError("the marker score is identical in every cell; nothing to threshold")
    gmm = GaussianMixture(n_components=2, random_state=seed, n_init=3, reg_covar=1e-4 * max(float(np.var(y)), 1e-12))
    gmm.fit(y.reshape(-1, 1))
    means = gmm.means_.ravel()
    hi = int(np.argmax(means))
    post = gmm.predict_proba(y.reshape(-1, 1))[:, hi]
    probability = _gmm_probability(y, post)
    positive = probability >= posterior_cutoff
    sd = np.sqrt(gmm.covariances_.ravel())
    at_min = float(np.mean(y == y.min()))
    spike = bool(sd[1 - hi] < 0.05 * sd[hi] and at_min >= 0.2)
    if spike:
        warnings.warn(
            f"{at_min:.0%} of cells share the lowest score and the GMM's negative component collapsed onto "
            "them, so the split is 'detected vs not detected'; method='ks' separates background from positives",
            ZeroInflationWarning,
            stacklevel=3,
        )
    info = {
        "zero_spike": spike,
        "component_means": [float(means[1 - hi]), float(means[hi])],
        "component_sds": [float(sd[1 - hi]), float(sd[hi])],
        "component_weights": [float(gmm.weights_[1 - hi]), float(gmm.weights_[hi])],
        "cutoff": float(y[positive].min()) if positive.any() else None,
    }
    return probability, positive, info


def _gmm_probability(y: np.ndarray, post: np.ndarray) -> np.ndarray:
    """Posterior made non-decreasing in the score: p(y) = min over y' ≥ y of posterior(y').

    A wider "high" component also dominates the far *low* tail of a raw mixture, which would call
    the least-expressing cells positive. Taking the running minimum from the top keeps the
    posterior unchanged above the valley and removes that artefact.
    """
    order = np.argsort(y, kind="stable")
    running = np.minimum.accumulate(post[order][::-1])[::-1]
    # tied scores must get one value: take the value of the last (highest-ranked) tie
    ys = y[order]
    last_of_tie = np.searchsorted(ys, ys, side="right") - 1
    out = np.empty_like(post)
    out[order] = running[last_of_tie]
    return out


def _ks_threshold(y: np.ndarray, detected: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    probability = np.zeros(y.shape[0], dtype=np.float64)
    positive = np.zeros(y.shape[0], dtype=bool)
    yd = y[detected]
    info: dict[str, Any] = {"n_detected": int(detected.sum())}
    if yd.size == 0:
        info.update(cutoff=None, ks_distance=0.0, ks_critical=None, null_mode=None, null_sd=None)
        return probability, positive, info
    if yd.size < 3 or np.ptp(yd) == 0:
        positive[detected] = True
        probability[detected] = 1.0
        info.update(cutoff=float(yd.min()), ks_distance=0.0, ks_critical=None, null_mode=None, null_sd=None)
        return probability, positive, info

    mode, bandwidth = _lowest_mode(yd)
    below = yd[yd < mode]
    sd = float(np.sqrt(np.mean((below - mode) ** 2))) if below.size >= 10 else 0.0
    sd = max(sd, bandwidth)
    ys = np.sort(yd)
    uniq, tie_counts = np.unique(ys, return_counts=True)
    f_emp = np.cumsum(tie_counts) / ys.size  # P(y <= u) at each unique value u
    f_null = _normal_cdf((uniq - mode) / sd)
    dist = f_null - f_emp
    k = int(np.argmax(dist))
    d_max = float(dist[k])
    critical = _KS_C_ALPHA_001 / np.sqrt(ys.size)
    if d_max > critical and k < uniq.size - 1:
        t_star = float(uniq[k])
        midpoint = 0.5 * (uniq[k] + uniq[k + 1])
        positive = detected & (y > t_star)
    else:  # one population among detected cells: detection is the call
        t_star = float(uniq[0]) - sd
        midpoint = t_star
        positive = detected.copy()
    z = np.clip((yd - midpoint) / sd, -50, 50)
    probability[detected] = 1.0 / (1.0 + np.exp(-z))
    # the logistic is 0.5 only at the midpoint, which no cell sits on; keep prob and call consistent
    info.update(
        cutoff=t_star,
        ks_distance=d_max,
        ks_critical=float(critical),
        null_mode=float(mode),
        null_sd=float(sd),
        split_detected=bool(d_max > critical and k < uniq.size - 1),
    )
    return probability, positive, info


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr

    return ndtr(z)


def _lowest_mode(y: np.ndarray, grid_size: int = 512, min_rel_height: float = 0.25) -> tuple[float, float]:
    """Lowest KDE peak at least ``min_rel_height`` of the tallest: the background population.

    Binned Gaussian KDE (Silverman bandwidth) so it is O(n), deterministic and cheap.
    """
    n = y.size
    iqr = float(np.subtract(*np.percentile(y, [75, 25])))
    spread = min(float(np.std(y)), iqr / 1.34) if iqr > 0 else float(np.std(y))
    bandwidth = 0.9 * spread * n ** (-0.2)
    if bandwidth <= 0:
        bandwidth = float(np.ptp(y)) / 20.0
    lo, hi = float(y.min()) - 3 * bandwidth, float(y.max()) + 3 * bandwidth
    edges = np.linspace(lo, hi, grid_size + 1)
    counts, _ = np.histogram(y, bins=edges)
    step = edges[1] - edges[0]
    half = int(np.ceil(4 * bandwidth / step))
    kernel = np.exp(-0.5 * ((np.arange(-half, half + 1) * step) / bandwidth) ** 2)
    density = np.convolve(counts, kernel, mode="full")[half : half + grid_size]
    centres = 0.5 * (edges[:-1] + edges[1:])
    peaks = np.flatnonzero((density[1:-1] >= density[:-2]) & (density[1:-1] > density[2:])) + 1
    if peaks.size == 0:
        return float(centres[int(np.argmax(density))]), bandwidth
    tall = peaks[density[peaks] >= min_rel_height * density.max()]
    return float(centres[int(tall[0])]), bandwidth
