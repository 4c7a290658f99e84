"""``deconvolve``: cell-type proportions of every spot / bin from a scRNA-seq reference.

One call does what the CLI and the ``spot_deconvolution`` asset need: checks the spot counts,
reads the reference down to the shared genes (cell-typing panel logic, Cap & Fill balancing,
Cell Ontology ids), runs the chosen method and returns a copy of the spots with

* ``obsm['cell_type_proportions']`` — DataFrame, one column per reference label, rows sum to 1;
* ``obs['dominant_cell_type']`` / ``obs['dominant_cell_type_ontology_term_id']`` /
  ``obs['dominant_cell_type_proportion']`` — the largest share, its CL id and its size;
* ``obs['deconvolution_residual']`` — 1 − cosine between the spot's counts and the counts the
  proportions predict from the reference's mean profiles (same definition for every method, 0 = a
  perfect fit), and ``obs['deconvolution_status']`` (``fitted`` / ``too_few_counts``);
* ``uns['deconvolution']`` — method, parameters, library versions, reference record, label → CL id.

Spots the method could not fit (no counts on the shared genes, or below RCTD's count floor) get the
sample's mean proportions, status ``too_few_counts`` and residual 1, so every row is a valid
composition and the status says which ones are only a prior.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from spatial_assets.celltyping.references import DEFAULT_PLACEHOLDER_LABELS
from spatial_assets.core.lineage import TRACKED_LIBRARIES, library_versions
from spatial_assets.core.sharing import share_matrices
from spatial_assets.core.spatial import SpatialInputError, panel_genes, spatial_coordinates
from spatial_assets.deconvolution.counts import spot_counts
from spatial_assets.deconvolution.methods import AS_RETURNED, METHODS, RUNNERS, UNITS, _normalise_rows, transcripts_to_cells
from spatial_assets.deconvolution.reference import (
    MAX_CELLS_PER_TYPE,
    MIN_CELLS_PER_TYPE,
    DeconvolutionInputError,
    prepare_reference,
)
from spatial_assets.deconvolution.spots import SPOT_UNS, is_spot_sample

#: chosen by benchmarks/bench_deconvolution.py (docs/deconvolution.md)
DEFAULT_METHOD = "platform_nb"
PROPORTIONS_KEY = "cell_type_proportions"
DOMINANT = "dominant_cell_type"
DOMINANT_ID = "dominant_cell_type_ontology_term_id"
DOMINANT_PROPORTION = "dominant_cell_type_proportion"
RESIDUAL = "deconvolution_residual"
STATUS = "deconvolution_status"
UNS_KEY = "deconvolution"
FITTED, TOO_FEW = "fitted", "too_few_counts"
_VERSIONS = (*TRACKED_LIBRARIES, "flashdeconv", "rctd-py", "numba")
_BLOCK = 8192


def _residual(Y: sp.csr_matrix, P: np.ndarray, S: np.ndarray) -> np.ndarray:
    """1 − cos(y, P·S) per spot, in row blocks (the prediction is never held whole)."""
    out = np.ones(Y.shape[0])
    for start in range(0, Y.shape[0], _BLOCK):
        stop = min(start + _BLOCK, Y.shape[0])
        pred = P[start:stop] @ S
        yb = Y[start:stop]
        dot = np.asarray(yb.multiply(pred).sum(axis=1)).ravel()
        ny = np.sqrt(np.asarray(yb.multiply(yb).sum(axis=1)).ravel())
        npred = np.linalg.norm(pred, axis=1)
        den = ny * npred
        ok = den > 0
        out[start:stop][ok] = 1.0 - dot[ok] / den[ok]
    return np.clip(out, 0.0, 1.0)


def _coords(spots: AnnData, name: str, needed: bool) -> np.ndarray | None:
    try:
        return spatial_coordinates(spots, name)
    except SpatialInputError:
        if needed:
            raise
        return None


def deconvolve(
    spots: AnnData,
    reference: AnnData | str | os.PathLike,
    *,
    label_column: str,
    method: str = DEFAULT_METHOD,
    seed: int = 0,
    units: str = "cells",
    placeholder_labels: Sequence[str] = DEFAULT_PLACEHOLDER_LABELS,
    min_cells_per_type: int = MIN_CELLS_PER_TYPE,
    max_cells_per_type: int = MAX_CELLS_PER_TYPE,
    ontology_overrides: Mapping[str, str | None] | None = None,
    method_params: Mapping[str, Any] | None = None,
    key_added: str = PROPORTIONS_KEY,
    name: str = "spots",
) -> AnnData:
    """A copy of ``spots`` (matrices shared, not copied) with the cell-type proportions of every spot.

    ``spots``: raw integer counts in ``layers['counts']`` or X (checked exactly: a negative or
    non-integer value is an error naming the spot and gene); coordinates in ``obsm['spatial']`` for
    FlashDeconv. ``reference``: a reference file (path / ``s3://``) or an AnnData with raw counts
    (a cell-typing training set works: its counts are in ``layers['counts']``) and labels in
    ``obs[label_column]``. ``method``: ``"platform_nb"`` (default), ``"rctd"``, ``"flashdeconv"`` or ``"nnls"``;
    ``method_params`` are passed to the method (RCTD: ``RCTDConfig`` fields; FlashDeconv: its
    constructor arguments). ``units="cells"`` gives fractions of cells, ``"transcripts"`` fractions
    of the spot's transcripts. Every random step is seeded by ``seed``.
    """
    if method not in METHODS:
        raise DeconvolutionInputError(f"unknown deconvolution method {method!r}; expected one of {list(METHODS)}")
    if units not in UNITS:
        raise DeconvolutionInputError(f"units must be one of {list(UNITS)}, got {units!r}")
    panel = panel_genes(spots)
    if not panel:
        raise DeconvolutionInputError(f"spot table {name}: no genes left after removing control probes")
    Y_all, counts_source = spot_counts(spots, panel, name=name)
    ref = prepare_reference(
        reference,
        panel,
        label_column=label_column,
        spots_name=name,
        placeholder_labels=placeholder_labels,
        min_cells_per_type=min_cells_per_type,
        max_cells_per_type=max_cells_per_type,
        ontology_overrides=dict(ontology_overrides) if ontology_overrides else None,
        seed=seed,
    )
    if len(ref.genes) < len(ref.classes):
        raise DeconvolutionInputError(
            f"reference {ref.source} shares only {len(ref.genes)} genes with spot table {name} "
            f"({ref.genes[:10]}), fewer than its {len(ref.classes)} classes: the proportions are not identifiable"
        )
    pos = {g: i for i, g in enumerate(panel)}
    Y = sp.csr_matrix(Y_all[:, [pos[g] for g in ref.genes]])
    coords = _coords(spots, name, needed=method == "flashdeconv")
    res = RUNNERS[method](
        Y, ref, coords=coords, Y_all=Y_all, genes_all=panel, seed=int(seed), params=dict(method_params or {})
    )
    profiles = ref.mean_profiles()
    cell_size = profiles.sum(axis=1)
    fit_profiles = res.profiles if res.profiles is not None else profiles
    P = res.proportions
    if units == "cells" and res.native_units == "transcripts":
        P = transcripts_to_cells(P, cell_size)
    elif units == "transcripts" and res.native_units == "cells":
        P = _normalise_rows(P * cell_size[None, :])
    reported_units = res.native_units if res.native_units == AS_RETURNED else units
    fitted = res.fitted & (P.sum(axis=1) > 0)
    if not fitted.any():
        raise DeconvolutionInputError(f"spot table {name}: no spot could be deconvolved (no counts on the {len(ref.genes)} shared genes)")
    prior = P[fitted].mean(axis=0)
    P[~fitted] = prior / prior.sum()
    P = _normalise_rows(P)
    cells_P = transcripts_to_cells(P, cell_size) if reported_units == "transcripts" else P
    residual = _residual(Y, cells_P, fit_profiles)
    residual[~fitted] = 1.0

    classes = list(ref.classes)
    best = P.argmax(axis=1)
    out = share_matrices(spots)
    out.obsm[key_added] = pd.DataFrame(P, index=out.obs_names.copy(), columns=pd.Index(classes))
    out.obs[DOMINANT] = pd.Categorical.from_codes(best, categories=classes)
    ids = [ref.ontology_ids[c] for c in classes]
    id_cats = sorted(set(ids))
    out.obs[DOMINANT_ID] = pd.Categorical([ids[b] for b in best], categories=id_cats)
    out.obs[DOMINANT_PROPORTION] = P[np.arange(P.shape[0]), best].astype(np.float32)
    out.obs[RESIDUAL] = residual.astype(np.float32)
    out.obs[STATUS] = pd.Categorical(np.where(fitted, FITTED, TOO_FEW), categories=[FITTED, TOO_FEW])
    out.uns[UNS_KEY] = {
        "method": method,
        "units": reported_units,
        "native_units": res.native_units,
        "seed": int(seed),
        "key_added": key_added,
        "spot_kind": str(spots.uns[SPOT_UNS]["kind"]) if is_spot_sample(spots) else "",
        "counts_source": counts_source,
        "parameters": _h5_safe(res.params),
        "reference": _h5_safe(ref.record),
        # column dicts, not {label: ...}: labels such as "L2/3" are not valid h5ad keys
        "labels": {
            "label": np.asarray(classes, dtype=str),
            "ontology_term_id": np.asarray(ids, dtype=str),
            "n_reference_cells": np.asarray([ref.cells_per_class()[c] for c in classes], dtype=np.int64),
            "mean_counts_per_cell": cell_size,
            "mean_proportion": P.mean(axis=0),
        },
        "genes": np.asarray(ref.genes, dtype=str),
        "n_spots": int(P.shape[0]),
        "n_spots_fitted": int(fitted.sum()),
        "library_versions": library_versions(_VERSIONS),
    }
    return out


def _h5_safe(d: Mapping[str, Any]) -> dict[str, Any]:
    """Values h5ad can store: None → "", nested dicts with str keys, dict keys with "/" → lists."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if v is None:
            v = ""
        elif isinstance(v, Mapping):
            if any("/" in str(kk) for kk in v):
                v = {"key": np.asarray([str(kk) for kk in v], dtype=str), "value": np.asarray([str(vv) for vv in v.values()], dtype=str)}
            else:
                v = _h5_safe(v)
        elif isinstance(v, (list, tuple)):
            v = np.asarray([str(x) for x in v], dtype=str) if v and isinstance(v[0], str) else np.asarray(v)
        out[str(k)] = v
    return out


@dataclass
class ProportionsReport:
    """What :func:`check_proportions` found; ``passed`` is what an asset check reports."""

    passed: bool
    n_spots: int
    n_rows_not_summing_to_1: int
    n_negative: int
    n_nan: int
    max_row_sum_error: float
    classes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_proportions(adata: AnnData, *, key: str = PROPORTIONS_KEY, atol: float = 1e-6) -> ProportionsReport:
    """Rows of ``obsm[key]`` sum to 1 (within ``atol``) with no negative or NaN value.

    Never raises on bad content (a report says what is wrong); a missing key is a failed report.
    """
    if key not in adata.obsm:
        return ProportionsReport(False, int(adata.n_obs), 0, 0, 0, float("nan"), [], [f"obsm[{key!r}] is missing"])
    M = adata.obsm[key]
    classes = [str(c) for c in M.columns] if isinstance(M, pd.DataFrame) else []
    A = np.asarray(M.to_numpy() if isinstance(M, pd.DataFrame) else M, dtype=np.float64)
    problems = []
    if not isinstance(M, pd.DataFrame):
        problems.append(f"obsm[{key!r}] is not a DataFrame with one column per reference label")
    nan = ~np.isfinite(A)
    neg = A < 0
    sums = np.where(nan, 0.0, A).sum(axis=1) if A.size else np.zeros(A.shape[0])
    err = np.abs(sums - 1.0)
    bad_rows = (err > atol) | nan.any(axis=1)
    n_nan, n_neg, n_bad = int(nan.sum()), int(neg.sum()), int(bad_rows.sum())
    names = adata.obs_names
    if n_nan:
        problems.append(f"{n_nan} NaN/infinite proportions (first spot {names[np.flatnonzero(nan.any(axis=1))[0]]!r})")
    if n_neg:
        problems.append(f"{n_neg} negative proportions (first spot {names[np.flatnonzero(neg.any(axis=1))[0]]!r})")
    if n_bad:
        problems.append(f"{n_bad} rows do not sum to 1 (max error {float(err.max()):.3g}, first spot {names[np.flatnonzero(bad_rows)[0]]!r})")
    if A.shape[1] < 1:
        problems.append("no proportion columns")
    return ProportionsReport(
        passed=not problems,
        n_spots=int(A.shape[0]),
        n_rows_not_summing_to_1=n_bad,
        n_negative=n_neg,
        n_nan=n_nan,
        max_row_sum_error=float(err.max()) if err.size else 0.0,
        classes=classes,
        problems=problems,
    )


def mean_proportions(adata: AnnData, *, key: str = PROPORTIONS_KEY) -> pd.Series:
    """Mean proportion of every class over the spots, largest first (what the CLI prints)."""
    if key not in adata.obsm:
        raise DeconvolutionInputError(f"obsm[{key!r}] is missing; run deconvolve first")
    M = adata.obsm[key]
    df = M if isinstance(M, pd.DataFrame) else pd.DataFrame(np.asarray(M))
    return df.mean(axis=0).sort_values(ascending=False, kind="stable")


__all__ = [
    "DEFAULT_METHOD",
    "DOMINANT",
    "DOMINANT_ID",
    "DOMINANT_PROPORTION",
    "PROPORTIONS_KEY",
    "ProportionsReport",
    "RESIDUAL",
    "STATUS",
    "UNS_KEY",
    "check_proportions",
    "deconvolve",
    "mean_proportions",
]
