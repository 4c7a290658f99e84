"""Train a CellTypist-compatible logistic-regression model on the panel genes.

Why not ``celltypist.train``: in celltypist 1.7.1 the default (non-SGD) path passes
``multi_class`` to scikit-learn, which 1.9 removed, and mini-batch SGD underfits small references
and is ~30x slower than a multinomial L-BFGS fit (measured: 2.9 s at 200k cells x 500 genes).
So the model is a StandardScaler + multinomial L-BFGS logistic regression with scikit-learn's exact
objective (mean cross-entropy + ``1 / (2 C n) ||W||^2``, intercept unpenalised), written as
scikit-learn objects in celltypist's own pickle layout (``{'Model', 'Scaler_', 'description'}``) so
that ``celltypist.models.Model.load(path)`` still opens it. The optimisation itself runs here on one
standardised float32 copy of the training matrix (scikit-learn's solver upcasts it to float64 on
every gradient evaluation: 2x the memory and ~4x the time), via ``scipy.optimize`` L-BFGS-B with
scikit-learn's stopping rules. Neither scanpy nor celltypist is imported.

The classifier also carries what annotation needs to decide, per query, whether there is a
platform shift and what to do about it: per-class means and variances of the scaled training data
(the shift index and the composition-aware alignment), a second coefficient set for the shifted
regime (strong shrinkage), and per regime a softmax temperature and a default confidence threshold
from out-of-fold reference predictions; see ``docs/celltyping.md``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from threadpoolctl import threadpool_limits

from spatial_assets.celltyping.calibration import (
    DEFAULT_TARGET_PRECISION,
    coverage_curve,
    fit_temperature,
    nll,
    precision_threshold,
    softmax,
)
from spatial_assets.core import schema
from spatial_assets.storage.objectstore import sha256_file

__all__ = ["fit_temperature", "train_model", "save_model", "load_model", "model_bytes", "TrainedModel"]

MODEL_FORMAT = "spatial_assets.celltypist-lr/1"
AUTO = "auto"
#: L2 penalties per training cell tried by the cross-validation, strongest first (warm starts);
#: both regimes are read off this one walk
CV_GRID_STEP = 2.0
CV_REG_GRID: tuple[float, ...] = tuple(float(f"{0.4 / CV_GRID_STEP**k:.3g}") for k in range(13))  # 0.4 ... 1e-4
#: the smooth score of the walk: held-out NLL after temperature scaling with every class weighted
#: equally (a proper score with a standard error). The shifted regime's one-standard-error rule is
#: read off it; the cell-weighted NLL let large classes decide and cost small-class recall
CV_CRITERION = "held_out_nll_class_balanced"
#: what the same_platform regime maximises: held-out balanced accuracy (recall averaged over classes),
#: i.e. the decisions themselves with every class weighted equally. Without a shift held-out reference
#: cells stand for the query, so the penalty whose decisions are best on them is taken. The NLL minimum
#: stops short of it with many fine classes and a small panel (it pays for every over-confident error,
#: and temperature scaling fixes that afterwards anyway): measured with the alternatives by
#: ``benchmarks/bench_generality.py --reg-sweep``, docs/celltyping.md. Balanced accuracy is a noisy,
#: flat score (label noise, which calls for more shrinkage, hardly moves it), so every value within one
#: standard error of the highest counts as equally good, and among those the lowest CV_CRITERION is
#: taken: the decisions first, within their noise, then the proper score
CV_SELECTION = "held_out_balanced_accuracy"
#: criterion differences below this (nats) are ties; far below any standard error seen (>= 1e-3)
CV_TIE_NATS = 1e-4
#: the grid walk stops once neither the criterion nor the selection score has improved on its best for
#: this many values in a row
CV_PATIENCE = 2
#: classes with fewer training cells are kept but flagged as rare (card / uns)
RARE_CLASS_CELLS = 10
REGIMES = ("same_platform", "shifted")
# float64 temporaries of column statistics are built over row chunks of this many elements (8 MB)
_CHUNK_ELEMENTS = 1_000_000
_PICKLE_PROTOCOL = 4
#: BLAS threads for the L-BFGS fit. Its two products per iteration are small (cells x genes x
#: classes, float32): a second thread does not repay its synchronisation, and with the cores shared
#: the fit was measured 5-10x slower with 2 threads than with 1 (docs/celltyping.md "Threads",
#: benchmarks/bench_threads.py).
FIT_BLAS_THREADS = 1
# variance floor (in scaled units) for the class-conditional Gaussians used to score alignments:
# sparse references often have genes never detected in a class (variance 0).
VAR_FLOOR = 0.05


class TrainingError(ValueError):
    """The training set cannot produce a model (too few classes, missing column, ...)."""


class ModelIntegrityError(ValueError):
    """A model file whose bytes do not match the expected sha256 (refused before unpickling)."""


@dataclass
class TrainedModel:
    """A fitted scaler + classifier and the card describing how it was made."""

    classifier: Any
    scaler: Any
    classes: list[str]
    genes: list[str]
    card: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None

    @property
    def temperature(self) -> float:
        return float(self.card.get("calibration", {}).get("temperature", 1.0))

    @property
    def class_means(self) -> np.ndarray:
        return np.asarray(self.classifier.class_means_, dtype=np.float64)

    @property
    def class_vars(self) -> np.ndarray:
        return np.asarray(self.classifier.class_vars_, dtype=np.float64)

    def regime(self, name: str) -> dict[str, Any]:
        """Card entry of a regime (temperature, threshold, regularisation, why); {} for old models."""
        if name not in REGIMES:
            raise ValueError(f"regime must be one of {REGIMES}, got {name!r}")
        return dict(self.card.get("regimes", {}).get(name, {}))

    def coefficients(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) of a regime: ``coef_`` for same_platform, the shift-path average for shifted."""
        clf = self.classifier
        if name == "shifted" and getattr(clf, "shift_coef_", None) is not None:
            return np.asarray(clf.shift_coef_, dtype=np.float64), np.asarray(clf.shift_intercept_, dtype=np.float64)
        return np.asarray(clf.coef_, dtype=np.float64), np.asarray(clf.intercept_, dtype=np.float64)


