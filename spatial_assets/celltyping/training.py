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

The classifier also carries what annotation needs to handle platform shift (per-class means and
variances of the scaled training data) and a softmax temperature fitted on held-out reference
cells (calibration); see ``docs/celltyping.md``.
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

from spatial_assets.core import schema
from spatial_assets.storage.objectstore import sha256_file

MODEL_FORMAT = "spatial_assets.celltypist-lr/1"
#: L2 penalty per cell of the averaged members (geometric, an order of magnitude around 0.14)
DEFAULT_REG_PATH: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
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


def _softmax(L: np.ndarray) -> np.ndarray:
    L = L - L.max(axis=1, keepdims=True)
    E = np.exp(L)
    return E / E.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, y_idx: np.ndarray) -> float:
    """Temperature minimising held-out NLL of ``softmax(logits / T)`` (Guo et al. 2017)."""
    from scipy.optimize import minimize_scalar

    L = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(y_idx))

    def nll(log_t: float) -> float:
        Z = L / np.exp(log_t)
        Z = Z - Z.max(axis=1, keepdims=True)
        return float(-(Z[rows, y_idx] - np.log(np.exp(Z).sum(axis=1))).mean())

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def _stratified_holdout(y: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out cells: ``frac`` of every class with >= 5 cells, seeded."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), dtype=bool)
    for k in np.unique(y):
        idx = np.flatnonzero(y == k)
        n_out = int(round(frac * len(idx))) if len(idx) >= 5 else 0
        if n_out:
            mask[rng.choice(idx, size=n_out, replace=False)] = True
    return mask


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
    step = max(1, 4_000_000 // max(X.shape[1], 1))
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


def train_model(
    adata: AnnData,
    *,
    label_column: str = schema.CELL_TYPE,
    seed: int = 0,
    max_iter: int = 1000,
    C: float | None = None,
    reg_per_cell: float | Sequence[float] | None = None,
    calibration_fraction: float = 0.2,
    tol: float = 1e-4,
) -> TrainedModel:
    """Fit StandardScaler + multinomial L-BFGS logistic regression on a log1p-10k training set.

    ``C`` defaults to ``1 / (reg_per_cell * n_cells)``, i.e. a fixed L2 penalty per cell: a model
    trained on 1k or 200k cells is shrunk equally. How much shrinkage transfers best across
    platforms is not knowable from the reference alone (cross-validation on the reference always
    prefers the weakest), so by default the model averages a regularization path,
    ``reg_per_cell`` = :data:`DEFAULT_REG_PATH` (an order of magnitude around 0.14): each member's
    logits are divided by its own held-out temperature and the calibrated logits are averaged,
    which is again one linear model (weights = mean of W/T). Measured in docs/celltyping.md.
    A single number gives a single model, as before.
    Each temperature is fitted on a stratified, seeded held-out fraction (the calibration fit gives
    those cells weight 0), then the member is refitted on all cells starting from that solution.
    """
    if label_column not in adata.obs.columns:
        raise TrainingError(f"training set has no obs column {label_column!r} (columns: {list(adata.obs.columns)})")
    labels = adata.obs[label_column].astype(str).to_numpy()
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise TrainingError(f"training needs at least 2 classes in obs[{label_column!r}], found {classes}")
    if adata.n_vars == 0:
        raise TrainingError("training set has no genes")

    X = _dense32(adata.X)  # the one working copy: standardised in place below
    if not np.isfinite(X).all():
        raise TrainingError("training matrix contains NaN or infinite values")
    genes = [str(g) for g in adata.var_names]
    y = labels
    n = len(y)
    class_arr = np.unique(y)  # object array, as sklearn's LabelEncoder would store it
    y_idx = np.searchsorted(class_arr, y)
    K = len(class_arr)
    mean, var, scale = _standardize_inplace(X)
    Z = X

    path = (reg_per_cell,) if isinstance(reg_per_cell, (int, float)) else tuple(reg_per_cell or DEFAULT_REG_PATH)
    if C is not None:
        path = (None,)
    elif not path or any(not (r > 0) for r in path):
        raise TrainingError(f"reg_per_cell must be positive, got {reg_per_cell!r}")

    def l2_for(reg: float | None, n_cells: int) -> tuple[float, float]:
        c = C if reg is None else 1.0 / (reg * n_cells)
        return c, 1.0 / (c * n_cells)  # sklearn: l2_reg_strength = 1 / (C * sum of sample weights)

    def logits_of(Zr: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        S = Zr @ W.T.astype(np.float32) + b
        return np.column_stack([np.zeros(len(S)), S[:, 0]]) if K == 2 else S.astype(np.float64)

    held = _stratified_holdout(y, calibration_fraction, seed) if calibration_fraction > 0 else np.zeros(n, bool)
    calibrate = bool(held.any() and len(np.unique(y[~held])) == K)
    members, cal_logits, init_cal, init_full, n_iter = [], [], None, None, 0
    W_sum, b_sum = 0.0, 0.0
    # strongest shrinkage first: each fit warm-starts the next, weaker one
    for reg in sorted(path, key=lambda r: -(r or 0.0)):
        temperature, init = 1.0, init_full
        if calibrate:
            n_fit = int((~held).sum())
            w = np.where(held, 0.0, 1.0 / n_fit)
            Wc, bc, _ = _fit_multinomial(Z, y_idx, K, l2_for(reg, n_fit)[1], weights=w, max_iter=max_iter, tol=tol, init=init_cal)
            init_cal = np.concatenate([Wc.ravel(), bc])
            held_logits = logits_of(Z[held], Wc, bc)
            temperature = fit_temperature(held_logits, y_idx[held])
            cal_logits.append(held_logits)
            init = init_cal
        Wr, br, it = _fit_multinomial(Z, y_idx, K, l2_for(reg, n)[1], weights=None, max_iter=max_iter, tol=tol, init=init)
        init_full = np.concatenate([Wr.ravel(), br])
        members.append({"reg_per_cell": reg, "temperature": temperature, "n_iter": it})
        W_sum, b_sum = W_sum + Wr, b_sum + br
        n_iter += it
    W, b = W_sum / len(members), b_sum / len(members)
    # the average of calibrated logits gets its own temperature (averaging sharpens or flattens)
    temperature, cal_n, cal_nll = 1.0, 0, None
    if calibrate:
        avg = np.mean(cal_logits, axis=0)
        temperature = fit_temperature(avg, y_idx[held])
        cal_n = int(held.sum())
        P = _softmax(avg / temperature)
        cal_nll = float(-np.log(np.clip(P[np.arange(cal_n), y_idx[held]], 1e-12, None)).mean())
    regs = [m["reg_per_cell"] for m in members if m["reg_per_cell"] is not None]
    c_final = C if C is not None else 1.0 / (float(np.exp(np.mean(np.log(regs)))) * n)
    clf, scaler = _sklearn_objects(
        W, b, class_arr, c_final, n_iter, mean, var, scale, n, seed=seed, max_iter=max_iter, tol=tol
    )
    clf.features = np.asarray(genes, dtype=object)
    counts = np.bincount(y_idx, minlength=K).astype(np.float64)
    means = np.zeros((K, Z.shape[1]), dtype=np.float64)
    variances = np.zeros_like(means)
    order = np.argsort(y_idx, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts.astype(np.int64))])
    for k in range(K):
        Zk = Z[order[bounds[k] : bounds[k + 1]]]
        means[k] = Zk.mean(axis=0, dtype=np.float64)
        variances[k] = np.square(Zk - means[k]).mean(axis=0)
    del Z, X
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

    card: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "classes": [str(k) for k in clf.classes_],
        "genes": genes,
        "n_cells": int(n),
        "n_cells_per_class": {str(k): int(c) for k, c in zip(clf.classes_, counts)},
        "label_map": label_map,
        "ontology": ontology,
        "references": _jsonable(adata.uns.get("references", [])),
        "parameters": {
            "label_column": label_column,
            "solver": "lbfgs (multinomial, sklearn objective; scipy L-BFGS-B on float32 standardised data)",
            "C": float(clf.C),
            "reg_per_cell": [m["reg_per_cell"] for m in members] if C is None else None,
            "regularization_path": _jsonable(members),
            "max_iter": max_iter,
            "tol": tol,
            "scaler": "StandardScaler(with_mean=True)",
            "seed": seed,
            "n_iter": int(n_iter),
        },
        "calibration": {
            "method": "temperature-scaled softmax, NLL-fitted on held-out reference cells"
            + (" (average of the path members' calibrated logits, then one temperature)" if len(members) > 1 else ""),
            "temperature": temperature,
            "held_out_fraction": calibration_fraction,
            "n_held_out": cal_n,
            "held_out_nll": cal_nll,
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
