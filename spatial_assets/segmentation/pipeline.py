"""``segment(sample, method=...)`` → :class:`SegmentationResult`: cells AnnData, boundaries, transcripts.

The contract every method meets (and the platform stores):

* ``cells``: AnnData, cells × features raw integer counts (control probes kept, ``var['is_control']``),
  ``obsm['spatial']`` = cell centroid in µm, ``obs``: ``area_um2``, ``n_transcripts``,
  ``nucleus_area_um2`` (NaN when unknown), ``n_genes``; ``uns['segmentation']``: platform, method,
  parameters, library versions, transcript totals.
* ``boundaries``: GeoDataFrame (µm) indexed by the obs names.
* ``transcripts``: one row per input transcript: ``transcript_index`` (row in the input table),
  ``cell_id`` (an obs name or null), ``x``, ``y``, ``z``, ``gene`` (+ ``vendor_cell_id`` when the
  instrument assigned one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from spatial_assets.segmentation.aggregation import assign_transcripts, count_matrix, is_control
from spatial_assets.segmentation.errors import SegmentationInputError
from spatial_assets.segmentation.methods import (
    METHODS,
    check_method_available,
    default_method,
    run_comseg,
    run_external,
    run_watershed,
)
from spatial_assets.segmentation.nuclei import WatershedParams
from spatial_assets.segmentation.sample import RawSample

SEGMENTATION_UNS = "segmentation"
TRACKED = ("sopa", "spatialdata", "spatialdata-io", "scikit-image", "geopandas", "shapely", "anndata", "numpy", "comseg")


@dataclass
class SegmentationResult:
    cells: Any  # AnnData
    boundaries: Any  # GeoDataFrame
    transcripts: pd.DataFrame
    summary: dict = field(default_factory=dict)


def _versions() -> dict[str, str]:
    from spatial_assets.core.lineage import library_versions

    return library_versions(TRACKED)


def _vendor_segmentation(sample: RawSample) -> tuple[np.ndarray, Any, Any, pd.DataFrame | None, Any]:
    """(per-transcript cell id or None, boundaries GeoDataFrame, vendor table or None, obs, nuclei)."""
    import geopandas as gpd

    v = sample.vendor
    if v is None:
        raise SegmentationInputError(
            f"{sample.folder}: --method vendor, but the folder has no instrument segmentation "
            f"({'cell_boundaries.parquet' if sample.platform == 'merscope' else 'cells.parquet + cell_feature_matrix.h5' if sample.platform == 'xenium' else 'CellLabels/ or cell_ID'})"
        )
    tx = sample.transcripts
    if sample.platform == "merscope" and v.per_plane:
        # each transcript goes to the vendor outline of its own z plane
        ids = np.full(len(tx), None, dtype=object)
        for plane, gdf in v.per_plane.items():
            sel = np.flatnonzero(tx["z_plane"].to_numpy() == plane)
            if sel.size == 0:
                continue
            pos = assign_transcripts(tx["x"].to_numpy()[sel], tx["y"].to_numpy()[sel], gdf)
            names = gdf.index.to_numpy().astype(object)
            ids[sel[pos >= 0]] = names[pos[pos >= 0]]
        return ids, v.boundaries, None, None, None
    ids = tx["vendor_cell_id"].to_numpy(dtype=object)
    boundaries = v.boundaries if v.boundaries is not None else gpd.GeoDataFrame(geometry=[])
    return ids, boundaries, v.table, v.obs, v.nuclei


def _positions(cell_names: list[str], ids: np.ndarray) -> np.ndarray:
    """Row of each transcript's cell in ``cell_names`` (-1: none)."""
    cat = pd.Categorical(pd.Series(ids, dtype=object), categories=pd.Index(cell_names))
    return np.asarray(cat.codes, dtype=np.int64)


