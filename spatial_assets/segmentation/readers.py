"""Readers for Xenium, MERSCOPE and CosMx output folders into one :class:`RawSample`.

What comes from the field's readers and what we fill in (each gap measured on the real fixtures
in ``data/raw/``, see ``docs/segmentation.md``):

* Xenium: ``spatialdata_io.xenium`` needs ``cells.zarr.zip`` and the morphology image; real folders
  cut down for transfer (like our fixture) have neither, so the vendor cells are read from the files
  that are there (``cells.parquet``, ``cell_feature_matrix.h5`` via scanpy, the boundary vertex tables).
* MERSCOPE: ``spatialdata_io.merscope`` reads ``cell_boundaries.parquet`` with ``geopandas.read_parquet``,
  which refuses a vendor parquet without GeoParquet metadata (ours: WKB in a ``Geometry`` column), and
  it loads each mosaic TIFF page as one dask chunk (the whole mosaic re-read for every patch); we decode
  the WKB with shapely and open the TIFFs through tifffile's zarr view (only the tiles a patch touches
  are read).
* CosMx: ``sopa.io.cosmx`` needs ``Morphology2D`` stacks and assumes a 0.12028 µm pixel; the flat-file
  export with ``CellComposite`` / ``CellLabels`` crops and a legacy 0.18 µm camera is read here, with
  the crop's GeoTransform (``.aux.xml``) for where the crop sits in the FOV.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spatial_assets.segmentation.errors import SegmentationInputError
from spatial_assets.segmentation.platforms import check_platform
from spatial_assets.segmentation.sample import ImageLayer, RawSample, VendorCells, check_inside_image, normalise_transcripts

#: legacy CosMx camera (NSCLC release, 5472 x 3648 px FOVs); newer instruments: 0.12028 (sopa's constant)
COSMX_LEGACY_PIXEL_UM = 0.18
COSMX_PIXEL_UM_BY_FOV_WIDTH = {5472: 0.18, 4256: 0.120280945}


def _rel(folder: Path, p: Path) -> str:
    return str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p)


def open_tiff(path: Path, *, chunks: int = 2048):
    """A TIFF as a lazy 2D dask array (only the tiles/strips a window needs are read)."""
    import dask.array as da
    import tifffile
    import zarr

    if not path.is_file():
        raise SegmentationInputError(f"missing image file: {path}")
    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            shape, dtype = page.shape, page.dtype
        store = tifffile.imread(path, aszarr=True, level=0)
        arr = zarr.open(store, mode="r")
        if isinstance(arr, zarr.Group):  # pyramidal OME: level 0
            arr = arr["0"]
    except Exception as exc:  # tifffile raises several types on broken files
        raise SegmentationInputError(f"{path}: unreadable TIFF ({type(exc).__name__}: {exc})") from exc
    if len(shape) == 3 and shape[0] <= 4:  # (c, y, x) with a few channels: first is nuclear for OME morphology
        arr = arr[0]
        shape = shape[1:]
    if len(shape) != 2:
        raise SegmentationInputError(f"{path}: expected a 2D image, got shape {shape}")
    if not np.issubdtype(dtype, np.integer):
        raise SegmentationInputError(f"{path}: image dtype {dtype} is not an integer type")
    return da.from_zarr(arr, chunks=(chunks, chunks)) if hasattr(arr, "chunks") else da.from_array(arr, chunks=chunks)


# --------------------------------------------------------------------------------------------- MERSCOPE

_MOSAIC_RE = re.compile(r"mosaic_(?P<stain>[\w-]+?)_z(?P<z>\d+)\.tif$")


def _merscope_images(folder: Path, z: str | int) -> tuple[ImageLayer | None, dict[str, Any]]:
    import dask.array as da

    images = folder / "images"
    tfile = images / "micron_to_mosaic_pixel_transform.csv"
    mosaics: dict[str, dict[int, Path]] = {}
    if images.is_dir():
        for p in sorted(images.iterdir()):
            m = _MOSAIC_RE.match(p.name)
            if m:
                mosaics.setdefault(m.group("stain"), {})[int(m.group("z"))] = p
    meta: dict[str, Any] = {"image_files_expected": "images/mosaic_DAPI_z<N>.tif + images/micron_to_mosaic_pixel_transform.csv"}
    if not mosaics:
        return None, meta
    if "DAPI" not in mosaics:
        raise SegmentationInputError(f"{images}: mosaics {sorted(mosaics)} but no mosaic_DAPI_z<N>.tif")
    if not tfile.is_file():
        raise SegmentationInputError(f"missing transform file: {tfile} (pixel = A · (x_µm, y_µm, 1))")
    try:
        A = np.loadtxt(tfile).reshape(3, 3)
    except Exception as exc:
        raise SegmentationInputError(f"{tfile}: not a 3x3 affine ({exc})") from exc
    if abs(np.linalg.det(A[:2, :2])) < 1e-12:
        raise SegmentationInputError(f"{tfile}: singular transform")
    planes = sorted(mosaics["DAPI"])
    if z == "all":
        use = planes
    else:
        if int(z) not in planes:
            raise SegmentationInputError(f"{images}: no mosaic_DAPI_z{z}.tif (planes: {planes})")
        use = [int(z)]
    stains = ["DAPI"] + [s for s in ("PolyT", "Cellbound1", "Cellbound2", "Cellbound3") if s in mosaics]
    arrays, files = [], []
    for stain in stains:
        per = []
        for zz in use:
            if zz not in mosaics[stain]:
                raise SegmentationInputError(f"{images}: mosaic_{stain}_z{zz}.tif is missing")
            per.append(open_tiff(mosaics[stain][zz]))
            files.append(_rel(folder, mosaics[stain][zz]))
        shapes = {a.shape for a in per}
        if len(shapes) != 1 or (arrays and per[0].shape != arrays[0].shape):
            raise SegmentationInputError(f"{images}: mosaics of different sizes {sorted(shapes)}")
        # several planes: the maximum projection keeps every nucleus in focus somewhere
        arrays.append(per[0] if len(per) == 1 else da.stack(per).max(axis=0))
    files.append(_rel(folder, tfile))
    cyto = "PolyT" if "PolyT" in stains else None
    layer = ImageLayer(da.stack(arrays), stains, np.linalg.inv(A), files, nuclear_channel="DAPI", cytoplasm_channel=cyto)
    meta["z_planes_used"] = use
    return layer, meta


def _wkb_boundaries(path: Path):
    """MERSCOPE boundary parquet (GeoParquet or plain WKB ``Geometry``) → GeoDataFrame in µm."""
    import geopandas as gpd
    import shapely

    df = pd.read_parquet(path)
    geom_col = next((c for c in ("Geometry", "geometry") if c in df.columns), None)
    if geom_col is None or "EntityID" not in df.columns:
        raise SegmentationInputError(f"{path}: expected columns EntityID and Geometry, got {list(df.columns)}")
    geoms = df[geom_col]
    if len(geoms) and isinstance(geoms.iloc[0], (bytes, bytearray, memoryview)):
        geoms = shapely.from_wkb(geoms.to_numpy())
    gdf = gpd.GeoDataFrame(df.drop(columns=[geom_col]), geometry=list(geoms))
    gdf["EntityID"] = gdf["EntityID"].astype(str)
    if "ZIndex" not in gdf.columns:
        gdf["ZIndex"] = 0
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    gdf.geometry = shapely.make_valid(gdf.geometry.to_numpy())
    return gdf


def read_merscope(folder: Path, *, z: str | int = "all") -> RawSample:
    tfile = folder / "detected_transcripts.csv"
    try:
        raw = pd.read_csv(tfile)
    except pd.errors.EmptyDataError:
        raise SegmentationInputError(f"{tfile}: the transcript table is empty") from None
    need = {"gene", "global_x", "global_y"}
    if not need <= set(raw.columns):
        raise SegmentationInputError(f"{tfile}: needs columns {sorted(need)}, has {list(raw.columns)}")
    df = pd.DataFrame({"x": raw["global_x"], "y": raw["global_y"], "gene": raw["gene"]})
    df["z_plane"] = raw["global_z"].astype(int) if "global_z" in raw.columns else 0
    df["z"] = df["z_plane"].astype(float)
    if "cell_id" in raw.columns:  # the vendor's own assignment (-1 / empty = none)
        cid = raw["cell_id"].astype(str)
        df["vendor_cell_id"] = cid.where(~cid.isin(["-1", "nan", "", "None"]), None)
    tx = normalise_transcripts(df, str(tfile))
    image, meta = _merscope_images(folder, z)
    files = ["detected_transcripts.csv"] + (image.files if image else [])
    vendor = None
    bfile = folder / "cell_boundaries.parquet"
    if bfile.is_file():
        gdf = _wkb_boundaries(bfile)
        per_plane = {int(k): g.set_index("EntityID") for k, g in gdf.groupby("ZIndex")}
        # one outline per cell for the boundaries output: the union over planes
        union = gdf.dissolve(by="EntityID")[["geometry"]]
        vendor = VendorCells(boundaries=union, per_plane=per_plane, source="cell_boundaries.parquet")
        files.append("cell_boundaries.parquet")
    elif tx["vendor_cell_id"].notna().any():
        vendor = VendorCells(boundaries=None, source="detected_transcripts.csv cell_id")
    sample = RawSample("merscope", folder, tx, str(tfile), image, vendor, files=files, meta=meta)
    check_inside_image(sample)
    return sample


# --------------------------------------------------------------------------------------------- CosMx

def _one(folder: Path, pattern: str, what: str) -> Path:
    hits = sorted(folder.glob(pattern + ".csv")) + sorted(folder.glob(pattern + ".csv.gz"))
    if not hits:
        raise SegmentationInputError(f"{folder}: missing {what} ({pattern}.csv[.gz])")
    if len(hits) > 1:
        raise SegmentationInputError(f"{folder}: several {what} files {[h.name for h in hits]}")
    return hits[0]


def _geotransform(jpg: Path) -> tuple[float, float, float, float] | None:
    """(x origin, x step, y origin, y step) from a GDAL ``.aux.xml`` beside an image, if any."""
    aux = jpg.with_name(jpg.name + ".aux.xml")
    if not aux.is_file():
        return None
    node = ET.parse(aux).getroot().find("GeoTransform")
    if node is None or not node.text:
        return None
    v = [float(t) for t in node.text.replace(",", " ").split()]
    return v[0], v[1], v[3], v[5]


def read_cosmx(folder: Path, *, fov: int | None = None, pixel_size_um: float | None = None) -> RawSample:
    """One FOV of a CosMx flat-file export (µm = global pixels × pixel size)."""
    import dask.array as da
    from PIL import Image

    tfile = _one(folder, "*_tx_file", "transcript file")
    pfile = _one(folder, "*_fov_positions_file", "FOV positions file")
    try:
        raw = pd.read_csv(tfile)
    except pd.errors.EmptyDataError:
        raise SegmentationInputError(f"{tfile}: the transcript table is empty") from None
    need = {"fov", "x_global_px", "y_global_px", "x_local_px", "y_local_px", "target"}
    if not need <= set(raw.columns):
        raise SegmentationInputError(f"{tfile}: needs columns {sorted(need)}, has {list(raw.columns)}")
    if len(raw) == 0:
        raise SegmentationInputError(f"{tfile}: the transcript table is empty")
    pos = pd.read_csv(pfile)
    pos.columns = [c.lower() for c in pos.columns]
    if "fov" not in pos.columns:
        raise SegmentationInputError(f"{pfile}: no 'fov' column ({list(pos.columns)})")
    fovs = sorted(raw["fov"].unique().tolist())
    if fov is None:
        if len(fovs) != 1:
            raise SegmentationInputError(f"{tfile}: {len(fovs)} FOVs {fovs[:10]}; choose one with fov=")
        fov = int(fovs[0])
    missing = [f for f in [fov] if f not in set(pos["fov"].astype(int))]
    if missing:
        raise SegmentationInputError(f"{pfile}: FOV {missing[0]} of {tfile.name} is not in the positions file (FOVs there: {sorted(pos['fov'].astype(int))[:20]})")
    raw = raw[raw["fov"] == fov]
    if len(raw) == 0:
        raise SegmentationInputError(f"{tfile}: no transcripts in FOV {fov}")
    row = pos[pos["fov"].astype(int) == fov].iloc[0]
    fx = float(row.get("x_global_px", row.get("x", np.nan)))
    fy = float(row.get("y_global_px", row.get("y", np.nan)))
    # local = global - FOV offset (checked: the export's own local columns must agree)
    off_x = float(np.median(raw["x_global_px"] - raw["x_local_px"]))
    off_y = float(np.median(raw["y_global_px"] - raw["y_local_px"]))
    if not (np.isclose(off_x, fx, atol=2) and np.isclose(off_y, fy, atol=2)):
        raise SegmentationInputError(f"{pfile}: FOV {fov} offset ({fx}, {fy}) disagrees with {tfile.name} (global - local = {off_x:.1f}, {off_y:.1f})")
    ps = float(pixel_size_um or COSMX_LEGACY_PIXEL_UM)
    cell = raw["cell_ID"] if "cell_ID" in raw.columns else pd.Series(0, index=raw.index)
    df = pd.DataFrame({
        "x": raw["x_global_px"].to_numpy() * ps,
        "y": raw["y_global_px"].to_numpy() * ps,
        "z": raw["z"].to_numpy(float) if "z" in raw.columns else 0.0,
        "gene": raw["target"].to_numpy(),
        "vendor_cell_id": np.where(cell.to_numpy() != 0, [f"{fov}_{int(c)}" for c in cell], None),
    })
    if "CellComp" in raw.columns:
        df["cell_compartment"] = raw["CellComp"].astype(str).to_numpy()
    tx = normalise_transcripts(df, str(tfile))
    tx["fov"] = fov
    files = [tfile.name, pfile.name]
    tag = f"F{fov:03d}"
    comp = next(iter(sorted((folder / "CellComposite").glob(f"CellComposite_{tag}.*"))), None) if (folder / "CellComposite").is_dir() else None
    comp = comp if comp is None or comp.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif", ".tiff") else None
    image = None
    meta: dict[str, Any] = {"fov": fov, "pixel_size_um": ps, "image_files_expected": f"CellComposite/CellComposite_{tag}.jpg"}
    gt = None
    if comp is not None:
        try:
            rgb = np.asarray(Image.open(comp).convert("RGB"))
        except Exception as exc:
            raise SegmentationInputError(f"{comp}: unreadable image ({type(exc).__name__}: {exc})") from exc
        gt = _geotransform(comp) or (0.0, 1.0, float(rgb.shape[0]), -1.0)  # default: the full FOV, y up
        x0, sx, y0, sy = gt
        # image (col, row) → local px (x0 + sx col, y0 + sy row) → global px (+ FOV offset) → µm
        P = np.array([[sx * ps, 0, (x0 + fx) * ps], [0, sy * ps, (y0 + fy) * ps], [0, 0, 1.0]])
        data = da.from_array(np.moveaxis(rgb, -1, 0), chunks=(1, 2048, 2048))
        # the composite's blue channel is the DAPI stain; the others mark membranes / cell types
        image = ImageLayer(data, ["R", "G", "B"], P, [_rel(folder, comp)], nuclear_channel="B")
        files.append(_rel(folder, comp))
        if comp.with_name(comp.name + ".aux.xml").is_file():
            files.append(_rel(folder, comp.with_name(comp.name + ".aux.xml")))
    vendor = None
    lab = next(iter(sorted((folder / "CellLabels").glob(f"CellLabels_{tag}.tif"))), None) if (folder / "CellLabels").is_dir() else None
    if lab is not None or tx["vendor_cell_id"].notna().any():
        boundaries = None
        if lab is not None:
            boundaries = _cosmx_label_polygons(lab, fov, ps, fx, fy, gt)
            files.append(_rel(folder, lab))
        vendor = VendorCells(boundaries=boundaries, source=f"{tfile.name} cell_ID" + (f" + {lab.name}" if lab else ""))
    sample = RawSample("cosmx", folder, tx, str(tfile), image, vendor, files=files, meta=meta)
    check_inside_image(sample)
    return sample


def _cosmx_label_polygons(path: Path, fov: int, ps: float, fx: float, fy: float, gt):
    import geopandas as gpd
    import shapely
    import tifffile
    from sopa.shapes import vectorize

    try:
        mask = tifffile.imread(path)
    except Exception as exc:
        raise SegmentationInputError(f"{path}: unreadable TIFF ({type(exc).__name__}: {exc})") from exc
    mask = np.asarray(mask).astype(np.int64)
    ids = np.unique(mask[mask > 0])
    if ids.size == 0:
        return gpd.GeoDataFrame(geometry=[])
    x0, sx, y0, sy = gt or (0.0, 1.0, float(mask.shape[0]), -1.0)
    # relabel 1..n so regionprops order is known, then map back
    lut = np.zeros(int(mask.max()) + 1, np.int64)
    lut[ids] = np.arange(1, ids.size + 1)
    cells = vectorize(lut[mask].astype(np.int32), tolerance=0.5, smooth_radius_ratio=0)
    A = [sx * ps, 0, 0, sy * ps, (x0 + fx) * ps, (y0 + fy) * ps]
    out = gpd.GeoDataFrame(geometry=[shapely.affinity.affine_transform(g, A) for g in cells.geometry],
                           index=[f"{fov}_{int(i)}" for i in ids[: len(cells)]])
    return out


# --------------------------------------------------------------------------------------------- Xenium

def _xenium_polygons(path: Path):
    import geopandas as gpd
    import shapely

    df = pd.read_parquet(path)
    need = {"cell_id", "vertex_x", "vertex_y"}
    if not need <= set(df.columns):
        raise SegmentationInputError(f"{path}: needs columns {sorted(need)}, has {list(df.columns)}")
    ids = df["cell_id"].map(lambda v: v.decode() if isinstance(v, bytes) else str(v))
    starts = np.flatnonzero(np.r_[True, ids.to_numpy()[1:] != ids.to_numpy()[:-1]])
    ends = np.r_[starts[1:], len(df)]
    coords = df[["vertex_x", "vertex_y"]].to_numpy()
    polys = [shapely.make_valid(shapely.Polygon(coords[s:e])) for s, e in zip(starts, ends)]
    return gpd.GeoDataFrame(geometry=polys, index=ids.to_numpy()[starts])


def read_10x_h5(path: Path):
    """10x feature-barcode matrix (cells x features, raw counts); ``var['feature_type']`` kept.

    ``scanpy.read_10x_h5`` fails on files whose ``matrix/shape`` is stored as floats (the real
    Xenium fixture), so the CSC arrays are read directly.
    """
    import anndata as ad
    import h5py
    import scipy.sparse as sp

    def txt(a):
        return [v.decode() if isinstance(v, bytes) else str(v) for v in a[:]]

    try:
        with h5py.File(path, "r") as f:
            m = f["matrix"]
            shape = tuple(int(v) for v in m["shape"][:])
            X = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=shape).T.tocsr()
            feats = m["features"]
            var = pd.DataFrame({"gene_ids": txt(feats["id"]), "feature_type": txt(feats["feature_type"])},
                               index=txt(feats["name"]))
            obs = pd.DataFrame(index=txt(m["barcodes"]))
    except (OSError, KeyError) as exc:
        raise SegmentationInputError(f"{path}: not a 10x feature-barcode matrix ({exc})") from exc
    adata = ad.AnnData(X.astype(np.int32), obs=obs, var=var)
    adata.var_names_make_unique()
    return adata


def read_xenium(folder: Path) -> RawSample:
    specs_file = folder / "experiment.xenium"
    try:
        specs = json.loads(specs_file.read_text())
    except json.JSONDecodeError as exc:
        raise SegmentationInputError(f"{specs_file}: not JSON ({exc})") from exc
    pixel = float(specs.get("pixel_size", 0.2125))
    tfile = folder / "transcripts.parquet"
    if not tfile.is_file():
        raise SegmentationInputError(f"missing transcript file: {tfile}")
    raw = pd.read_parquet(tfile)
    need = {"feature_name", "x_location", "y_location"}
    if not need <= set(raw.columns):
        raise SegmentationInputError(f"{tfile}: needs columns {sorted(need)}, has {list(raw.columns)}")
    gene = raw["feature_name"].map(lambda v: v.decode() if isinstance(v, bytes) else str(v))
    cid = raw["cell_id"].map(lambda v: v.decode() if isinstance(v, bytes) else str(v)) if "cell_id" in raw.columns else None
    df = pd.DataFrame({"x": raw["x_location"], "y": raw["y_location"],
                       "z": raw.get("z_location", 0.0), "gene": gene})
    if cid is not None:
        df["vendor_cell_id"] = cid.where(~cid.isin(["-1", "UNASSIGNED", "", "None"]), None)
    for extra in ("qv", "overlaps_nucleus"):
        if extra in raw.columns:
            df[extra] = raw[extra].to_numpy()
    tx = normalise_transcripts(df, str(tfile))
    files = ["experiment.xenium", "transcripts.parquet"]
    image = None
    candidates = sorted((folder / "morphology_focus").glob("*.ome.tif")) if (folder / "morphology_focus").is_dir() else []
    candidates += [folder / n for n in ("morphology_focus.ome.tif", "morphology_mip.ome.tif", "morphology.ome.tif") if (folder / n).is_file()]
    if candidates:
        arr = open_tiff(candidates[0])
        P = np.array([[pixel, 0, 0], [0, pixel, 0], [0, 0, 1.0]])
        image = ImageLayer(arr[None], ["DAPI"], P, [_rel(folder, candidates[0])], nuclear_channel="DAPI")
        files.append(_rel(folder, candidates[0]))
    vendor = None
    cfile, mfile, bfile = folder / "cells.parquet", folder / "cell_feature_matrix.h5", folder / "cell_boundaries.parquet"
    if cfile.is_file() and mfile.is_file():
        table = read_10x_h5(mfile)
        cells = pd.read_parquet(cfile)
        cells["cell_id"] = cells["cell_id"].map(lambda v: v.decode() if isinstance(v, bytes) else str(v))
        cells = cells.set_index("cell_id")
        missing = table.obs_names.difference(cells.index)
        if len(missing):
            raise SegmentationInputError(f"{mfile}: {len(missing)} cells not in {cfile.name} (e.g. {list(missing[:3])})")
        obs = cells.loc[table.obs_names]
        boundaries = _xenium_polygons(bfile) if bfile.is_file() else None
        nfile = folder / "nucleus_boundaries.parquet"
        nuclei = _xenium_polygons(nfile) if nfile.is_file() else None
        vendor = VendorCells(boundaries=boundaries, table=table, nuclei=nuclei, obs=obs, source="cell_feature_matrix.h5 + cells.parquet")
        files += ["cells.parquet", "cell_feature_matrix.h5"] + (["cell_boundaries.parquet"] if boundaries is not None else [])
        files += ["nucleus_boundaries.parquet"] if nuclei is not None else []
    meta = {"pixel_size_um": pixel, "image_files_expected": "morphology_focus/*.ome.tif or morphology_focus.ome.tif / morphology_mip.ome.tif"}
    sample = RawSample("xenium", folder, tx, str(tfile), image, vendor, files=files, meta=meta)
    check_inside_image(sample)
    return sample


# --------------------------------------------------------------------------------------------- dispatch

def read_sample(folder: str | Path, platform: str = "auto", *, z: str | int = "all", fov: int | None = None,
                pixel_size_um: float | None = None) -> RawSample:
    """Read a local raw folder; ``platform='auto'`` detects it. Errors name the file at fault."""
    folder = Path(folder)
    platform = check_platform(folder, platform)
    if z != "all":
        try:
            z = int(z)
        except (TypeError, ValueError):
            raise SegmentationInputError(f"--z must be 'all' or a plane number, got {z!r}") from None
    if platform == "merscope":
        return read_merscope(folder, z=z)
    if platform == "cosmx":
        return read_cosmx(folder, fov=fov, pixel_size_um=pixel_size_um)
    if platform == "xenium":
        return read_xenium(folder)
    raise SegmentationInputError(
        f"{folder}: Visium HD is a spot-level sample: read it with read_visium_hd_bins (bins) or segment its 2 µm bins with bins_to_cells"
    )


__all__ = ["open_tiff", "read_cosmx", "read_merscope", "read_sample", "read_xenium"]
