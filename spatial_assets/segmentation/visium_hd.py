"""Visium HD: SpaceRanger binned outputs as spot-level samples, and 2 µm bins aggregated into cells.

A Visium HD bin table is a *spot* sample (each 8 µm bin mixes cells; deconvolution works on it):
:func:`read_visium_hd_bins` returns bins with ``obsm['spatial']`` in µm, ``obs['array_row'/'array_col']``
and ``uns['spot'] = {'kind': 'visium_hd_bin', 'bin_size_um': N}``.

2 µm bins are small enough to rebuild cells (:func:`bins_to_cells`): each bin goes to the nearest
segmented nucleus within ``expand_um`` (the ``expand_labels`` rule, in µm), and a cell's counts are
the sum of its bins — what ``sopa.aggregation.aggregate_bins`` does, except that sopa expands by a
ratio of the mean cell radius and needs the bins as a SpatialData table; we keep µm like every other
method here.

Why not ``spatialdata_io.visium_hd``: it requires ``feature_slice.h5`` (with the instrument's layout
metadata JSON) besides the binned folders, which a folder of binned outputs alone (and our synthetic
generator, :func:`write_synthetic_visium_hd`) does not have; it also reads the matrix with
``scanpy.read_10x_h5``. We read the three files each bin folder holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spatial_assets.segmentation.errors import SegmentationInputError
from spatial_assets.segmentation.readers import read_10x_h5

SPOT_UNS = "spot"


def bin_folder(folder: str | Path, bin_size_um: int) -> Path:
    folder = Path(folder)
    d = folder / "binned_outputs" / f"square_{int(bin_size_um):03d}um"
    if not d.is_dir():
        have = sorted(p.name for p in (folder / "binned_outputs").glob("square_*um")) if (folder / "binned_outputs").is_dir() else []
        raise SegmentationInputError(f"{d}: no {bin_size_um} µm bins (bin folders present: {have})")
    return d


def read_visium_hd_bins(folder: str | Path, bin_size_um: int = 8) -> Any:
    """Bins × genes raw counts of one bin size, positions in µm; a spot-level sample."""
    d = bin_folder(folder, bin_size_um)
    h5, pos_file, sf_file = d / "filtered_feature_bc_matrix.h5", d / "spatial" / "tissue_positions.parquet", d / "spatial" / "scalefactors_json.json"
    for f in (h5, pos_file, sf_file):
        if not f.is_file():
            raise SegmentationInputError(f"missing Visium HD file: {f}")
    sf = json.loads(sf_file.read_text())
    for k in ("microns_per_pixel", "bin_size_um"):
        if k not in sf:
            raise SegmentationInputError(f"{sf_file}: no {k!r}")
    if not np.isclose(float(sf["bin_size_um"]), float(bin_size_um)):
        raise SegmentationInputError(f"{sf_file}: bin_size_um {sf['bin_size_um']} but the folder is {d.name}")
    adata = read_10x_h5(h5)
    adata = adata[:, adata.var["feature_type"].isin(["Gene Expression"]).to_numpy()].copy() if "feature_type" in adata.var else adata
    pos = pd.read_parquet(pos_file)
    need = {"barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"}
    if not need <= set(pos.columns):
        raise SegmentationInputError(f"{pos_file}: needs columns {sorted(need)}, has {list(pos.columns)}")
    pos = pos.set_index("barcode")
    missing = adata.obs_names.difference(pos.index)
    if len(missing):
        raise SegmentationInputError(f"{pos_file}: {len(missing)} barcodes of {h5.name} have no position (e.g. {list(missing[:3])})")
    pos = pos.loc[adata.obs_names]
    mpp = float(sf["microns_per_pixel"])
    adata.obs["array_row"] = pos["array_row"].to_numpy(np.int64)
    adata.obs["array_col"] = pos["array_col"].to_numpy(np.int64)
    adata.obs["in_tissue"] = pos["in_tissue"].to_numpy(np.int64)
    adata.obsm["spatial"] = np.column_stack([pos["pxl_col_in_fullres"].to_numpy(float) * mpp,
                                             pos["pxl_row_in_fullres"].to_numpy(float) * mpp])
    adata.uns[SPOT_UNS] = {"kind": "visium_hd_bin", "bin_size_um": int(bin_size_um)}
    adata.uns["visium_hd"] = {"microns_per_pixel": mpp, "source": str(d)}
    return adata


def bins_to_cells(bins: Any, nuclei: Any, *, expand_um: float = 4.0) -> Any:
    """Cells × genes from 2 µm bins: each bin to the nearest nucleus (µm GeoDataFrame) within ``expand_um``.

    Returns an AnnData with ``obs['n_bins']``, ``obs['area_um2']`` (bins × bin area), centroid in
    ``obsm['spatial']`` and the bin → cell map in ``uns['bins_to_cells']['n_assigned_bins']``.
    """
    import anndata as ad
    import scipy.sparse as sp
    import shapely

    size = float(bins.uns.get(SPOT_UNS, {}).get("bin_size_um", np.nan))
    if not np.isfinite(size) or size > 2.0 + 1e-9:
        raise SegmentationInputError(f"bins_to_cells needs 2 µm bins (got bin size {size}); 8/16 µm bins are spot samples")
    if nuclei is None or len(nuclei) == 0:
        raise SegmentationInputError("bins_to_cells: no nuclei to assign bins to")
    xy = np.asarray(bins.obsm["spatial"], float)
    tree = shapely.STRtree(np.asarray(nuclei.geometry))
    pts = shapely.points(xy)
    # nearest nucleus boundary within reach (distance 0 inside a nucleus), one per bin
    idx = tree.query_nearest(pts, max_distance=expand_um, all_matches=False)
    b_idx, c_idx = idx[0], idx[1]
    n_cells = len(nuclei)
    M = sp.csr_matrix((np.ones(b_idx.size, np.int32), (c_idx, b_idx)), shape=(n_cells, bins.n_obs))
    X = (M @ sp.csr_matrix(bins.X)).tocsr().astype(np.int32)
    n_bins = np.asarray(M.sum(1)).ravel()
    keep = n_bins > 0
    names = [f"cell{i:06d}" for i in range(n_cells)]
    cent = np.column_stack([(M @ xy[:, 0]) / np.maximum(n_bins, 1), (M @ xy[:, 1]) / np.maximum(n_bins, 1)])
    obs = pd.DataFrame({"n_bins": n_bins, "area_um2": n_bins * size * size,
                        "nucleus_area_um2": nuclei.geometry.area.to_numpy()}, index=names)
    obs["n_transcripts"] = np.asarray(X.sum(1)).ravel()
    out = ad.AnnData(X, obs=obs, var=bins.var[[]].copy())
    out.obsm["spatial"] = cent
    out = out[keep].copy()
    out.uns["bins_to_cells"] = {"expand_um": float(expand_um), "n_assigned_bins": int(b_idx.size), "n_bins": int(bins.n_obs)}
    return out


def nuclei_from_image(rgb_or_gray: np.ndarray, pixel_to_um: np.ndarray, *, he: bool = True, params: Any = None) -> Any:
    """Nucleus outlines (µm GeoDataFrame) from a microscope image (H&E by default, via ``rgb2hed``),
    with the same weight-free watershed and sopa patches as imaging platforms; feed them to
    :func:`bins_to_cells`."""
    import dask.array as da
    from dataclasses import replace

    from spatial_assets.segmentation.methods import run_watershed
    from spatial_assets.segmentation.nuclei import WatershedParams
    from spatial_assets.segmentation.sample import ImageLayer, RawSample

    img = np.asarray(rgb_or_gray)
    if he:
        if img.ndim != 3 or img.shape[-1] != 3:
            raise SegmentationInputError(f"an H&E image must be (y, x, 3) RGB, got shape {img.shape}")
        data, channels, kind = da.from_array(np.moveaxis(img, -1, 0), chunks=(3, 2048, 2048)), ["R", "G", "B"], "he"
    else:
        data, channels, kind = da.from_array(img[None], chunks=(1, 2048, 2048)), ["nuclear"], "fluorescence"
    layer = ImageLayer(data, channels, np.asarray(pixel_to_um, float), ["<array>"], nuclear_channel=channels[0], kind=kind)
    empty = pd.DataFrame({"transcript_index": np.zeros(0, np.int64), "x": np.zeros(0), "y": np.zeros(0), "z": np.zeros(0),
                          "gene": pd.Categorical([]), "vendor_cell_id": pd.Series([], dtype=object)})
    sample = RawSample("visium_hd", Path("."), empty, "<none>", layer, None)
    p = replace(params or WatershedParams(), expansion="fixed", expand_um=0.0, min_expand_um=0.0)
    seg = run_watershed(sample, p)
    return seg.cells


def _write_10x_h5(path: Path, X: Any, barcodes: list[str], genes: list[str]) -> None:
    import h5py
    import scipy.sparse as sp

    csc = sp.csr_matrix(X).T.tocsc()  # features x barcodes, as CellRanger writes it
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.asarray(barcodes, dtype="S"))
        m.create_dataset("data", data=csc.data.astype(np.int32))
        m.create_dataset("indices", data=csc.indices.astype(np.int64))
        m.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.asarray(csc.shape, dtype=np.int32))
        fe = m.create_group("features")
        fe.create_dataset("id", data=np.asarray([f"ENSSYN{i:05d}" for i in range(len(genes))], dtype="S"))
        fe.create_dataset("name", data=np.asarray(genes, dtype="S"))
        fe.create_dataset("feature_type", data=np.asarray(["Gene Expression"] * len(genes), dtype="S"))
        fe.create_dataset("genome", data=np.asarray(["synthetic"] * len(genes), dtype="S"))


def write_synthetic_visium_hd(folder: str | Path, *, width_um: float = 120.0, height_um: float = 120.0,
                              bin_sizes: tuple[int, ...] = (2, 8), seed: int = 0, microns_per_pixel: float = 0.2737) -> dict:
    """A small SpaceRanger-layout folder with known cells: ``binned_outputs/square_NNNum/{filtered_feature_bc_matrix.h5,
    spatial/tissue_positions.parquet, spatial/scalefactors_json.json}``; ``truth_nuclei.parquet`` (µm,
    GeoParquet) and ``truth_bins_002um.csv`` (the cell that produced most of each 2 µm bin).
    """
    import geopandas as gpd
    import shapely

    from spatial_assets.segmentation.synthetic import SyntheticSpec, _nucleus_radius, _Territory, make_cells, sample_transcripts

    folder = Path(folder)
    spec = SyntheticSpec(width_um=width_um, height_um=height_um, seed=seed, background_fraction=0.05)
    cells = make_cells(spec)
    territory = _Territory(cells)
    tx = sample_transcripts(spec, cells, territory)
    genes = sorted(tx["gene"].unique())
    gcode = pd.Categorical(tx["gene"], categories=genes).codes
    summary: dict[str, Any] = {"n_cells": int(len(cells)), "n_transcripts": int(len(tx))}
    for bs in bin_sizes:
        nx, ny = int(np.ceil(width_um / bs)), int(np.ceil(height_um / bs))
        col = np.minimum((tx["global_x"].to_numpy() / bs).astype(np.int64), nx - 1)
        row = np.minimum((tx["global_y"].to_numpy() / bs).astype(np.int64), ny - 1)
        key = row * nx + col
        import scipy.sparse as sp

        M = sp.coo_matrix((np.ones(len(tx), np.int32), (key, gcode)), shape=(nx * ny, len(genes))).tocsr()
        M.sum_duplicates()
        has = np.flatnonzero(np.asarray(M.sum(1)).ravel() > 0)
        rr, cc = has // nx, has % nx
        barcodes = [f"s_{bs:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rr, cc)]
        d = folder / "binned_outputs" / f"square_{bs:03d}um"
        (d / "spatial").mkdir(parents=True, exist_ok=True)
        _write_10x_h5(d / "filtered_feature_bc_matrix.h5", M[has], barcodes, genes)
        pd.DataFrame({"barcode": barcodes, "in_tissue": 1, "array_row": rr, "array_col": cc,
                      "pxl_row_in_fullres": (rr + 0.5) * bs / microns_per_pixel,
                      "pxl_col_in_fullres": (cc + 0.5) * bs / microns_per_pixel}).to_parquet(d / "spatial" / "tissue_positions.parquet", index=False)
        (d / "spatial" / "scalefactors_json.json").write_text(json.dumps({
            "bin_size_um": float(bs), "microns_per_pixel": microns_per_pixel, "spot_diameter_fullres": bs / microns_per_pixel,
            "tissue_hires_scalef": 0.1, "tissue_lowres_scalef": 0.01, "regist_target_img_scalef": 0.2}))
        summary[f"bins_{bs:03d}um"] = int(len(has))
        if bs == 2:
            owner = pd.Series(tx["cell_id"].to_numpy()).groupby(key).agg(lambda s: s.value_counts().index[0])
            pd.DataFrame({"barcode": barcodes, "cell_id": owner.reindex(has).to_numpy()}).to_csv(folder / "truth_bins_002um.csv", index=False)
    # truth nuclei outlines (µm)
    polys = []
    th = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    for i in range(len(cells)):
        r = _nucleus_radius(cells, np.full(th.shape, i), th)
        polys.append(shapely.Polygon(np.column_stack([cells["x"].iloc[i] + r * np.cos(th), cells["y"].iloc[i] + r * np.sin(th)])))
    gpd.GeoDataFrame({"cell_id": cells["cell_id"].to_numpy()}, geometry=polys).to_parquet(folder / "truth_nuclei.parquet")
    return summary


__all__ = ["bins_to_cells", "read_visium_hd_bins", "write_synthetic_visium_hd"]