def _dense32(X: Any) -> np.ndarray:
    """A new dense float32 array (never a view of the caller's data: it is modified in place)."""
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float32).toarray()
    return np.array(X, dtype=np.float32, copy=True)


def class_logits(clf: Any, Z: np.ndarray) -> np.ndarray:
    """Multinomial logits (cells x classes); binary models get ``[0, s]`` so softmax == predict_proba."""
    s = clf.decision_function(Z)
    if s.ndim == 1:
        return np.column_stack([np.zeros_like(s), s])
    return s


def _versions() -> dict[str, str]:
    from importlib.metadata import version as _pkg_version
    import scipy
    import sklearn

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "anndata": _pkg_version("anndata"),
    }


def _jsonable(obj: Any) -> Any:
    """Best-effort conversion of uns content (numpy scalars/arrays, DataFrames) to JSON types."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, pd.DataFrame):
        return _jsonable(obj.to_dict(orient="records"))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _most_common(values: pd.Series, fallback: str) -> str:
    vals = values.dropna().astype(str)
    vals = vals[vals != ""]
    return str(vals.value_counts().index[0]) if len(vals) else fallback


def _standardize_inplace(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """StandardScaler statistics (float64, two-pass) and ``X`` standardised in place; zero-variance genes keep scale 1."""
    n = X.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(X.shape[1], 1))
    mean = np.zeros(X.shape[1])
    for i in range(0, n, step):
        mean += X[i : i + step].sum(axis=0, dtype=np.float64)
    mean /= n
    var = np.zeros(X.shape[1])
    for i in range(0, n, step):
        var += np.square(X[i : i + step] - mean).sum(axis=0)
    var /= n
    scale = np.sqrt(var)
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0  # as sklearn's _handle_zeros_in_scale
    X -= mean.astype(np.float32)
    X *= (1.0 / scale).astype(np.float32)
    return mean, var, scale


def _fit_multinomial(
    Z: np.ndarray,
    y_idx: np.ndarray,
    n_classes: int,
    l2: float,
    *,
    weights: np.ndarray | None,
    max_iter: int,
    tol: float,
    init: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Minimise ``sum_i w_i CE_i + l2/2 ||W||^2`` (``w`` sums to 1; K=2 uses one logit, as sklearn).

    Z stays float32 (logits and gradients are float32 products, parameters float64); rows with
    weight 0 cost compute but no copy, which is how the calibration fit leaves its held-out cells out.
    """
    from scipy.optimize import minimize

    n, G = Z.shape
    Kp = 1 if n_classes == 2 else n_classes
    w = np.full(n, 1.0 / n) if weights is None else weights
    Y = np.zeros((n, n_classes))
    Y[np.arange(n), y_idx] = 1.0

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W = theta[: Kp * G].reshape(Kp, G)
        b = theta[Kp * G :]
        S = (Z @ W.T.astype(np.float32)).astype(np.float64) + b
        L = np.column_stack([np.zeros(n), S[:, 0]]) if Kp == 1 else S
        m = L.max(axis=1, keepdims=True)
        E = np.exp(L - m)
        tot = E.sum(axis=1, keepdims=True)
        lse = (m + np.log(tot)).ravel()
        loss = float(w @ (lse - L[np.arange(n), y_idx])) + 0.5 * l2 * float(np.sum(W * W))
        R = (E / tot - Y) * w[:, None]
        if Kp == 1:
            R = R[:, 1:]
        gW = (R.T.astype(np.float32) @ Z).astype(np.float64) + l2 * W
        return loss, np.concatenate([gW.ravel(), R.sum(axis=0)])

    theta0 = np.zeros(Kp * G + Kp) if init is None else init
    # sklearn's L-BFGS settings (linear_model._logistic / utils.optimize)
    with threadpool_limits(limits=FIT_BLAS_THREADS, user_api="blas"):
        res = minimize(
            fun,
            theta0,
            method="L-BFGS-B",
            jac=True,
            options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps},
        )
    W = res.x[: Kp * G].reshape(Kp, G)
    return W, res.x[Kp * G :].copy(), int(res.nit)


