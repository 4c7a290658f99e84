"""Bringing a landed spatial sample to the platform's AnnData contract (no Dagster)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from spatial_assets.core.ids import validate_id
from spatial_assets.core.lineage import content_hash
from spatial_assets.core.schema import SAMPLE_KEY, SPATIAL_OBSM


class SpatialInputError(ValueError):
    """A spatial sample that cannot be used as given (names the file and column)."""


_CONTROL_PREFIXES = ("blank", "negcontrol", "negprb", "unassigned", "deprecated", "antisense", "intergenic")


def panel_genes(adata: ad.AnnData) -> list[str]:
    """Panel genes: var_names without control probes (Blank-*, NegControl*, … or ``var['is_blank']``)."""
    names = [str(g) for g in adata.var_names]
    blank = np.array(
        [g.lower().replace("-", "").replace("_", "").startswith(_CONTROL_PREFIXES) for g in names], dtype=bool
    )
    if "is_blank" in adata.var.columns:
        blank |= adata.var["is_blank"].fillna(False).astype(bool).to_numpy()
    return [g for g, b in zip(names, blank) if not b]


def validate_spatial(adata: ad.AnnData, name: str) -> np.ndarray:
    """Refuse empty samples, duplicate cell ids and bad coordinates; return the (n, 2) coordinates."""
    if adata.n_obs == 0:
        raise SpatialInputError(f"{name}: spatial sample has no cells")
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()[:5].tolist()
        raise SpatialInputError(f"{name}: duplicate cell ids in obs_names, e.g. {dup}")
    return spatial_coordinates(adata, name)


def checked_coordinates(
    adata: ad.AnnData, coords: object, *, where: str, source: str, error: type[ValueError] = SpatialInputError
) -> np.ndarray:
    """``coords`` as a finite (n_obs, ≥2) float array, or ``error`` naming ``source`` and ``where``."""
    coords = coords.to_numpy() if isinstance(coords, pd.DataFrame) else coords
    try:
        coords = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise error(f"{source}: {where} has non-numeric coordinates ({exc})") from exc
    if coords.ndim != 2 or coords.shape[0] != adata.n_obs or coords.shape[1] < 2:
        raise error(f"{source}: {where} must be (n_obs, >= 2), got shape {coords.shape}")
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        first = adata.obs_names[np.flatnonzero(bad)[0]]
        raise error(f"{source}: {where} has NaN/infinite coordinates in {int(bad.sum())} cells (first: {first!r})")
    return coords


def spatial_coordinates(adata: ad.AnnData, source: str = "spatial data") -> np.ndarray:
    """``obsm['spatial']`` (or obs x/y columns) as a finite (n, 2) float array; errors name the column."""
    if SPATIAL_OBSM in adata.obsm:
        coords, where = adata.obsm[SPATIAL_OBSM], f"obsm['{SPATIAL_OBSM}']"
    elif {"x", "y"} <= set(adata.obs.columns):
        coords, where = adata.obs[["x", "y"]], "obs['x'], obs['y']"
    else:
        raise SpatialInputError(f"{source}: no coordinates: expected obsm['{SPATIAL_OBSM}'] or obs columns 'x' and 'y'")
    return checked_coordinates(adata, coords, where=where, source=source)[:, :2]


def prepare_spatial_cells(adata: ad.AnnData, *, sample_id: str, source: str) -> ad.AnnData:
    """Validated copy with ``obsm['spatial']``, ``obs['sample_id']`` and a content hash in ``uns``."""
    validate_id(sample_id, "sample id")
    coords = validate_spatial(adata, source)
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()][:5].tolist()
        raise SpatialInputError(f"{source}: duplicate gene names, e.g. {dup}")
    out = adata.copy()
    out.obsm[SPATIAL_OBSM] = coords
    out.obs[SAMPLE_KEY] = pd.Categorical([sample_id] * out.n_obs)
    out.uns["content_sha256"] = content_hash(out)
    out.uns["source_uri"] = source
    return out
