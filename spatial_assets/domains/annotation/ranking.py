"""Which cell types make up each domain: one-vs-rest Mann-Whitney U of signature scores, elbow-gap calls.

Why a domain-level call on top of per-cell typing: a domain is named by the cell types that are
*enriched* in it compared with the rest of the tissue, not by its most common cell. Each signature
is tested one-vs-rest per domain (Mann-Whitney U, scipy-identical, every column ranked once for all
domains), and the types above the largest drop ("elbow gap") in the sorted statistics are called.
A domain made of two types gets both ("Macrophages/Neutrophils"); no clear elbow -> "Unassigned".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy import stats

from spatial_assets.core.schema import DOMAIN, UNASSIGNED
from spatial_assets.domains.annotation.signatures import (
    SIGNATURE_SCORES_OBSM,
    TYPE_SEPARATOR,
    DomainAnnotationError,
    SignatureSource,
    score_signatures,
)

log = logging.getLogger(__name__)

DOMAIN_ANNOTATION_UNS = "domain_annotation"
DOMAIN_CELL_TYPE = "domain_cell_type"
SIGNATURE_CELL_TYPE = "signature_cell_type"

# --------------------------------------------------------------------------------------------
# enrichment per domain
# --------------------------------------------------------------------------------------------


def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _domain_labels(adata: AnnData, domain_key: str) -> tuple[np.ndarray, list[str]]:
    """(labels as str with '' for missing, ordered domain list) — categorical order wins."""
    if domain_key not in adata.obs:
        candidates = [c for c in adata.obs.columns if "domain" in c or c in ("layer", "region")]
        raise DomainAnnotationError(
            f"obs column {domain_key!r} not found; domain-like columns: {candidates}"
        )
    col = adata.obs[domain_key]
    present = col.dropna().astype(str)
    if isinstance(col.dtype, pd.CategoricalDtype):
        seen = set(present)
        order = [str(c) for c in col.cat.categories if str(c) in seen]
    else:
        order = sorted(present.unique(), key=_natural_key)
    labels = np.where(col.isna().to_numpy(), "", col.astype(str).to_numpy())
    return labels.astype(object), order


def _scores_frame(adata: AnnData, scores_key: str) -> pd.DataFrame:
    if scores_key not in adata.obsm:
        raise DomainAnnotationError(
            f"obsm[{scores_key!r}] not found: run score_signatures first "
            f"(available obsm: {list(adata.obsm)})"
        )
    scores = adata.obsm[scores_key]
    if not isinstance(scores, pd.DataFrame):
        raise DomainAnnotationError(f"obsm[{scores_key!r}] must be a DataFrame (one column per type)")
    return scores


def _group_codes(labels: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    index = {g: i for i, g in enumerate(groups)}
    return np.fromiter((index[v] for v in labels), dtype=np.int64, count=len(labels))


def _tie_term(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    counts = counts.astype(np.float64)
    return float(np.sum(counts**3 - counts))


def _rank_sums_dense(values: np.ndarray, codes: np.ndarray, n_groups: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(rank sums per group x column, tie term per column) for a dense block."""
    ranks = stats.rankdata(values, axis=0)
    onehot = sp.csr_matrix((np.ones(len(codes)), (np.arange(len(codes)), codes)),
                           shape=(len(codes), n_groups))
    sums = np.asarray(onehot.T @ ranks)
    ties = np.array([_tie_term(values[:, j]) for j in range(values.shape[1])])
    return sums, ties