def _build_cells(sample: RawSample, cell_names: list[str], pos: np.ndarray, boundaries: Any,
                 nucleus_area: np.ndarray | None, vendor_table: Any = None, vendor_obs: pd.DataFrame | None = None):
    import anndata as ad
    import scipy.sparse as sp

    tx = sample.transcripts
    genes = sample.genes
    codes = tx["gene"].cat.codes.to_numpy().astype(np.int64)
    X = count_matrix(pos, codes, len(cell_names), len(genes))
    var = pd.DataFrame(index=pd.Index(genes, name=None))
    if vendor_table is not None:
        # the instrument's own matrix (Xenium: from the full transcript set, which a cut-down folder may lack)
        vt = vendor_table[cell_names]
        var = vt.var.copy()
        X = sp.csr_matrix(vt.X).astype(np.int32)
        genes = list(vt.var_names)
    var["is_control"] = is_control(var.index)
    n_tx = np.asarray(X.sum(1)).ravel()
    b = boundaries.reindex(cell_names) if boundaries is not None and len(boundaries) else None
    area = b.geometry.area.to_numpy() if b is not None else np.full(len(cell_names), np.nan)
    if b is not None:
        cent = b.geometry.centroid
        xy = np.column_stack([cent.x.to_numpy(), cent.y.to_numpy()])
    else:
        xy = np.full((len(cell_names), 2), np.nan)
    missing = ~np.isfinite(xy).all(1)
    if missing.any():  # no outline: mean position of the cell's transcripts
        df = pd.DataFrame({"c": pos, "x": tx["x"].to_numpy(), "y": tx["y"].to_numpy()})
        m = df[df.c >= 0].groupby("c")[["x", "y"]].mean().reindex(range(len(cell_names)))
        xy[missing] = m.to_numpy()[missing]
    obs = pd.DataFrame(index=pd.Index(cell_names, name=None))
    obs["area_um2"] = area
    obs["nucleus_area_um2"] = nucleus_area if nucleus_area is not None else np.nan
    if vendor_obs is not None:
        for src, dst in (("cell_area", "area_um2"), ("nucleus_area", "nucleus_area_um2")):
            if src in vendor_obs.columns:
                obs[dst] = vendor_obs.loc[cell_names, src].to_numpy(float)
        for c in ("control_probe_counts", "control_codeword_counts", "transcript_counts"):
            if c in vendor_obs.columns:
                obs[f"vendor_{c}"] = vendor_obs.loc[cell_names, c].to_numpy()
    obs["n_transcripts"] = n_tx.astype(np.int64)
    obs["n_genes"] = np.asarray((X > 0).sum(1)).ravel().astype(np.int64)
    adata = ad.AnnData(X=X.astype(np.int32), obs=obs, var=var)
    adata.obsm["spatial"] = xy.astype(np.float64)
    return adata


def _nucleus_area_per_cell(cells: Any, nuclei: Any) -> np.ndarray:
    import geopandas as gpd

    out = np.full(len(cells), np.nan)
    if nuclei is None or len(nuclei) == 0 or len(cells) == 0:
        return out
    pts = gpd.GeoDataFrame({"area": nuclei.geometry.area.to_numpy()}, geometry=nuclei.geometry.representative_point().to_numpy())
    j = gpd.sjoin(pts, gpd.GeoDataFrame(geometry=cells.geometry.to_numpy()), how="inner", predicate="within")
    j = j[~j.index.duplicated()]
    s = j.groupby("index_right")["area"].sum()
    out[s.index.to_numpy()] = s.to_numpy()
    return out


