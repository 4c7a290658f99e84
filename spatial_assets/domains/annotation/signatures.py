"""Marker signatures: loading (strict YAML), log expression for scoring, per-cell signature scores.

Why strict loading: a silently mangled signature (YAML reads ``NO`` as ``False``, ``1e5`` as a number)
gives plausible-looking but wrong domain calls. Expression comes from ``core.normalization`` (the one
place log1p-10k is detected and applied); scores are mean z of the signature genes.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml
from anndata import AnnData

from spatial_assets.core.normalization import log_normalized

SIGNATURE_SCORES_OBSM = "signature_scores"
SIGNATURE_SCORING_UNS = "signature_scoring"
SPATIAL_CONNECTIVITIES = "spatial_connectivities"  # squidpy naming
TYPE_SEPARATOR = "/"  # joins the cell types of one domain call

BUNDLED_SIGNATURES: dict[str, str] = {
    "mouse_brain": "signatures_mouse_brain.yaml",
    "human_immune": "signatures_human_immune.yaml",
}

RESOURCES_DIR = Path(__file__).resolve().parents[2] / "resources"  # shipped as package data

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

def log_normalized_expression(
    adata: AnnData, *, layer: str | None = None, use_raw: bool = False, seed: int = 0
) -> tuple[Any, pd.Index, str]:
    """(matrix, var_names, how) with log1p-10k expression; signature scores assume log scale."""
    base = _minimal_adata(adata, layer=layer, use_raw=use_raw)
    x, record = log_normalized(base, seed=seed)
    return x, base.var_names, f"ensure_normalized ({record['source_state']})"


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
