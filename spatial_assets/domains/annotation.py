"""Domain-level annotation: which cell types make up each tissue domain, and what marks it.

Why a domain-level call on top of per-cell typing: a domain is named by the cell types that are
*enriched* in it compared with the rest of the tissue, not by its most common cell. We score each
cell for every marker signature, test each signature one-vs-rest per domain (Mann-Whitney U), and
call the types above the largest drop ("elbow gap") in the sorted statistics. A domain made of two
types gets both ("Macrophages/Neutrophils"); a domain with no clear elbow stays "Unassigned".

Also here: cell-type composition per sample x domain (long table, parquet-friendly) and domain
marker genes (one-vs-rest Wilcoxon). No Dagster import: this is science code.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml
from anndata import AnnData
from scipy import stats

from spatial_assets.core.schema import CELL_TYPE, DOMAIN, SAMPLE_KEY, UNASSIGNED

log = logging.getLogger(__name__)

SIGNATURE_SCORES_OBSM = "signature_scores"
SIGNATURE_SCORING_UNS = "signature_scoring"
DOMAIN_ANNOTATION_UNS = "domain_annotation"
DOMAIN_CELL_TYPE = "domain_cell_type"
SIGNATURE_CELL_TYPE = "signature_cell_type"
SPATIAL_CONNECTIVITIES = "spatial_connectivities"  # squidpy naming
TYPE_SEPARATOR = "/"  # joins the cell types of one domain call

BUNDLED_SIGNATURES: dict[str, str] = {
    "mouse_brain": "signatures_mouse_brain.yaml",
    "human_immune": "signatures_human_immune.yaml",
}

RESOURCES_DIR = Path(__file__).resolve().parents[1] / "resources"  # shipped as package data

SignatureSource = str | Path | Mapping[str, Sequence[str]]


class SignatureError(ValueError):
    """A signature file or mapping that cannot be used (names the file and the key)."""


class DomainAnnotationError(ValueError):
    """Input that cannot be annotated per domain (missing column, too few domains, ...)."""


# --------------------------------------------------------------------------------------------
# signatures
# --------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML silently keeps the last one otherwise."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def bundled_signatures_path(name: str) -> Path:
    """Path of a signature YAML shipped with the package (``"mouse_brain"``, ``"human_immune"``)."""
    if name not in BUNDLED_SIGNATURES:
        raise SignatureError(
            f"no bundled signature set {name!r}; available: {sorted(BUNDLED_SIGNATURES)}"
        )
    return RESOURCES_DIR / BUNDLED_SIGNATURES[name]


def _signature_source_name(source: SignatureSource) -> str:
    if isinstance(source, Mapping):
        return "<signature mapping>"
    if isinstance(source, str) and source in BUNDLED_SIGNATURES:
        return str(bundled_signatures_path(source))
    return str(source)


def load_signatures(source: SignatureSource) -> dict[str, list[str]]:
    """Read and validate ``{cell_type: [genes]}`` from a YAML file, a bundled name or a mapping.

    Validation is strict because a silently mangled signature (YAML turns ``NO`` into ``False``,
    ``1-Mar`` stays a string but ``1e5`` does not) gives plausible-looking but wrong domain calls.
    Duplicate genes inside one signature are dropped (order kept).
    """
    where = _signature_source_name(source)
    if isinstance(source, Mapping):
        raw: Any = source
    else:
        path = Path(where)
        if not path.is_file():
            raise SignatureError(f"signature file {where} does not exist")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except yaml.YAMLError as exc:
            raise SignatureError(f"signature file {where} is not valid YAML: {exc}") from exc
    if not isinstance(raw, Mapping) or not raw:
        raise SignatureError(
            f"{where}: expected a non-empty mapping {{cell_type: [genes]}}, got {type(raw).__name__}"
        )
    out: dict[str, list[str]] = {}
    for key, genes in raw.items():
        if not isinstance(key, str) or not key.strip():
            raise SignatureError(f"{where}: signature name {key!r} is not a non-empty string")
        name = key.strip()
        if TYPE_SEPARATOR in name:
            raise SignatureError(
                f"{where}: signature name {name!r} contains {TYPE_SEPARATOR!r}, which joins the "
                "cell types of a domain call; rename it (e.g. 'L2-3' instead of 'L2/3')"
            )
        if isinstance(genes, str) or not isinstance(genes, Sequence) or len(genes) == 0:
            raise SignatureError(
                f"{where}: signature {name!r} must be a non-empty list of gene names, "
                f"got {genes!r}"
            )
        clean: list[str] = []
        for gene in genes:
            if not isinstance(gene, str) or not gene.strip():
                raise SignatureError(
                    f"{where}: signature {name!r} has a gene {gene!r} ({type(gene).__name__}) that "
                    "is not a non-empty string (quote gene names YAML would read as bool/number)"
                )
            if gene.strip() not in clean:
                clean.append(gene.strip())
        if name in out:
            raise SignatureError(f"{where}: signature {name!r} is defined twice")
        out[name] = clean
    return out


# --------------------------------------------------------------------------------------------
# expression
# --------------------------------------------------------------------------------------------


def _minimal_adata(adata: AnnData, *, layer: str | None, use_raw: bool) -> AnnData:
    """An AnnData holding only the expression to score (no copy of obs/obsm of the caller)."""
    obs = pd.DataFrame(index=adata.obs_names.copy())
    if use_raw and layer is not None:
        raise ValueError("use_raw=True and layer=... are exclusive: pick one expression source")
    if use_raw:
        if adata.raw is None:
            raise ValueError("use_raw=True but the AnnData has no .raw")
        return AnnData(X=adata.raw.X, obs=obs, var=pd.DataFrame(index=adata.raw.var_names.copy()))
    var = pd.DataFrame(index=adata.var_names.copy())
    if layer is not None:
        if layer not in adata.layers:
            raise ValueError(f"layer {layer!r} not found; available layers: {list(adata.layers)}")
        return AnnData(X=adata.layers[layer], obs=obs, var=var)
    # keep raw-count layers so normalization can start from counts when X is already transformed
    layers = {k: adata.layers[k] for k in ("counts", "raw_counts", "raw") if k in adata.layers}
    return AnnData(X=adata.X, obs=obs, var=var, layers=layers)


def _fallback_log_normalize(x: Any, target_sum: float = 1e4) -> Any:
    """log1p(target_sum-normalized) for integer/linear input; as-is when it already looks logged.

    Only used until ``spatial_assets.core.normalization`` is importable.
    """
    data = x.data if sp.issparse(x) else np.asarray(x)
    if data.size == 0:
        return x
    looks_linear = float(np.max(data)) > 50 or bool(np.all(np.abs(data - np.round(data)) < 1e-6))
    if not looks_linear:
        return x
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32)
        sums = np.asarray(x.sum(axis=1)).ravel()
        scale = np.divide(target_sum, sums, out=np.zeros_like(sums, dtype=np.float64), where=sums > 0)
        x = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ x)
        x.data = np.log1p(x.data)
        return x
    x = np.asarray(x, dtype=np.float32)
    sums = x.sum(axis=1, keepdims=True)
    return np.log1p(np.divide(x * target_sum, sums, out=np.zeros_like(x), where=sums > 0))


def log_normalized_expression(
    adata: AnnData, *, layer: str | None = None, use_raw: bool = False, seed: int = 0
) -> tuple[Any, pd.Index, str]:
    """(matrix, var_names, how) with log1p-10k expression; signature scores assume log scale."""
    base = _minimal_adata(adata, layer=layer, use_raw=use_raw)
    try:
        from spatial_assets.core.normalization import ensure_normalized
    except ImportError:  # pragma: no cover - only until the normalization module lands
        return _fallback_log_normalize(base.X), base.var_names, "fallback normalize_total+log1p"
    normalized = ensure_normalized(base, seed=seed)
    how = str(normalized.uns.get("normalization", {}).get("source_state", "ensure_normalized"))
    return normalized.X, normalized.var_names, f"ensure_normalized ({how})"


# --------------------------------------------------------------------------------------------
# signature scores
# --------------------------------------------------------------------------------------------


def _column_mean_std(x: Any) -> tuple[np.ndarray, np.ndarray]:
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float64)
        mean = np.asarray(x.mean(axis=0)).ravel()
        sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    else:
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=0)
        sq = (x * x).mean(axis=0)
    return mean, np.sqrt(np.clip(sq - mean * mean, 0.0, None))


def _smooth(values: np.ndarray, graph: Any) -> np.ndarray:
    """Mean over self + graph neighbours; weights ignored so the builder's scaling can't matter."""
    adj = sp.csr_matrix(graph, dtype=np.float64, copy=True)
    adj.data = np.ones_like(adj.data)
    adj = adj + sp.identity(adj.shape[0], format="csr", dtype=np.float64)
    adj.data = np.ones_like(adj.data)  # self-loops already present count once
    deg = np.asarray(adj.sum(axis=1)).ravel()
    return (sp.diags(1.0 / deg) @ adj) @ values


def score_signatures(
    adata: AnnData,
    signatures: SignatureSource,
    *,
    layer: str | None = None,
    smooth: bool = False,
    use_raw: bool = False,
    method: str = "zscore",
    seed: int = 0,
) -> AnnData:
    """Per-cell signature scores in ``obsm['signature_scores']`` (a new AnnData is returned).

    ``method="zscore"`` (default): each gene is z-scored over all cells of the object
    (log1p-10k expression), and a cell's score is the mean z of the signature genes present.
    Chosen over scanpy's control-gene score because it needs no random control set and no
    expression bins, which are unstable on 150-500 gene panels; it is computed with one sparse
    product, never densifying the matrix. ``method="scanpy"``: ``scanpy.tl.score_genes``
    (control-gene-subtracted, ``random_state=seed``).

    Genes absent from the panel (or constant across cells) are skipped and reported in a warning
    and in ``uns['signature_scoring']['missing_genes']`` (a long table: signature, gene).
    A signature without any usable gene is dropped; if none is left -> ``SignatureError``.
    ``smooth=True`` averages every score over the cell and its neighbours in
    ``obsp['spatial_connectivities']``, which steadies sparse single-cell panels.
    """
    if method not in ("zscore", "scanpy"):
        raise ValueError(f"unknown scoring method {method!r}; use 'zscore' or 'scanpy'")
    source = _signature_source_name(signatures)
    sigs = load_signatures(signatures)
    if smooth and SPATIAL_CONNECTIVITIES not in adata.obsp:
        raise DomainAnnotationError(
            f"smooth=True needs obsp[{SPATIAL_CONNECTIVITIES!r}] (the spatial graph); "
            f"available obsp keys: {list(adata.obsp)}"
        )
    x, var_names, how = log_normalized_expression(adata, layer=layer, use_raw=use_raw, seed=seed)
    gene_pos = pd.Index(var_names)
    if not gene_pos.is_unique:
        dupes = gene_pos[gene_pos.duplicated()].unique()[:5].tolist()
        raise DomainAnnotationError(f"var_names are not unique (e.g. {dupes}); cannot score genes")
    wanted = sorted({g for genes in sigs.values() for g in genes if g in gene_pos})
    idx = gene_pos.get_indexer(wanted)
    sub = x[:, idx] if len(idx) else None
    mean, std = _column_mean_std(sub) if sub is not None else (np.array([]), np.array([]))
    constant = {g for g, s in zip(wanted, std) if not s > 0}

    missing_rows: list[tuple[str, str]] = []
    used_rows: list[tuple[str, str]] = []
    used: dict[str, list[str]] = {}
    dropped: list[str] = []
    for name, genes in sigs.items():
        present = [g for g in genes if g in gene_pos and g not in constant]
        missing_rows += [(name, g) for g in genes if g not in gene_pos]
        missing_rows += [(name, g) for g in genes if g in constant]
        if present:
            used[name] = present
            used_rows += [(name, g) for g in present]
        else:
            dropped.append(name)
    if missing_rows:
        by_sig: dict[str, list[str]] = {}
        for name, gene in missing_rows:
            by_sig.setdefault(name, []).append(gene)
        detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in by_sig.items())
        warnings.warn(
            f"{source}: {len(missing_rows)} signature genes absent from the panel or constant "
            f"({detail})",
            UserWarning,
            stacklevel=2,
        )
    if dropped:
        warnings.warn(
            f"{source}: signatures dropped, no gene of theirs in the panel: {dropped}",
            UserWarning,
            stacklevel=2,
        )
    if not used:
        raise SignatureError(
            f"{source}: no gene of any signature ({list(sigs)}) is in the panel "
            f"(panel genes e.g. {list(gene_pos[:5])}); check organism/gene symbol style"
        )

    names = list(used)
    if method == "zscore":
        col = {g: i for i, g in enumerate(wanted)}
        weights = np.zeros((len(wanted), len(names)))
        for j, name in enumerate(names):
            rows = [col[g] for g in used[name]]
            weights[rows, j] = 1.0 / (std[rows] * len(rows))
        offset = mean @ weights
        scores = np.asarray(sub @ weights, dtype=np.float64) - offset
    else:
        import scanpy as sc  # heavy import, only for this method

        tmp = AnnData(X=x, obs=pd.DataFrame(index=adata.obs_names.copy()),
                      var=pd.DataFrame(index=gene_pos.copy()))
        scores = np.empty((adata.n_obs, len(names)))
        for j, name in enumerate(names):
            ctrl = max(1, min(50, tmp.n_vars - len(used[name])))
            sc.tl.score_genes(tmp, used[name], ctrl_size=ctrl, n_bins=min(25, tmp.n_vars),
                              random_state=seed, use_raw=False, score_name="_score")
            scores[:, j] = tmp.obs["_score"].to_numpy()
    if smooth:
        scores = _smooth(scores, adata.obsp[SPATIAL_CONNECTIVITIES])

    out = adata.copy()
    out.obsm[SIGNATURE_SCORES_OBSM] = pd.DataFrame(scores, index=out.obs_names, columns=names)
    out.uns[SIGNATURE_SCORING_UNS] = {
        "method": method,
        "source": source,
        "expression": how,
        "layer": layer if layer is not None else "X",
        "use_raw": bool(use_raw),
        "smoothed": bool(smooth),
        "signatures": names,
        "dropped_signatures": dropped,
        "missing_genes": pd.DataFrame(missing_rows, columns=["signature", "gene"], dtype=str),
        "genes_used": pd.DataFrame(used_rows, columns=["signature", "gene"], dtype=str),
    }
    return out


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


# --------------------------------------------------------------------------------------------
# composition and markers
# --------------------------------------------------------------------------------------------


def domain_composition(
    adata: AnnData,
    *,
    domain_key: str = DOMAIN,
    cell_type_key: str = CELL_TYPE,
    sample_key: str | None = SAMPLE_KEY,
) -> pd.DataFrame:
    """Long table ``sample_id, domain, cell_type, n_cells, fraction`` (fraction within
    sample x domain), plain str/int/float columns so it writes to parquet as is.

    Without a sample column (``sample_key=None``, or the default ``sample_id`` absent) all
    cells form one sample called ``"all"``; an explicitly named but absent column is an error.
    """
    for key in (domain_key, cell_type_key):
        if key not in adata.obs:
            raise DomainAnnotationError(
                f"obs column {key!r} not found; available: {list(adata.obs.columns)}"
            )
    if sample_key is not None and sample_key not in adata.obs:
        if sample_key != SAMPLE_KEY:
            raise DomainAnnotationError(
                f"sample column {sample_key!r} not found; available: {list(adata.obs.columns)}"
            )
        sample_key = None
    frame = pd.DataFrame(
        {
            "sample_id": adata.obs[sample_key].astype(str).to_numpy() if sample_key else "all",
            "domain": adata.obs[domain_key].astype(object).to_numpy(),
            "cell_type": adata.obs[cell_type_key].astype(object).to_numpy(),
        }
    )
    n_missing = int(frame["domain"].isna().sum())
    if n_missing:
        warnings.warn(f"{n_missing} cells without a domain left out of the composition",
                      UserWarning, stacklevel=2)
        frame = frame[frame["domain"].notna()]
    frame["cell_type"] = frame["cell_type"].where(frame["cell_type"].notna(), UNASSIGNED)
    frame = frame.astype({"domain": str, "cell_type": str})
    counts = frame.groupby(["sample_id", "domain", "cell_type"], sort=False).size()
    out = counts.rename("n_cells").reset_index()
    totals = out.groupby(["sample_id", "domain"])["n_cells"].transform("sum")
    out["fraction"] = (out["n_cells"] / totals).astype(np.float64)
    out["n_cells"] = out["n_cells"].astype(np.int64)
    domain_order = sorted(out["domain"].unique(), key=_natural_key)
    out["_d"] = out["domain"].map({d: i for i, d in enumerate(domain_order)})
    out = out.sort_values(["sample_id", "_d", "n_cells", "cell_type"],
                          ascending=[True, True, False, True], kind="mergesort")
    return out.drop(columns="_d").reset_index(drop=True).astype(
        {"sample_id": str, "domain": str, "cell_type": str}
    )


def domain_marker_genes(
    adata: AnnData,
    *,
    domain_key: str = DOMAIN,
    n_genes: int = 10,
    layer: str | None = None,
    chunk_genes: int = 64,
) -> pd.DataFrame:
    """Top marker genes per domain: one-vs-rest Wilcoxon rank-sum on log1p-10k expression.

    Same test as ``rank_signatures_by_domain`` (scipy-equivalent Mann-Whitney U, tie- and
    continuity-corrected); no scanpy/numba import. Sparse input is ranked on its non-zeros only
    (zeros are one tie block), dense input in blocks of ``chunk_genes`` genes, so memory stays
    near the input's own size. Long table ``domain, gene, score`` (z),
    ``logfoldchange`` (log2 of the ratio of mean expm1 expression, scanpy's convention),
    ``pval, pval_adj`` (BH over all genes within the domain), ``rank`` (1 = highest z); only
    genes with z > 0 (higher in the domain) are reported. Domains with fewer than 2 cells are
    skipped with a warning.
    """
    if n_genes < 1:
        raise ValueError(f"n_genes must be >= 1, got {n_genes}")
    labels, domains = _domain_labels(adata, domain_key)
    sizes = {d: int(np.sum(labels == d)) for d in domains}
    small = [d for d in domains if sizes[d] < 2]
    if small:
        warnings.warn(f"domains with < 2 cells skipped for markers: {small}", UserWarning,
                      stacklevel=2)
    testable = [d for d in domains if sizes[d] >= 2]
    if len(testable) < 2:
        raise DomainAnnotationError(
            f"obs[{domain_key!r}] needs at least 2 domains with >= 2 cells for marker genes"
        )
    x, var_names, _ = log_normalized_expression(adata, layer=layer)
    keep = np.isin(labels, testable)
    x = x[keep] if not keep.all() else x
    codes = _group_codes(labels[keep], testable)
    n, n_var, n_dom = x.shape[0], x.shape[1], len(testable)
    n_in = np.bincount(codes, minlength=n_dom)
    sums = np.empty((n_dom, n_var))
    lin = np.empty((n_dom, n_var))
    ties = np.empty(n_var)
    if sp.issparse(x) and (x.nnz == 0 or x.data.min() >= 0):
        x = sp.csc_matrix(x, dtype=np.float64, copy=True)
        x.eliminate_zeros()  # stored zeros must join the implicit zero tie block
        for start in range(0, n_var, chunk_genes):
            stop = min(start + chunk_genes, n_var)
            sl = slice(start, stop)
            sums[:, sl], ties[sl], lin[:, sl] = _rank_sums_sparse(x[:, sl], codes, n_dom)
    else:
        onehot = sp.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, n_dom))
        for start in range(0, n_var, chunk_genes):
            stop = min(start + chunk_genes, n_var)
            block = x[:, start:stop]
            block = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)
            sums[:, start:stop], ties[start:stop] = _rank_sums_dense(block, codes, n_dom)
            lin[:, start:stop] = np.asarray(onehot.T @ np.expm1(block))
    res = _mwu_from_rank_sums(sums, n_in, n, ties)
    z, p = res["z"], res["p"]
    total = lin.sum(axis=0, keepdims=True)
    mean_in = lin / n_in[:, None]
    mean_out = (total - lin) / (n - n_in)[:, None]
    lfc = np.log2((mean_in + 1e-9) / (mean_out + 1e-9))
    genes = np.asarray(pd.Index(var_names).astype(str), dtype=object)
    frames = []
    for i, dom in enumerate(testable):
        padj = stats.false_discovery_control(p[i], method="bh")
        order = np.lexsort((genes, -z[i]))  # z descending, gene name breaks ties
        order = order[z[i][order] > 0][:n_genes]
        frames.append(pd.DataFrame({
            "domain": dom,
            "gene": genes[order],
            "score": z[i][order],
            "logfoldchange": lfc[i][order],
            "pval": p[i][order],
            "pval_adj": padj[order],
            "rank": np.arange(1, len(order) + 1, dtype=np.int64),
        }))
    out = pd.concat(frames, ignore_index=True)
    return out.astype({"domain": str, "gene": str})