def segment(
    sample: RawSample,
    method: str | None = None,
    *,
    params: WatershedParams | None = None,
    expand_um: float | None = None,
    patch_um: float = 400.0,
    weights_dir: str | None = None,
    progress: Any = None,
) -> SegmentationResult:
    """Segment ``sample`` with ``method`` (default: vendor where the folder has it, else watershed)."""
    import geopandas as gpd

    t0 = time.perf_counter()
    method = method or default_method(sample)
    if method not in METHODS:
        raise SegmentationInputError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    check_method_available(method, weights_dir=weights_dir)
    params = params or WatershedParams()
    if expand_um is not None:
        if not (np.isfinite(expand_um) and expand_um >= 0):
            raise SegmentationInputError(f"--expand-um must be >= 0, got {expand_um}")
        from dataclasses import replace

        params = replace(params, expand_um=float(expand_um), min_expand_um=min(params.min_expand_um, float(expand_um)))
    tx = sample.transcripts
    vendor_table = vendor_obs = None
    parameters: dict[str, Any]
    if method == "vendor":
        ids, boundaries, vendor_table, vendor_obs, vnuclei = _vendor_segmentation(sample)
        if vendor_table is not None:
            names = [str(c) for c in vendor_table.obs_names]
        else:
            names = sorted({str(i) for i in ids if i is not None})
        pos = _positions(names, np.asarray([None if i is None else str(i) for i in ids], dtype=object))
        boundaries = boundaries if boundaries is not None else gpd.GeoDataFrame(geometry=[])
        nuc_area = None
        if vnuclei is not None and len(vnuclei):
            nuc_area = vnuclei.geometry.area.groupby(level=0).sum().reindex(names).to_numpy()
        parameters = {"source": sample.vendor.source}
        seconds = 0.0
    else:
        if method == "watershed":
            seg = run_watershed(sample, params, patch_um=patch_um, progress=progress)
        elif method == "comseg":
            prior = run_watershed(sample, params, patch_um=patch_um, progress=progress)
            seg = run_comseg(sample, prior)
            seg.parameters["prior_parameters"] = prior.parameters
        else:
            prior = run_watershed(sample, params, patch_um=patch_um, progress=progress) if method in ("proseg", "baysor") else None
            seg = run_external(sample, method, weights_dir=weights_dir, prior=prior)
        seconds = seg.seconds
        cells_gdf = seg.cells.reset_index(drop=True)
        pos = assign_transcripts(tx["x"].to_numpy(), tx["y"].to_numpy(), cells_gdf)
        names = [f"cell{i:06d}" for i in range(len(cells_gdf))]
        boundaries = gpd.GeoDataFrame(geometry=cells_gdf.geometry.to_numpy(), index=pd.Index(names))
        nuc_area = (cells_gdf["nucleus_area_um2"].to_numpy(float) if "nucleus_area_um2" in cells_gdf.columns
                    else _nucleus_area_per_cell(cells_gdf, seg.nuclei))
        parameters = seg.parameters
    adata = _build_cells(sample, names, pos, boundaries, nuc_area, vendor_table, vendor_obs)
    if method != "vendor":
        # a polygon holding no transcript is not a cell of this sample's table; renumber the rest
        keep = adata.obs["n_transcripts"].to_numpy() > 0
        dropped = int((~keep).sum())
        new_pos = np.cumsum(keep) - 1
        pos = np.where(pos >= 0, new_pos[np.maximum(pos, 0)], -1)
        adata = adata[keep].copy()
        boundaries = boundaries.loc[adata.obs_names]
        names = list(adata.obs_names)
        parameters = {**parameters, "empty_polygons_dropped": dropped}
    assigned = pos >= 0
    transcripts = pd.DataFrame({
        "transcript_index": tx["transcript_index"].to_numpy(),
        "cell_id": pd.Categorical.from_codes(pos, categories=pd.Index(names, dtype=object)),
        "x": tx["x"].to_numpy(), "y": tx["y"].to_numpy(), "z": tx["z"].to_numpy(),
        "gene": tx["gene"].astype(str).to_numpy(),
    })
    if tx["vendor_cell_id"].notna().any():
        transcripts["vendor_cell_id"] = pd.array(tx["vendor_cell_id"].to_numpy(dtype=object), dtype="string")
    summary = {
        "platform": sample.platform,
        "method": method,
        "n_cells": int(adata.n_obs),
        "n_transcripts": int(len(tx)),
        "assigned_fraction": float(assigned.mean()) if len(tx) else 0.0,
        "median_transcripts_per_cell": float(np.median(adata.obs["n_transcripts"])) if adata.n_obs else 0.0,
        "segmentation_seconds": float(seconds),
        "seconds": float(time.perf_counter() - t0),
    }
    adata.uns[SEGMENTATION_UNS] = {
        "platform": sample.platform,
        "method": method,
        "parameters": _jsonable(parameters),
        "versions": _versions(),
        "input_files": list(sample.files),
        "n_transcripts_total": summary["n_transcripts"],
        "assigned_fraction": summary["assigned_fraction"],
        "units": "micrometre",
    }
    if method == "vendor" and sample.vendor is not None and sample.vendor.table is not None:
        adata.uns[SEGMENTATION_UNS]["counts_from"] = "vendor matrix (" + sample.vendor.source + ")"
    return SegmentationResult(adata, boundaries, transcripts, summary)


def _jsonable(d: Any) -> Any:
    if isinstance(d, dict):
        return {str(k): _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, (np.generic,)):
        return d.item()
    if d is None:
        return "None"
    return d


def write_result(result: SegmentationResult, out_h5ad: str) -> dict[str, str]:
    """Write ``OUT.h5ad``, ``OUT.boundaries.parquet`` (GeoParquet) and ``OUT.transcripts.parquet`` atomically.

    Each file appears only once complete (temp file + rename / multipart upload); ``out_h5ad`` may
    be a local path or an ``s3://`` URI.
    """
    from spatial_assets.storage.objectstore import write_atomic

    base = out_h5ad[: -len(".h5ad")] if out_h5ad.endswith(".h5ad") else out_h5ad
    paths = {"cells": f"{base}.h5ad", "boundaries": f"{base}.boundaries.parquet", "transcripts": f"{base}.transcripts.parquet"}
    b = result.boundaries.copy()
    b.index = b.index.astype(str)
    b.index.name = "cell_id"
    b = b.reset_index()
    write_atomic(paths["transcripts"], lambda p: result.transcripts.to_parquet(p, index=False))
    write_atomic(paths["boundaries"], lambda p: b.to_parquet(p, index=False))
    write_atomic(paths["cells"], result.cells.write_h5ad)
    return paths


__all__ = ["SEGMENTATION_UNS", "SegmentationResult", "segment", "write_result"]
