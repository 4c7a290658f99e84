"""Calibrated confidence and a confidence threshold that means something.

A fixed threshold (the CLI used 0.8, the platform 0.5) ignores how many classes a model has and how
sure it is on cells it has not seen: the same 0.8 left 96 % of a 31-class query Unassigned and a
quarter of a 4-class one. Here the threshold is read off held-out reference cells (out-of-fold
predictions of the cross-validation at training): the lowest confidence at which the assigned
held-out cells are right at least ``target_precision`` of the time, stored with the coverage it
gives. Held-out cells come from the reference's own platform, so the figure is a promise only when
the query has no platform shift; annotation flags it as unverified otherwise (docs/celltyping.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: precision the default threshold is chosen for (held-out reference cells)
DEFAULT_TARGET_PRECISION = 0.9
#: thresholds at which the coverage-accuracy curve is reported
CURVE_THRESHOLDS: tuple[float, ...] = tuple(round(t, 2) for t in np.linspace(0.0, 0.95, 20)) + (0.97, 0.99)


def softmax(L: np.ndarray) -> np.ndarray:
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


def nll(logits: np.ndarray, y_idx: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class under ``softmax(logits / T)``."""
    Z = np.asarray(logits, dtype=np.float64) / temperature
    Z = Z - Z.max(axis=1, keepdims=True)
    rows = np.arange(len(y_idx))
    return float(-(Z[rows, y_idx] - np.log(np.exp(Z).sum(axis=1))).mean())


def precision_threshold(
    confidence: np.ndarray, correct: np.ndarray, target_precision: float = DEFAULT_TARGET_PRECISION
) -> dict[str, Any]:
    """Lowest confidence cut at which the cells kept are right ``>= target_precision`` of the time.

    Cells are ranked by confidence; the cut keeps the largest top set whose precision reaches the
    target (cuts only between distinct confidence values). Returns the threshold, the coverage
    (fraction kept) and precision it gives on these cells, and whether the target was reachable;
    if not, the cut with the best precision among those keeping >= 5 % of cells is returned.
    """
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if conf.size == 0:
        raise ValueError("precision_threshold needs at least one held-out cell")
    order = np.argsort(-conf, kind="stable")
    cs, cc = conf[order], ok[order]
    n = cs.size
    prec = np.cumsum(cc) / np.arange(1, n + 1)
    cut_ok = np.ones(n, dtype=bool)
    cut_ok[:-1] = cs[:-1] > cs[1:]  # a cut must not split tied confidences
    good = np.flatnonzero(cut_ok & (prec >= target_precision - 1e-12))
    reached = bool(good.size)
    if reached:
        i = int(good[-1])
    else:
        cand = np.flatnonzero(cut_ok & (np.arange(1, n + 1) >= max(1, int(np.ceil(0.05 * n)))))
        cand = cand if cand.size else np.flatnonzero(cut_ok)
        i = int(cand[np.argmax(prec[cand])])
    return {
        "threshold": float(cs[i]),
        "target_precision": float(target_precision),
        "target_reached": reached,
        "expected_coverage": float((i + 1) / n),
        "expected_precision": float(prec[i]),
        "held_out_accuracy": float(ok.mean()),
        "n_held_out": int(n),
    }


def coverage_curve(
    confidence: np.ndarray, correct: np.ndarray | None = None, thresholds: tuple[float, ...] = CURVE_THRESHOLDS
) -> dict[str, list[float]]:
    """Unassigned fraction (and accuracy of the assigned cells, when ``correct`` is known) per threshold.

    Thresholds at which no cell is assigned are left out (their accuracy is undefined).
    """
    conf = np.asarray(confidence, dtype=np.float64)
    out: dict[str, list[float]] = {"threshold": [], "unassigned_fraction": []}
    if correct is not None:
        out["assigned_accuracy"] = []
        ok = np.asarray(correct, dtype=bool)
    for t in thresholds:
        kept = conf >= t
        if not kept.any():
            continue
        out["threshold"].append(float(t))
        out["unassigned_fraction"].append(float(1.0 - kept.mean()))
        if correct is not None:
            out["assigned_accuracy"].append(float(ok[kept].mean()))
    return out
