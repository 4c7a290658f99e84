"""Private working copies Novae may mutate (log expression, rescaled coordinates, its graph), and the
gene vocabulary of a new network."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData

from spatial_assets.core.normalization import NormalizationError, log_normalized
from spatial_assets.core.schema import SPATIAL_OBSM
from spatial_assets.domains.engine import DomainInputError, sample_label, validate_sample_key, validate_spatial
from spatial_assets.domains.graph import median_nn_distance
from spatial_assets.domains.novae.checkpoint import NovaeCheckpointError
from spatial_assets.domains.novae.runtime import _novae

# working-copy column names (private; never reach the caller's objects)
_SLIDE_COL = "_novae_slide"
_LATENT = "novae_latent"  # novae.Keys.REPR
_VALID = "neighborhood_valid"  # novae.Keys.IS_VALID_OBS
_NN_TARGET_UM = 10.0  # typical centroid-to-nearest-centroid distance in tissue


def _select_genes(adatas: Sequence[AnnData], max_genes: int) -> list[str]:
    """Lower-cased sorted vocabulary. Targeted panels (≤ max_genes) keep every gene; larger ones keep
    the union of per-sample top-``max_genes`` HVGs. Sorted because Novae's own union is a python set
    (order changes between processes, and with it the gene embedding init)."""
    genes: set[str] = set()
    for a in adatas:
        names = pd.Index(a.var_names).str.lower()
        if a.n_vars <= max_genes:
            genes.update(names)
            continue
        tmp = AnnData(X=_log_expression(a, "input"), var=pd.DataFrame(index=names))
        sc.pp.highly_variable_genes(tmp, n_top_genes=max_genes)
        genes.update(tmp.var_names[tmp.var["highly_variable"].to_numpy()])
    return sorted(genes)


def _log_expression(adata: AnnData, name: str) -> Any:
    """log1p(counts per 1e4) as core.normalization decides (raw counts in layers/X, log1p-10k as is).

    Why a fixed target sum: a cell's values must not depend on which other cells are in the batch.
    """
    if adata.X is None:
        raise DomainInputError(f"{name}: no expression matrix (X is None)")
    x = adata.X
    data = x.data if sp.issparse(x) else np.asarray(x)
    if data.size and (not np.all(np.isfinite(data)) or data.min() < 0):
        raise DomainInputError(f"{name}: expression has negative or non-finite values (need counts or log1p data)")
    try:
        out, _ = log_normalized(adata)
    except NormalizationError as exc:
        raise DomainInputError(f"{name}: {exc}") from exc
    return out


def _working_copy(
    adata: AnnData, index: int, sample_key: str | None, radius_factor: float
) -> tuple[AnnData, dict[str, Any]]:
    """A private AnnData Novae may mutate: log expression, coordinates rescaled so the median nearest-
    neighbour distance is 10 µm (scale-free: units do not matter), Delaunay graph pruned at
    ``radius_factor`` × that distance, one slide id per (input, sample)."""
    name = sample_label(adata, index)
    xy = validate_spatial(adata, name)[:, :2]
    validate_sample_key(adata, sample_key, name)
    groups = adata.obs[sample_key].astype(str).to_numpy() if sample_key else np.full(adata.n_obs, "all")
    slide = np.char.add(f"s{index}:", groups.astype(str))
    scaled = np.empty_like(xy)
    per_group: dict[str, float] = {}
    for g in pd.unique(groups):
        m = groups == g
        if m.sum() < 3:
            raise DomainInputError(f"{name}: sample {g!r} has {int(m.sum())} cells; Novae needs a spatial graph")
        d = median_nn_distance(xy[m])
        per_group[str(g)] = d
        scaled[m] = xy[m] * (_NN_TARGET_UM / d)
    work = AnnData(
        X=_log_expression(adata, name),
        obs=pd.DataFrame({_SLIDE_COL: pd.Categorical(slide)}, index=pd.Index(adata.obs_names.astype(str))),
        var=pd.DataFrame(index=pd.Index(adata.var_names).str.lower()),
    )
    if not work.var_names.is_unique:
        dup = work.var_names[work.var_names.duplicated()][0]
        raise DomainInputError(f"{name}: gene {dup!r} appears twice (case-insensitive)")
    work.obs_names_make_unique()
    work.obsm[SPATIAL_OBSM] = scaled
    work.var["highly_variable"] = True  # gene choice is ours (vocabulary), not Novae's per-call HVG
    novae = _novae()
    novae.spatial_neighbors(work, slide_key=_SLIDE_COL, radius=radius_factor * _NN_TARGET_UM, verbose=False)
    degree = float(work.obsp["spatial_connectivities"].getnnz(axis=1).mean())
    info = {"median_nn_distance_input_units": per_group, "mean_degree": degree}
    return work, info


def _check_gene_overlap(adata: AnnData, vocabulary: Sequence[str], name: str, min_genes: int = 20) -> int:
    voc = set(vocabulary)
    genes = pd.Index(adata.var_names).str.lower()
    known = int(np.isin(genes, list(voc)).sum())
    if known < min_genes:
        missing = [g for g in genes if g not in voc][:5]
        raise NovaeCheckpointError(
            f"{name}: only {known} of {len(genes)} genes are in the model's vocabulary of {len(voc)} "
            f"(need >= {min_genes}); e.g. not in vocabulary: {missing}"
        )
    return known