def _sklearn_objects(
    W: np.ndarray, b: np.ndarray, classes: np.ndarray, C: float, n_iter: int, mean: np.ndarray,
    var: np.ndarray, scale: np.ndarray, n: int, *, seed: int, max_iter: int, tol: float,
) -> tuple[Any, Any]:
    """Fitted LogisticRegression / StandardScaler objects carrying our parameters (celltypist layout)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=tol, random_state=seed)
    clf.classes_ = classes
    clf.coef_ = np.ascontiguousarray(W, dtype=np.float64)
    clf.intercept_ = np.asarray(b, dtype=np.float64)
    clf.n_iter_ = np.array([n_iter], dtype=np.int32)
    clf.n_features_in_ = int(W.shape[1])
    scaler = StandardScaler()
    scaler.mean_ = mean
    scaler.var_ = var
    scaler.scale_ = scale
    scaler.n_samples_seen_ = np.int64(n)
    scaler.n_features_in_ = int(W.shape[1])
    return clf, scaler


def _stratified_folds(y_idx: np.ndarray, n_classes: int, k: int, seed: int) -> np.ndarray:
    """Fold id per cell: every class dealt round-robin over the ``k`` folds in a seeded order.

    A class with fewer than ``k`` cells is missing from some held-out folds (its cells still count
    where they are held out); each class starts at a seeded fold so small classes do not pile up
    in fold 0.
    """
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y_idx), dtype=np.int64)
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(y_idx == c))
        fold[idx] = (int(rng.integers(k)) + np.arange(len(idx))) % k
    return fold


def _stratified_subsample(y_idx: np.ndarray, n_classes: int, n_max: int, seed: int, floor: int = 30) -> np.ndarray:
    """Sorted row indices of about ``n_max`` cells keeping every class's share, and at least
    ``floor`` cells (or all) of every class so small classes still have held-out cells."""
    n = len(y_idx)
    if n <= n_max:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(n_classes):
        idx = np.flatnonzero(y_idx == c)
        m = max(floor, int(round(len(idx) * n_max / n)))
        keep.append(rng.choice(idx, size=min(m, len(idx)), replace=False))
    return np.sort(np.concatenate(keep))


def _parse_reg(reg_per_cell: float | Sequence[float] | str | None, C: float | None) -> tuple[str, tuple[float | None, ...]]:
    """(mode, regularisation values): ``auto`` (cross-validated), ``single`` or ``path`` (averaged)."""
    if C is not None:
        if not C > 0:
            raise TrainingError(f"C must be positive, got {C!r}")
        return "C", (None,)
    if reg_per_cell is None or (isinstance(reg_per_cell, str) and reg_per_cell == AUTO):
        return AUTO, CV_REG_GRID
    if isinstance(reg_per_cell, str):
        try:
            reg_per_cell = float(reg_per_cell)
        except ValueError:
            raise TrainingError(f"reg_per_cell must be a positive number or {AUTO!r}, got {reg_per_cell!r}") from None
    values = (reg_per_cell,) if isinstance(reg_per_cell, (int, float)) else tuple(reg_per_cell)
    if not values or any(not (isinstance(r, (int, float)) and r > 0) for r in values):
        raise TrainingError(f"reg_per_cell must be positive, got {reg_per_cell!r}")
    values = tuple(sorted((float(r) for r in values), reverse=True))
    return ("single" if len(values) == 1 else "path"), values


def _calibration(logits: np.ndarray, y_idx: np.ndarray, target_precision: float) -> dict[str, Any]:
    """Temperature, threshold at the target precision and coverage-accuracy curve from held-out logits."""
    T = fit_temperature(logits, y_idx)
    P = softmax(logits / T)
    conf = P.max(axis=1)
    correct = P.argmax(axis=1) == y_idx
    out = {"temperature": T, "held_out_nll": nll(logits, y_idx, T)}
    out["threshold"] = precision_threshold(conf, correct, target_precision)
    out["curve"] = coverage_curve(conf, correct)
    return out


def _class_balanced_nll(logits: np.ndarray, y_idx: np.ndarray, temperature: float) -> tuple[float, float]:
    """Held-out NLL with every class weighted equally (mean over classes of their cells' mean NLL),
    and its standard error (classes independent: ``sqrt(sum_k var_k / n_k) / K``)."""
    Z = logits / temperature
    Z = Z - Z.max(axis=1, keepdims=True)
    per = np.log(np.exp(Z).sum(axis=1)) - Z[np.arange(len(y_idx)), y_idx]
    present = np.unique(y_idx)
    means = [per[y_idx == c].mean() for c in present]
    var_of_means = [per[y_idx == c].var() / (y_idx == c).sum() for c in present]
    return float(np.mean(means)), float(np.sqrt(np.sum(var_of_means)) / len(present))


def _balanced_accuracy(pred: np.ndarray, y_idx: np.ndarray) -> float:
    present = np.unique(y_idx)
    return float(np.mean([(pred[y_idx == c] == c).mean() for c in present]))


def _balanced_accuracy_se(pred: np.ndarray, y_idx: np.ndarray) -> float:
    """Standard error of the balanced accuracy (classes independent, binomial recall per class):
    ``sqrt(sum_k r_k (1 - r_k) / n_k) / K`` with the recall shrunk as ``(hits + 1) / (n_k + 2)``
    (Laplace; Agresti & Coull 1998), so that a small class recalled perfectly or not at all, whose
    plain binomial variance is 0, still counts with the uncertainty its few cells carry."""
    present = np.unique(y_idx)
    var = []
    for c in present:
        n_c = int((y_idx == c).sum())
        r = (int((pred[y_idx == c] == c).sum()) + 1) / (n_c + 2)
        var.append(r * (1 - r) / n_c)
    return float(np.sqrt(np.sum(var)) / len(present))


def train_model(
    adata: AnnData,
    *,
    label_column: str = schema.CELL_TYPE,
    seed: int = 0,
    max_iter: int = 1000,
    C: float | None = None,
    reg_per_cell: float | Sequence[float] | str | None = AUTO,
    cv_folds: int = 3,
    target_precision: float = DEFAULT_TARGET_PRECISION,
    max_cv_cells: int = 10_000,
    tol: float = 1e-4,
) -> TrainedModel:
    """Fit StandardScaler + multinomial L-BFGS logistic regression on a log1p-10k training set.

    The model carries two regimes, chosen per query at annotation by a measured platform-shift
    index (:mod:`spatial_assets.celltyping.shift`):

    * ``same_platform`` (the celltypist-visible ``coef_``): the L2 penalty chosen by stratified,
      seeded ``cv_folds``-fold cross-validation on the reference (the lowest :data:`CV_CRITERION`
      among the values whose :data:`CV_SELECTION` is within one SE of the highest, over
      :data:`CV_REG_GRID`, strongest first, each fit warm-starting the next; the chosen
      ``C = 1 / (reg * n_train_fold)`` is refitted on all cells, as scikit-learn's
      ``LogisticRegressionCV`` does). Without a platform shift, what predicts held-out reference
      cells best predicts the query best; the former fixed strong path (0.05–0.4 per cell)
      destroyed same-platform transfer with many fine classes (docs/celltyping.md).
    * ``shifted``: stronger shrinkage by the one-standard-error rule on the same walk: the
      strongest penalty whose held-out :data:`CV_CRITERION` is within one standard error of its
      minimum (and never weaker than ``same_platform``'s).
      Strong shrinkage transfers across platforms (scRNA-seq → imaging), but where the reference
      shows it costs (small classes) it is not taken.

    ``reg_per_cell`` a number (or ``C``) gives one single model, a sequence one path average, used
    by both regimes. Every regime gets its own temperature and its own default confidence
    threshold (the confidence at which out-of-fold reference cells reach ``target_precision``,
    with the coverage it gives and the coverage-accuracy curve), all from the same out-of-fold
    predictions. Cross-validation runs on a stratified subsample of at most ``max_cv_cells``.
    """
    if label_column not in adata.obs.columns:
        raise TrainingError(f"training set has no obs column {label_column!r} (columns: {list(adata.obs.columns)})")
    labels = adata.obs[label_column].astype(str).to_numpy()
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise TrainingError(f"training needs at least 2 classes in obs[{label_column!r}], found {classes}")
    if adata.n_vars == 0:
        raise TrainingError("training set has no genes")
    if cv_folds < 2:
        raise TrainingError(f"cv_folds must be >= 2, got {cv_folds}")
    mode, grid = _parse_reg(reg_per_cell, C)

    X = _dense32(adata.X)  # the one working copy: standardised in place below
    if not np.isfinite(X).all():
        raise TrainingError("training matrix contains NaN or infinite values")
    genes = [str(g) for g in adata.var_names]
    y = labels
    n = len(y)
    class_arr = np.unique(y)  # object array, as sklearn's LabelEncoder would store it
    y_idx = np.searchsorted(class_arr, y)
    K = len(class_arr)
    Kp = 1 if K == 2 else K
    mean, var, scale = _standardize_inplace(X)
    Z = X

    def l2_of(reg: float | None, n_cells: int) -> float:
        # sklearn: objective = mean CE + ||W||^2 / (2 C n); reg_per_cell = 1 / (C n)
        return 1.0 / (C * n_cells) if reg is None else float(reg)

    def logits_of(Zr: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        S = (Zr @ W.T.astype(np.float32)).astype(np.float64) + b
        return np.column_stack([np.zeros(len(S)), S[:, 0]]) if K == 2 else S

    def split(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return theta[: Kp * Z.shape[1]].reshape(Kp, -1), theta[Kp * Z.shape[1] :]

    # ---- cross-validation along the path (out-of-fold logits for selection and calibration)
    cv_rows = _stratified_subsample(y_idx, K, max_cv_cells, seed)
    ycv = y_idx[cv_rows]
    fold = _stratified_folds(ycv, K, cv_folds, seed)
    n_tr = np.array([(fold != f).sum() for f in range(cv_folds)])
    theta_at: dict[float | None, list[np.ndarray]] = {}  # fold solutions per value (small: K x G each)
    records: list[dict[str, Any]] = []
    path_sum: np.ndarray | None = None  # mode "path": the members' out-of-fold logits summed

    def rows_of(mask: np.ndarray) -> np.ndarray:
        # rows straight from Z (a copy of just these rows; the CV subsample is never materialised)
        return Z[cv_rows[mask]]

    def oof_logits(reg: float | None) -> np.ndarray:
        L = np.zeros((len(ycv), K))
        for f, theta in enumerate(theta_at[reg]):
            Wf, bf = split(theta)
            L[fold == f] = logits_of(rows_of(fold == f), Wf, bf)
        return L

    def evaluate(reg: float | None, init: list[np.ndarray | None]) -> tuple[dict[str, Any], np.ndarray]:
        thetas = []
        for f in range(cv_folds):
            tr = fold != f
            # a copy of the training rows costs less than computing on held-out rows with weight 0
            Wf, bf, _ = _fit_multinomial(
                rows_of(tr), ycv[tr], K, l2_of(reg, int(n_tr[f])), weights=None, max_iter=max_iter, tol=tol, init=init[f]
            )
            thetas.append(np.concatenate([Wf.ravel(), bf]))
        theta_at[reg] = thetas
        L = oof_logits(reg)
        T = fit_temperature(L, ycv)
        cb, cb_se = _class_balanced_nll(L, ycv, T)
        pred = L.argmax(axis=1)
        rec = {
            "reg_per_cell": reg,
            "held_out_nll_class_balanced": cb,
            "held_out_nll_class_balanced_se": cb_se,
            "held_out_nll": nll(L, ycv, T),
            "held_out_nll_untempered": nll(L, ycv),
            "held_out_nll_class_balanced_untempered": _class_balanced_nll(L, ycv, 1.0)[0],
            "temperature": T,
            "held_out_accuracy": float((pred == ycv).mean()),
            "held_out_balanced_accuracy": _balanced_accuracy(pred, ycv),
            "held_out_balanced_accuracy_se": _balanced_accuracy_se(pred, ycv),
        }
        records.append(rec)
        return rec, L

    def better(rec: dict[str, Any], than: dict[str, Any] | None) -> bool:
        # ties (within CV_TIE_NATS) go to the weaker value: on a separable reference every value
        # reaches ~0 held-out loss, and the weaker one keeps the larger margins
        return than is None or rec[CV_CRITERION] < than[CV_CRITERION] - CV_TIE_NATS or (
            rec[CV_CRITERION] <= than[CV_CRITERION] + CV_TIE_NATS and (rec["reg_per_cell"] or 0.0) < (than["reg_per_cell"] or 0.0)
        )

    def better_selection(rec: dict[str, Any], than: dict[str, Any] | None) -> bool:
        # the walk goes on while the selection score still rises
        return than is None or rec[CV_SELECTION] > than[CV_SELECTION] + 1e-12

    def selected() -> tuple[dict[str, Any], float]:
        # (the record taken, the standard error of the highest balanced accuracy) — see CV_SELECTION
        top = max(records, key=lambda r: r[CV_SELECTION])
        tol = float(top[f"{CV_SELECTION}_se"])
        tied = [r for r in records if r[CV_SELECTION] >= top[CV_SELECTION] - tol]
        return min(tied, key=lambda r: (r[CV_CRITERION], r["reg_per_cell"] or 0.0)), tol

    best: dict[str, Any] | None = None  # lowest CV_CRITERION
    chosen: dict[str, Any] | None = None  # highest CV_SELECTION
    worse = 0
    init: list[np.ndarray | None] = [None] * cv_folds
    for reg in grid:
        rec, L = evaluate(reg, init)
        init = list(theta_at[reg])
        if mode == "path":
            path_sum = L if path_sum is None else path_sum + L
        improved = False
        if better(rec, best):
            best, improved = rec, True
        if better_selection(rec, chosen):
            chosen, improved = rec, True
        worse = 0 if improved else worse + 1
        # beyond both bests, stop once neither has improved for CV_PATIENCE consecutive, weaker values
        if mode == AUTO and worse >= CV_PATIENCE:
            break
    assert best is not None and chosen is not None

    # ---- regimes. same_platform: the CV minimum. shifted: the one-standard-error rule (Breiman et
    # al. 1984; Hastie et al., ESL 7.10): the strongest shrinkage whose held-out criterion is within
    # one standard error of the minimum. Under a shift the reference's held-out loss is an
    # optimistic proxy for the query's, so the most robust model the reference cannot tell apart
    # from the best is preferred; where stronger shrinkage measurably costs (small classes), it is
    # not taken. Both are refined once between grid values (factor sqrt(CV_GRID_STEP)).
    n_tr_mean = float(n_tr.mean())
    if mode == AUTO:
        half = float(np.sqrt(CV_GRID_STEP))

        def nearest_init(reg: float) -> list[np.ndarray | None]:
            known = [r for r in theta_at if r is not None]
            return list(theta_at[min(known, key=lambda r: abs(np.log(r / reg)))])

        around = sorted({float(best["reg_per_cell"]), float(selected()[0]["reg_per_cell"])}, reverse=True)
        for b0 in around:  # around the criterion's minimum and the selection's choice
            for cand in (float(f"{b0 * half:.3g}"), float(f"{b0 / half:.3g}")):
                if grid[-1] <= cand <= grid[0] and cand not in theta_at:
                    rec, _ = evaluate(cand, nearest_init(cand))
                    if better(rec, best):
                        best = rec
        chosen, selection_tol = selected()
        limit = best[CV_CRITERION] + best[f"{CV_CRITERION}_se"]
        one_se = max((r for r in records if r[CV_CRITERION] <= limit), key=lambda r: r["reg_per_cell"])
        cand = float(f"{one_se['reg_per_cell'] * half:.3g}")
        if cand <= grid[0] and cand not in theta_at:  # between the one-SE value and the next, failing, one
            rec, _ = evaluate(cand, nearest_init(cand))
            if rec[CV_CRITERION] <= limit:
                one_se = rec
        records.sort(key=lambda r: -(r["reg_per_cell"] or 0.0))
        # shifted never shrinks less than same_platform: it is the regime for a query less like the reference
        regs = {"same_platform": float(chosen["reg_per_cell"]), "shifted": max(float(one_se["reg_per_cell"]), float(chosen["reg_per_cell"]))}
        cals = {k: _calibration(oof_logits(v), ycv, target_precision) for k, v in regs.items()}
        # same_platform refits the chosen C on all cells (LogisticRegressionCV): the penalty is a prior
        # against estimation noise, whose optimal total does not grow with n. shifted keeps the penalty
        # per cell: shrinkage against a shift is robustness of the mean loss (distributionally robust
        # logistic regression = mean loss + eps * ||w||, Shafieezadeh-Abadeh et al. 2015), which more
        # reference cells do not reduce.
        final_regs = {"same_platform": regs["same_platform"] * n_tr_mean / n, "shifted": regs["shifted"]}
    elif mode == "path":
        assert path_sum is not None
        cals = dict.fromkeys(REGIMES, _calibration(path_sum / len(grid), ycv, target_precision))
    else:
        cals = dict.fromkeys(REGIMES, _calibration(oof_logits(grid[0]), ycv, target_precision))

    # ---- final fits on all cells (warm-started from the folds' mean solution)
    def init_for(reg: float | None) -> np.ndarray:
        return np.mean(theta_at[reg], axis=0)

    members: list[dict[str, Any]] = []
    n_iter = 0
    if mode == AUTO:
        fitted: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        for name in ("shifted", "same_platform"):  # stronger first
            full_reg = final_regs[name]
            if full_reg not in fitted:
                Wr, br, it = _fit_multinomial(Z, y_idx, K, full_reg, weights=None, max_iter=max_iter, tol=tol, init=init_for(regs[name]))
                fitted[full_reg] = (Wr, br)
                members.append({"regime": name, "cv_reg_per_cell": regs[name], "reg_per_cell": full_reg, "n_iter": it})
                n_iter += it
        Ws, bs = fitted[final_regs["same_platform"]]
        W_shift, b_shift = fitted[final_regs["shifted"]]
        c_final = 1.0 / (regs["same_platform"] * n_tr_mean)
    else:
        W_sum, b_sum, init = 0.0, 0.0, None
        for reg in grid:
            Wr, br, it = _fit_multinomial(
                Z, y_idx, K, l2_of(reg, n), weights=None, max_iter=max_iter, tol=tol, init=init_for(reg) if init is None else init
            )
            init = np.concatenate([Wr.ravel(), br])
            members.append({"reg_per_cell": reg, "n_iter": it})
            W_sum, b_sum, n_iter = W_sum + Wr, b_sum + br, n_iter + it
        Ws, bs = W_sum / len(members), b_sum / len(members)
        W_shift, b_shift = Ws, bs
        c_final = C if C is not None else 1.0 / (float(np.exp(np.mean(np.log([float(r) for r in grid])))) * n)

    clf, scaler = _sklearn_objects(
        Ws, bs, class_arr, c_final, n_iter, mean, var, scale, n, seed=seed, max_iter=max_iter, tol=tol
    )
    clf.features = np.asarray(genes, dtype=object)
    clf.shift_coef_ = np.ascontiguousarray(W_shift, dtype=np.float64)
    clf.shift_intercept_ = np.asarray(b_shift, dtype=np.float64)
    counts = np.bincount(y_idx, minlength=K).astype(np.float64)
    means = np.zeros((K, Z.shape[1]), dtype=np.float64)
    variances = np.zeros_like(means)
    order = np.argsort(y_idx, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts.astype(np.int64))])
    for k in range(K):
        Zk = Z[order[bounds[k] : bounds[k + 1]]]
        means[k] = Zk.mean(axis=0, dtype=np.float64)
        variances[k] = np.square(Zk - means[k]).mean(axis=0)
    del Z, X, theta_at
    clf.class_means_ = means.astype(np.float32)
    clf.class_vars_ = variances.astype(np.float32)
    clf.class_counts_ = counts.astype(np.int64)

    obs = adata.obs
    label_map: dict[str, list[str]] = {}
    ontology: dict[str, dict[str, str]] = {}
    for k in clf.classes_:
        sel = labels == k
        if schema.ORIGINAL_LABEL in obs.columns:
            label_map[str(k)] = sorted(set(obs.loc[sel, schema.ORIGINAL_LABEL].astype(str)))
        else:
            label_map[str(k)] = [str(k)]
        tid = _most_common(obs.loc[sel, schema.CELL_TYPE_ONTOLOGY_ID], "unknown") if schema.CELL_TYPE_ONTOLOGY_ID in obs else "unknown"
        tlabel = _most_common(obs.loc[sel, schema.CELL_TYPE_ONTOLOGY_LABEL], str(k)) if schema.CELL_TYPE_ONTOLOGY_LABEL in obs else str(k)
        ontology[str(k)] = {"term_id": tid, "label": tlabel}

    rare = [str(k) for k, c in zip(clf.classes_, counts) if c < RARE_CLASS_CELLS]
    walked = [r["reg_per_cell"] for r in records]
    if mode == AUTO:
        descs = {
            "same_platform": {
                "reg_per_cell": final_regs["same_platform"],
                "cv_reg_per_cell": regs["same_platform"],
                "why": (
                    f"{cv_folds}-fold stratified CV on {len(cv_rows)} reference cells over reg_per_cell {walked}: "
                    f"held-out balanced accuracy {chosen[CV_SELECTION]:.3f} at {regs['same_platform']:g}, within one SE "
                    f"({selection_tol:.3g}) of the highest, and the lowest class-balanced NLL of those; "
                    f"refitted on all {n} cells with the same C"
                ),
            },
            "shifted": {
                "reg_per_cell": final_regs["shifted"],
                "cv_reg_per_cell": regs["shifted"],
                "why": (
                    f"one-standard-error rule: the strongest reg_per_cell whose class-balanced held-out NLL is within one SE "
                    f"({best[f'{CV_CRITERION}_se']:.3g}) of the minimum is {float(one_se['reg_per_cell']):g}"
                    + (f" (raised to same_platform's {regs['shifted']:g})" if regs["shifted"] > float(one_se["reg_per_cell"]) else "")
                    + f"; refitted on all {n} cells with the same penalty per cell"
                ),
            },
        }
    else:
        what = "C" if mode == "C" else "reg_per_cell"
        desc = {"reg_per_cell": [float(r) for r in grid] if mode != "C" else "C", "why": f"{what} given by the caller"}
        descs = {"same_platform": dict(desc), "shifted": dict(desc)}
    regimes = {name: {**descs[name], **cals[name], "threshold_verified": name == "same_platform"} for name in REGIMES}
    card: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "classes": [str(k) for k in clf.classes_],
        "genes": genes,
        "n_cells": int(n),
        "n_cells_per_class": {str(k): int(c) for k, c in zip(clf.classes_, counts)},
        "rare_classes": rare,
        "rare_class_rule": f"fewer than {RARE_CLASS_CELLS} training cells (kept and scored; their calls are less reliable)",
        "label_map": label_map,
        "ontology": ontology,
        "references": _jsonable(adata.uns.get("references", [])),
        "parameters": {
            "label_column": label_column,
            "solver": "lbfgs (multinomial, sklearn objective; scipy L-BFGS-B on float32 standardised data)",
            "C": float(clf.C),
            "reg_per_cell": "auto" if mode == AUTO else ([m["reg_per_cell"] for m in members] if C is None else None),
            "cv_criterion": CV_CRITERION,
            "cv_selection": CV_SELECTION,
            "regularization_path": _jsonable(members),
            "max_iter": max_iter,
            "tol": tol,
            "scaler": "StandardScaler(with_mean=True)",
            "seed": seed,
            "n_iter": int(n_iter),
            "cv_folds": cv_folds,
            "target_precision": target_precision,
        },
        "cross_validation": {
            "n_cells": int(len(cv_rows)),
            "folds": cv_folds,
            "grid": _jsonable(records),
            "selection": CV_SELECTION,
            "selection_tolerance": float(selection_tol) if mode == AUTO else None,
        },
        "regimes": _jsonable(regimes),
        "calibration": {
            "method": "temperature-scaled softmax, NLL-fitted on out-of-fold reference predictions (per regime)",
            "temperature": float(cals["same_platform"]["temperature"]),
            "n_held_out": int(len(cv_rows)),
            "held_out_nll": float(cals["same_platform"]["held_out_nll"]),
        },
        "versions": _versions(),
    }
    return TrainedModel(classifier=clf, scaler=scaler, classes=card["classes"], genes=genes, card=card)


def _description(model: TrainedModel) -> dict[str, Any]:
    # celltypist's Model.__repr__ reads date/details/source/version; no timestamp (bit-identical bytes)
    return {
        "date": "",
        "details": f"spatial_assets panel model: {len(model.classes)} classes, {len(model.genes)} genes",
        "url": "",
        "source": "spatial_assets.celltyping.training",
        "version": MODEL_FORMAT,
        "number_celltypes": len(model.classes),
        "card": model.card,
    }


def model_bytes(model: TrainedModel) -> bytes:
    """The exact bytes :func:`save_model` writes (celltypist pickle layout)."""
    buf = io.BytesIO()
    pickle.dump(
        {"Model": model.classifier, "Scaler_": model.scaler, "description": _description(model)},
        buf,
        protocol=_PICKLE_PROTOCOL,
    )
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model(model: TrainedModel, path: str | os.PathLike[str]) -> str:
    """Write the pickle and ``<path>.card.json`` (card + pickle sha256) atomically; return the sha256."""
    import hashlib

    path = Path(path)
    data = model_bytes(model)
    digest = hashlib.sha256(data).hexdigest()
    card = dict(model.card)
    card["sha256"] = digest
    card_bytes = json.dumps(_jsonable(card), indent=2, sort_keys=True).encode()
    _atomic_write(path, data)
    _atomic_write(Path(f"{path}.card.json"), card_bytes)
    model.sha256 = digest
    return digest


def load_model(path: str | os.PathLike[str], expected_sha256: str) -> TrainedModel:
    """Verify the file's sha256 BEFORE unpickling (pickles execute code), then load it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ModelIntegrityError(f"model file {path} has sha256 {actual}, expected {expected_sha256}: refusing to load it")
    with open(path, "rb") as fh:
        obj = pickle.load(fh)
    try:
        clf, scaler, desc = obj["Model"], obj["Scaler_"], obj["description"]
    except (KeyError, TypeError) as exc:
        raise ModelIntegrityError(f"model file {path} is not a celltypist-layout pickle: {exc}") from exc
    card = dict(desc.get("card", {}))
    if not hasattr(clf, "class_means_"):
        raise ModelIntegrityError(f"model file {path} lacks the class statistics written by spatial_assets.celltyping.training")
    return TrainedModel(
        classifier=clf,
        scaler=scaler,
        classes=[str(c) for c in clf.classes_],
        genes=[str(g) for g in clf.features],
        card=card,
        sha256=actual,
    )