def _rank_sums_sparse(x: sp.csc_matrix, codes: np.ndarray, n_groups: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank sums, tie terms and per-group sums of expm1(x) for non-negative sparse columns.

    Only the stored values are sorted: the implicit zeros are one tie block of known rank, so
    the cost follows the non-zeros, not n_cells x n_genes.
    """
    n = x.shape[0]
    n_in = np.bincount(codes, minlength=n_groups).astype(np.float64)
    sums = np.empty((n_groups, x.shape[1]))
    lin = np.empty((n_groups, x.shape[1]))
    ties = np.empty(x.shape[1])
    for j in range(x.shape[1]):
        lo, hi = x.indptr[j], x.indptr[j + 1]
        vals, rows = x.data[lo:hi].astype(np.float64), x.indices[lo:hi]
        n0 = n - len(vals)
        grp = codes[rows]
        nz_ranks = stats.rankdata(vals) + n0 if len(vals) else vals
        nz_in = np.bincount(grp, minlength=n_groups)
        sums[:, j] = (np.bincount(grp, weights=nz_ranks, minlength=n_groups)
                      + (n_in - nz_in) * (n0 + 1) / 2.0)
        lin[:, j] = np.bincount(grp, weights=np.expm1(vals), minlength=n_groups)
        ties[j] = float(n0) ** 3 - n0 + (_tie_term(vals) if len(vals) else 0.0)
    return sums, ties, lin


def _mwu_from_rank_sums(rank_sums: np.ndarray, n_in: np.ndarray, n: int, ties: np.ndarray
                        ) -> dict[str, np.ndarray]:
    """Mann-Whitney U of every group vs the rest from rank sums (groups x columns).

    Identical to ``scipy.stats.mannwhitneyu(method="asymptotic")`` with its default continuity
    and tie corrections; ranking every column once serves all groups.
    """
    n1 = n_in.astype(np.float64)[:, None]
    n2 = n - n1
    u1 = rank_sums - n1 * (n1 + 1) / 2.0
    var = n1 * n2 / 12.0 * ((n + 1) - ties[None, :] / (n * (n - 1)))
    sigma = np.sqrt(np.clip(var, 0.0, None))
    dev = u1 - n1 * n2 / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.sign(dev) * np.clip(np.abs(dev) - 0.5, 0.0, None) / sigma
    z = np.where(sigma > 0, z, 0.0)
    return {
        "u": u1,
        "z": z,
        "auc": u1 / (n1 * n2),
        "p": np.clip(2.0 * stats.norm.sf(np.abs(z)), 0.0, 1.0),
        "n1": np.broadcast_to(n1, u1.shape).astype(np.int64),
    }


def _mann_whitney_one_vs_rest(
    values: np.ndarray, labels: np.ndarray, domains: Sequence[str]
) -> dict[str, np.ndarray]:
    """Flattened (domain-major) one-vs-rest Mann-Whitney results for a dense matrix."""
    codes = _group_codes(labels, domains)
    sums, ties = _rank_sums_dense(values, codes, len(domains))
    n_in = np.bincount(codes, minlength=len(domains))
    return {k: v.ravel() for k, v in
            _mwu_from_rank_sums(sums, n_in, values.shape[0], ties).items()}


def rank_signatures_by_domain(
    adata: AnnData, *, domain_key: str = DOMAIN, scores_key: str = SIGNATURE_SCORES_OBSM
) -> pd.DataFrame:
    """One-vs-rest Mann-Whitney U of every signature score in every domain.

    Columns: ``domain, cell_type, statistic`` (signed normal z of U, continuity- and
    tie-corrected), ``effect`` (AUC = U / (n_in * n_out): probability that a cell of the domain
    scores higher than one outside it; 0.5 = no enrichment), ``u_statistic, n_cells, pval,
    pval_adj`` (Benjamini-Hochberg over the whole table), ``rank`` (1 = highest statistic within
    the domain). Cells with a missing domain are left out of both sides.
    """
    scores = _scores_frame(adata, scores_key)
    labels, domains = _domain_labels(adata, domain_key)
    keep = labels != ""
    if len(domains) < 2:
        raise DomainAnnotationError(
            f"obs[{domain_key!r}] has {len(domains)} domain(s); one-vs-rest needs at least 2"
        )
    values = scores.to_numpy(dtype=np.float64)[keep]
    if not np.all(np.isfinite(values)):
        raise DomainAnnotationError(f"obsm[{scores_key!r}] contains NaN/inf scores")
    res = _mann_whitney_one_vs_rest(values, labels[keep], domains)
    n_sig = values.shape[1]
    table = pd.DataFrame(
        {
            "domain": np.repeat(np.asarray(domains, dtype=object), n_sig),
            "cell_type": np.tile(np.asarray(scores.columns.astype(str), dtype=object), len(domains)),
            "statistic": res["z"],
            "effect": res["auc"],
            "u_statistic": res["u"],
            "n_cells": res["n1"].astype(np.int64),
            "pval": res["p"],
        }
    )
    table["pval_adj"] = stats.false_discovery_control(table["pval"].to_numpy(), method="bh")
    order = {d: i for i, d in enumerate(domains)}
    table["_d"] = table["domain"].map(order)
    table = table.sort_values(["_d", "statistic", "cell_type"], ascending=[True, False, True],
                              kind="mergesort")
    table["rank"] = table.groupby("_d").cumcount().astype(np.int64) + 1
    return table.drop(columns="_d").reset_index(drop=True)


def elbow_gap(
    statistics: Sequence[float], *, max_types: int = 3, n_candidates: int | None = None
) -> tuple[int, float]:
    """(number of types above the largest drop, that drop) for statistics sorted descending.

    Only the first ``min(max_types, n_candidates)`` positions may be cut after; the drop after
    the last value is measured down to 0 (no enrichment). Ties go to the fewer types.
    """
    s = np.asarray(statistics, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError("elbow_gap needs a non-empty 1-D sequence of statistics")
    if np.any(np.diff(s) > 1e-12):
        raise ValueError("elbow_gap needs statistics sorted in descending order")
    limit = min(max_types, s.size if n_candidates is None else n_candidates)
    if limit < 1:
        return 0, 0.0
    nxt = np.append(s[1:], 0.0)
    gaps = s[:limit] - nxt[:limit]
    best = gaps.max()
    k = int(np.argmax(gaps >= best - 1e-9 * max(1.0, abs(best))))  # float ties -> fewer types
    return k + 1, float(gaps[k])


def assign_domain_cell_types(
    ranking: pd.DataFrame,
    *,
    method: str = "elbow_gap",
    max_types: int = 3,
    min_gap: float = 0.1,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Call each domain's cell type(s): those above the largest gap in its sorted statistics.

    Candidates are the leading signatures with a positive statistic and ``pval_adj < alpha``
    (enriched, not merely present). The cut is placed at the largest drop among the first
    ``max_types`` candidates. ``min_gap`` is *relative* to the top statistic (z grows with the
    number of cells, so an absolute gap would not transfer between samples): when the largest
    drop is below ``min_gap * top`` the domain has no dominant types and is called "Unassigned",
    as is a domain without any enriched signature.

    Columns: ``domain, assigned_cell_types`` ("A/B"), ``n_types, gap, relative_gap, scores``
    (sorted statistics, for elbow plots), ``cell_types`` (names in that order).
    """
    if method != "elbow_gap":
        raise ValueError(f"unknown assignment method {method!r}; only 'elbow_gap' is implemented")
    if max_types < 1:
        raise ValueError(f"max_types must be >= 1, got {max_types}")
    needed = {"domain", "cell_type", "statistic", "pval_adj"}
    if not needed <= set(ranking.columns):
        raise DomainAnnotationError(
            f"ranking table lacks columns {sorted(needed - set(ranking.columns))}; "
            "use rank_signatures_by_domain"
        )
    rows = []
    for dom, sub in ranking.groupby("domain", sort=False):
        sub = sub.sort_values(["statistic", "cell_type"], ascending=[False, True], kind="mergesort")
        s = sub["statistic"].to_numpy(dtype=np.float64)
        names = sub["cell_type"].astype(str).tolist()
        ok = (s > 0) & (sub["pval_adj"].to_numpy(dtype=np.float64) < alpha)
        n_cand = int(np.argmin(ok)) if not ok.all() else len(ok)  # leading run of candidates
        n_types, gap = elbow_gap(s, max_types=max_types, n_candidates=n_cand)
        rel = gap / s[0] if n_types and s[0] > 0 else 0.0
        if n_types == 0 or rel < min_gap:
            label, n_types = UNASSIGNED, 0
        else:
            label = TYPE_SEPARATOR.join(names[:n_types])
        rows.append(
            {
                "domain": str(dom),
                "assigned_cell_types": label,
                "n_types": int(n_types),
                "gap": float(gap),
                "relative_gap": float(rel),
                "scores": [float(v) for v in s],
                "cell_types": names,
            }
        )
    return pd.DataFrame(rows)


def annotate_domains(
    adata: AnnData,
    signatures: SignatureSource,
    *,
    domain_key: str = DOMAIN,
    smooth: bool = False,
    layer: str | None = None,
    method: str = "zscore",
    max_types: int = 3,
    min_gap: float = 0.1,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[AnnData, pd.DataFrame]:
    """Scores -> one-vs-rest ranking -> elbow-gap calls, in one go (new AnnData + assignment).

    Writes obs ``domain_cell_type`` (the call of the cell's domain) and ``signature_cell_type``
    (per-cell argmax signature; "Unassigned" where no score is above the tissue average, i.e.
    all mean z <= 0), and ``uns['domain_annotation']`` (parameters, ranking, calls).
    """
    scored = score_signatures(adata, signatures, layer=layer, smooth=smooth, method=method,
                              seed=seed)
    ranking = rank_signatures_by_domain(scored, domain_key=domain_key)
    assignment = assign_domain_cell_types(ranking, max_types=max_types, min_gap=min_gap,
                                          alpha=alpha)
    calls = dict(zip(assignment["domain"], assignment["assigned_cell_types"]))
    log.info("domain calls (%s): %s", domain_key, calls)
    labels, _ = _domain_labels(scored, domain_key)
    per_cell = np.array([calls.get(d, UNASSIGNED) for d in labels], dtype=object)
    cats = sorted(set(per_cell))
    scored.obs[DOMAIN_CELL_TYPE] = pd.Categorical(per_cell, categories=cats)

    scores = scored.obsm[SIGNATURE_SCORES_OBSM]
    values = scores.to_numpy()
    best = np.asarray(scores.columns.astype(str), dtype=object)[np.argmax(values, axis=1)]
    best = np.where(values.max(axis=1) > 0, best, UNASSIGNED)
    scored.obs[SIGNATURE_CELL_TYPE] = pd.Categorical(best, categories=sorted(set(best)))
    scored.uns[DOMAIN_ANNOTATION_UNS] = {
        "domain_key": domain_key,
        "method": "elbow_gap",
        "max_types": int(max_types),
        "min_gap": float(min_gap),
        "alpha": float(alpha),
        "ranking": ranking,
        "assignment": assignment[["domain", "assigned_cell_types", "n_types", "gap",
                                  "relative_gap"]].copy(),
    }
    return scored, assignment
