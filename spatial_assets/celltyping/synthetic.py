"""Seeded synthetic cell-typing data: two scRNA-seq references and one imaging-like spatial sample.

Why: the real POA pair is small; scaling and memory need 20k-cell references and queries with a
known truth, plus the difficulties seen in real data: label synonyms between references
("Macrophages" vs "macrophage"), a batch effect between references, and a platform effect on the
spatial side (per-gene detection efficiency, lower depth, a ~400-gene panel with Blank probes).

Counts are gamma-Poisson (negative binomial) draws from per-type expression profiles, generated
in row chunks straight into CSR so memory stays near the size of the sparse output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

#: (spelling in reference A, spelling in reference B); the first is also the truth label
TYPE_SYNONYMS: tuple[tuple[str, str], ...] = (
    ("B cells", "B cell"),
    ("CD4+ T cells", "CD4 T"),
    ("CD8+ T cells", "CD8 T"),
    ("Macrophages", "macrophage"),
    ("NK cells", "natural killer cell"),
    ("Monocytes", "monocyte"),
    ("Fibroblasts", "fibroblast"),
    ("Endothelial cells", "endothelial cell"),
    ("Epithelial cells", "epithelial cell"),
    ("Plasma cells", "plasma cell"),
    ("Dendritic cells", "dendritic cell"),
    ("Mast cells", "mast cell"),
    ("Smooth muscle cells", "smooth muscle cell"),
    ("Adipocytes", "adipocyte"),
    ("Neutrophils", "neutrophil"),
)


@dataclass
class SyntheticCellTyping:
    references: list[AnnData]
    reference_names: list[str]
    spatial: AnnData
    #: any reference spelling → truth label (for score_against_labels)
    label_map: dict[str, str] = field(default_factory=dict)
    truth_column: str = "true_cell_type"
    label_column: str = "cell_type"


def _profiles(
    rng: np.random.Generator, n_types: int, n_genes: int, panel_idx: np.ndarray, n_markers: int, marker_lfc: tuple[float, float]
) -> np.ndarray:
    """Per-type log expression (types x genes): shared baseline + type markers + small noise."""
    base = rng.normal(0.0, 1.2, size=n_genes)
    prof = base[None, :] + rng.normal(0.0, 0.25, size=(n_types, n_genes))
    for k in range(n_types):
        # half of every type's markers are on the panel, so the panel can tell types apart
        on_panel = rng.choice(panel_idx, size=n_markers // 2, replace=False)
        off_panel = rng.choice(np.setdiff1d(np.arange(n_genes), panel_idx), size=n_markers - n_markers // 2, replace=False)
        markers = np.concatenate([on_panel, off_panel])
        prof[k, markers] += rng.uniform(marker_lfc[0], marker_lfc[1], size=markers.size)
    return prof


def _counts(
    rng: np.random.Generator,
    types: np.ndarray,
    probs: np.ndarray,
    depth: float,
    *,
    depth_sd: float = 0.4,
    shape: float = 4.0,
    chunk: int = 2000,
) -> sp.csr_matrix:
    """Gamma-Poisson counts in chunks; ``probs`` rows sum to 1 (types x genes)."""
    n = len(types)
    lib = depth * np.exp(rng.normal(0.0, depth_sd, size=n))
    parts = []
    for start in range(0, n, chunk):
        t = types[start : start + chunk]
        mu = probs[t] * lib[start : start + chunk, None]
        lam = rng.gamma(shape, mu / shape)
        parts.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    return sp.vstack(parts, format="csr")


def _composition(rng: np.random.Generator, n_types: int, n: int, concentration: float) -> np.ndarray:
    p = rng.dirichlet(np.full(n_types, concentration))
    p = 0.5 * p + 0.5 / n_types  # every type present
    return rng.choice(n_types, size=n, p=p / p.sum())


def make_celltyping_data(
    *,
    n_ref_cells: tuple[int, ...] = (14_000, 6_000),
    n_spatial: int = 20_000,
    n_genes: int = 1_000,
    n_panel: int = 400,
    n_types: int = 12,
    n_markers: int = 20,
    marker_lfc: tuple[float, float] = (0.7, 1.8),
    n_blank: int = 10,
    ref_depth: float = 3_000.0,
    spatial_depth: float = 200.0,
    batch_sd: float = 0.3,
    platform_sd: float = 0.5,
    seed: int = 0,
) -> SyntheticCellTyping:
    """References A, B, ... (label spellings alternate between the two synonym columns) and a
    spatial sample over ``n_panel`` genes plus ``n_blank`` ``Blank-*`` probes.

    Platform effect: every panel gene's rate is multiplied by a lognormal efficiency
    (sd ``platform_sd``); references differ by a lognormal batch factor (sd ``batch_sd``).
    """
    if not 2 <= n_types <= len(TYPE_SYNONYMS):
        raise ValueError(f"n_types must be in [2, {len(TYPE_SYNONYMS)}], got {n_types}")
    if n_panel > n_genes:
        raise ValueError(f"n_panel ({n_panel}) exceeds n_genes ({n_genes})")
    rng = np.random.default_rng(seed)
    genes = np.array([f"Gene{i:05d}" for i in range(n_genes)])
    panel_idx = np.sort(rng.choice(n_genes, size=n_panel, replace=False))
    prof = _profiles(rng, n_types, n_genes, panel_idx, n_markers, marker_lfc)

    references, names = [], []
    for r, n in enumerate(n_ref_cells):
        batch = np.exp(rng.normal(0.0, batch_sd, size=n_genes))
        p = np.exp(prof) * batch[None, :]
        p /= p.sum(axis=1, keepdims=True)
        types = _composition(rng, n_types, n, concentration=2.0)
        X = _counts(rng, types, p, ref_depth)
        spelling = [TYPE_SYNONYMS[k][r % 2] for k in range(n_types)]
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical(np.array(spelling, dtype=object)[types])},
            index=[f"ref{r}_cell{i}" for i in range(n)],
        )
        references.append(AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes)))
        names.append(f"synthetic_ref_{chr(65 + r)}")

    eff = np.exp(rng.normal(0.0, platform_sd, size=n_panel))
    p = np.exp(prof[:, panel_idx]) * eff[None, :]
    p /= p.sum(axis=1, keepdims=True)
    types = _composition(rng, n_types, n_spatial, concentration=0.7)
    Xs = _counts(rng, types, p, spatial_depth)
    blank = sp.csr_matrix(rng.poisson(0.05, size=(n_spatial, n_blank)).astype(np.float32))
    Xs = sp.hstack([Xs, blank], format="csr")
    var = pd.DataFrame(index=list(genes[panel_idx]) + [f"Blank-{i}" for i in range(n_blank)])
    var["is_blank"] = [False] * n_panel + [True] * n_blank
    truth = np.array([TYPE_SYNONYMS[k][0] for k in range(n_types)], dtype=object)[types]
    obs = pd.DataFrame({"true_cell_type": pd.Categorical(truth)}, index=[f"spot_cell{i}" for i in range(n_spatial)])
    spatial = AnnData(X=Xs, obs=obs, var=var)
    spatial.obsm["spatial"] = rng.uniform(0, 5000, size=(n_spatial, 2)).astype(np.float32)

    label_map = {}
    for k in range(n_types):
        for s in TYPE_SYNONYMS[k]:
            label_map[s] = TYPE_SYNONYMS[k][0]
    return SyntheticCellTyping(references=references, reference_names=names, spatial=spatial, label_map=label_map)


def write_celltyping_data(out_dir: str | os.PathLike[str], **kwargs: object) -> dict[str, object]:
    """Write the references and spatial sample as h5ad; returns paths and the label map."""
    data = make_celltyping_data(**kwargs)  # type: ignore[arg-type]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref_paths = []
    for name, ref in zip(data.reference_names, data.references):
        path = out / f"{name}.h5ad"
        ref.write_h5ad(path)
        ref_paths.append(str(path))
    spatial_path = out / "synthetic_spatial.h5ad"
    data.spatial.write_h5ad(spatial_path)
    return {"references": ref_paths, "spatial": str(spatial_path), "label_map": data.label_map}


def platform_split(
    adata: AnnData,
    label_column: str,
    *,
    query_fraction: float = 0.5,
    efficiency_sd: float = 0.5,
    depth: float = 0.5,
    seed: int = 0,
) -> tuple[AnnData, AnnData]:
    """Split a labelled raw-count dataset into a log1p-10k reference and a raw-count query with a
    simulated platform effect, so a second real case exists for transfer measurements.

    Why: only one real reference/spatial pair is bundled. The query's counts are binomially thinned
    with a per-gene detection efficiency ``depth * lognormal(0, efficiency_sd)`` (clipped to 1):
    lower depth plus a per-gene shift, the two effects seen between scRNA-seq and imaging panels.
    Cells with a missing label are dropped. The reference obs column is ``cell_type``; the query
    keeps the truth in ``label_column``.
    """
    if label_column not in adata.obs.columns:
        raise ValueError(f"platform_split: no obs column {label_column!r}")
    if not 0.0 < query_fraction < 1.0:
        raise ValueError(f"query_fraction must be in (0, 1), got {query_fraction}")
    labelled = adata.obs[label_column].notna().to_numpy()
    X = sp.csr_matrix(adata.X, dtype=np.float32)[labelled]
    labels = adata.obs[label_column].astype(str).to_numpy()[labelled]
    names = adata.obs_names[labelled]
    if X.nnz and not np.allclose(X.data, np.round(X.data)):
        raise ValueError("platform_split: X must hold raw integer counts")
    rng = np.random.default_rng(seed)
    is_q = rng.random(X.shape[0]) < query_fraction
    genes = pd.Index(adata.var_names.astype(str))

    R = X[~is_q].copy()
    tot = np.asarray(R.sum(axis=1)).ravel()
    R = sp.csr_matrix(sp.diags((1e4 / np.maximum(tot, 1)).astype(np.float32)) @ R)
    R.data = np.log1p(R.data)
    ref = AnnData(
        X=R.astype(np.float32),
        obs=pd.DataFrame({"cell_type": pd.Categorical(labels[~is_q])}, index=names[~is_q]),
        var=pd.DataFrame(index=genes),
    )
    eff = np.clip(depth * np.exp(rng.normal(0.0, efficiency_sd, size=X.shape[1])), 0.0, 1.0)
    Q = X[is_q].copy()
    Q.data = rng.binomial(Q.data.astype(np.int64), eff[Q.indices]).astype(np.float32)
    Q.eliminate_zeros()
    query = AnnData(
        X=Q, obs=pd.DataFrame({label_column: pd.Categorical(labels[is_q])}, index=names[is_q]), var=pd.DataFrame(index=genes)
    )
    query.obsm["spatial"] = rng.uniform(0, 1000, size=(query.n_obs, 2)).astype(np.float32)
    return ref, query
