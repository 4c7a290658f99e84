"""Train a CellTypist-compatible logistic-regression model on the panel genes.

Why not ``celltypist.train``: in celltypist 1.7.1 the default (non-SGD) path passes
``multi_class`` to scikit-learn, which 1.9 removed, and mini-batch SGD underfits small references
and is ~30x slower than a multinomial L-BFGS fit (measured: 2.9 s at 200k cells x 500 genes).
So the model is fitted with scikit-learn directly (StandardScaler + multinomial L-BFGS) and written
in celltypist's own pickle layout (``{'Model', 'Scaler_', 'description'}``) so that
``celltypist.models.Model.load(path)`` still opens it. Neither scanpy nor celltypist is imported.

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
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from spatial_assets import schema
from spatial_assets.objectstore import sha256_file

MODEL_FORMAT = "spatial_assets.celltypist-lr/1"
_PICKLE_PROTOCOL = 4
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
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)


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


def train_model(
    adata: AnnData,
    *,
    label_column: str = schema.CELL_TYPE,
    seed: int = 0,
    max_iter: int = 1000,
    C: float | None = None,
    reg_per_cell: float = 0.2,
    calibration_fraction: float = 0.2,
    tol: float = 1e-4,
) -> TrainedModel:
    """Fit StandardScaler + multinomial L-BFGS logistic regression on a log1p-10k training set.

    ``C`` defaults to ``1 / (reg_per_cell * n_cells)``, i.e. a fixed L2 penalty per cell: a model
    trained on 1k or 200k cells is shrunk equally, and the strong default (0.2) is what keeps
    weights small enough to transfer across platforms (measured in docs/celltyping.md).
    The softmax temperature is fitted on a stratified, seeded held-out fraction, then the model is
    refitted on all cells.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if label_column not in adata.obs.columns:
        raise TrainingError(f"training set has no obs column {label_column!r} (columns: {list(adata.obs.columns)})")
    labels = adata.obs[label_column].astype(str).to_numpy()
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise TrainingError(f"training needs at least 2 classes in obs[{label_column!r}], found {classes}")
    if adata.n_vars == 0:
        raise TrainingError("training set has no genes")

    X = _dense32(adata.X)
    if not np.isfinite(X).all():
        raise TrainingError("training matrix contains NaN or infinite values")
    genes = [str(g) for g in adata.var_names]
    y = labels
    n = len(y)

    def make_clf(n_cells: int) -> Any:
        c = C if C is not None else 1.0 / (reg_per_cell * n_cells)
        return LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, tol=tol, random_state=seed)

    # calibration: fit on (1 - f), temperature on the held-out f
    temperature, cal_n, cal_nll = 1.0, 0, None
    held = _stratified_holdout(y, calibration_fraction, seed) if calibration_fraction > 0 else np.zeros(n, bool)
    if held.any() and len(np.unique(y[~held])) == len(classes):
        sc_cal = StandardScaler().fit(X[~held])
        clf_cal = make_clf(int((~held).sum())).fit(sc_cal.transform(X[~held]), y[~held])
        logits = class_logits(clf_cal, sc_cal.transform(X[held]))
        y_idx = np.searchsorted(clf_cal.classes_, y[held])
        temperature = fit_temperature(logits, y_idx)
        cal_n = int(held.sum())
        P = _softmax(logits / temperature)
        cal_nll = float(-np.log(np.clip(P[np.arange(cal_n), y_idx], 1e-12, None)).mean())

    scaler = StandardScaler().fit(X)
    Z = scaler.transform(X).astype(np.float32, copy=False)
    clf = make_clf(n).fit(Z, y)
    clf.features = np.asarray(genes, dtype=object)
    idx = np.searchsorted(clf.classes_, y)
    K = len(clf.classes_)
    counts = np.bincount(idx, minlength=K).astype(np.float64)
    means = np.zeros((K, Z.shape[1]), dtype=np.float64)
    np.add.at(means, idx, Z)
    means /= counts[:, None]
    sq = np.zeros_like(means)
    np.add.at(sq, idx, Z.astype(np.float64) ** 2)
    variances = np.maximum(sq / counts[:, None] - means**2, 0.0)
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
            "solver": "lbfgs (multinomial)",
            "C": float(clf.C),
            "reg_per_cell": reg_per_cell if C is None else None,
            "max_iter": max_iter,
            "tol": tol,
            "scaler": "StandardScaler(with_mean=True)",
            "seed": seed,
            "n_iter": int(np.max(clf.n_iter_)),
        },
        "calibration": {
            "method": "temperature-scaled softmax, NLL-fitted on held-out reference cells",
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
        "source": "spatial_assets.training",
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
        raise ModelIntegrityError(f"model file {path} lacks the class statistics written by spatial_assets.training")
    return TrainedModel(
        classifier=clf,
        scaler=scaler,
        classes=[str(c) for c in clf.classes_],
        genes=[str(g) for g in clf.features],
        card=card,
        sha256=actual,
    )
