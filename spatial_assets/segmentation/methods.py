"""Segmentation methods, chosen by name; each fails with a clear message when what it needs is absent.

* ``vendor`` — the instrument's own cells (default where the folder has them).
* ``watershed`` — weight-free nuclei + expansion (:mod:`.nuclei`) on sopa's image patches:
  ``sopa.make_image_patches`` → our patch function → ``sopa.shapes.vectorize`` →
  ``sopa.segmentation.solve_conflicts``. This is the loop of ``custom_staining_based`` /
  ``StainingSegmentation.write_patch_cells``, driven here because (1) the patch function needs to
  know where its patch is (the transcripts under it drive the adaptive expansion), (2) it returns
  nuclei beside cells, and (3) sopa's vectoriser smooths every full-resolution outline with three
  buffers, 70 % of the run time on a 300 µm crop; we vectorise at the working resolution without
  that smoothing (measured in docs/segmentation.md).
* ``comseg`` — sopa's ComSeg wrapper on transcript patches, with the watershed nuclei as prior.
* ``proseg`` / ``baysor`` — only when their binary is on PATH; ``stardist`` / ``cellpose`` — only
  when the package is installed *and* a local weights directory is configured. Nothing is ever
  downloaded and there is no silent fallback to another method.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from spatial_assets.segmentation.errors import MethodUnavailableError, SegmentationInputError
from spatial_assets.segmentation.nuclei import WatershedParams, he_to_nuclear, segment_patch, working_factor
from spatial_assets.segmentation.sample import RawSample

METHODS = ("vendor", "watershed", "comseg", "proseg", "baysor", "stardist", "cellpose")
WEIGHTS_ENV = {"stardist": "SPATIAL_ASSETS_STARDIST_WEIGHTS", "cellpose": "SPATIAL_ASSETS_CELLPOSE_WEIGHTS"}


@dataclass
class Segmentation:
    """Cell outlines (and nuclei, if known) in µm, before transcripts are counted."""

    cells: Any  # GeoDataFrame, µm
    nuclei: Any | None
    parameters: dict
    seconds: float


def _sopa():
    import sopa

    # 2 shared cores: never start a dask cluster behind the caller's back
    sopa.settings.parallelization_backend = None
    return sopa


def default_method(sample: RawSample) -> str:
    return "vendor" if sample.vendor is not None else "watershed"


def check_method_available(method: str, *, weights_dir: str | None = None) -> None:
    """Raise :class:`MethodUnavailableError` when ``method`` cannot run here (binary / package / weights)."""
    if method not in METHODS:
        raise SegmentationInputError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if method in ("proseg", "baysor"):
        if shutil.which(method) is None:
            raise MethodUnavailableError(
                f"--method {method}: the '{method}' binary is not on PATH (install it yourself; it is never downloaded)"
            )
    if method in ("stardist", "cellpose"):
        import importlib.util

        if importlib.util.find_spec(method) is None:
            raise MethodUnavailableError(f"--method {method}: the python package '{method}' is not installed")
        wdir = weights_dir or os.environ.get(WEIGHTS_ENV[method])
        if not wdir:
            raise MethodUnavailableError(
                f"--method {method}: no local weights directory configured (set {WEIGHTS_ENV[method]} or weights_dir=); weights are never downloaded"
            )
        if not Path(wdir).is_dir() or not any(Path(wdir).iterdir()):
            raise MethodUnavailableError(f"--method {method}: weights directory {wdir} does not exist or is empty")
    if method == "comseg":
        import importlib.util

        if importlib.util.find_spec("comseg") is None:
            raise MethodUnavailableError("--method comseg: the python package 'comseg' is not installed")


# ------------------------------------------------------------------------------------------ watershed

def vectorize_labels(mask: np.ndarray, *, tolerance: float = 0.4) -> tuple[np.ndarray, list]:
    """(label ids, polygons) of a label mask, pixel centres at integer coordinates (as sopa's vectoriser).

    One outline per label (its longest contour: the labels come from a watershed and an expansion,
    so they are single pieces), simplified by ``tolerance`` pixels. Measured 0.6 ms per label
    against 4.7 ms for ``sopa.shapes.vectorize``, whose smoothing buffers each outline three times
    (docs/segmentation.md) — at 20k cells that is the difference between seconds and minutes.
    """
    import shapely
    from skimage.measure import find_contours

    ids, polys = [], []
    for i, slc in enumerate(ndi.find_objects(mask), start=1):
        if slc is None:
            continue
        sub = np.pad(mask[slc] == i, 1)
        contours = find_contours(sub.astype(np.float32), 0.5)
        if not contours:
            continue
        ring = max(contours, key=len)
        if len(ring) < 4:
            continue
        # (row, col) → (x, y) in the mask's pixel frame
        polys.append(shapely.Polygon(np.column_stack([ring[:, 1] + slc[1].start - 1, ring[:, 0] + slc[0].start - 1])))
        ids.append(i)
    if polys:
        polys = list(shapely.make_valid(shapely.simplify(np.asarray(polys, dtype=object), tolerance, preserve_topology=False)))
    return np.asarray(ids, dtype=np.int64), polys


def _vectorize(mask: np.ndarray, f: int, x0: int, y0: int, nucleus_px: np.ndarray | None = None):
    """Label mask at working resolution → polygons in native continuous pixel coordinates."""
    import geopandas as gpd
    import shapely

    ids, polys = vectorize_labels(mask)
    gdf = gpd.GeoDataFrame({"label": ids}, geometry=polys) if polys else gpd.GeoDataFrame({"label": []}, geometry=[])
    if len(gdf) == 0:
        return gdf
    gdf = gdf[gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"]) & ~gdf.is_empty]
    # working pixel v (vertex at its centre) → native continuous (v + 0.5) · f, then the patch offset
    gdf.geometry = [shapely.affinity.affine_transform(g, [f, 0, 0, f, x0 + 0.5 * f, y0 + 0.5 * f]) for g in gdf.geometry]
    if nucleus_px is not None:
        gdf["nucleus_px"] = nucleus_px[gdf["label"].to_numpy()] * float(f * f)
    return gdf


def _to_um(gdf: Any, pixel_to_um: np.ndarray) -> Any:
    """Polygons in native continuous pixel coordinates (pixel (c, r) covers [c, c+1)) → µm."""
    import geopandas as gpd
    import shapely

    A = pixel_to_um
    coeffs = [A[0, 0], A[0, 1], A[1, 0], A[1, 1], A[0, 2], A[1, 2]]
    return gpd.GeoDataFrame(geometry=[shapely.affinity.affine_transform(g, coeffs) for g in gdf.geometry])


def run_watershed(
    sample: RawSample,
    params: WatershedParams | None = None,
    *,
    patch_um: float = 400.0,
    overlap_um: float | None = None,
    progress: Any = None,
) -> Segmentation:
    """Weight-free segmentation on sopa's image patches; memory bounded by the patch size.

    ``sopa.make_image_patches`` cuts the slide, each patch window is read lazily and segmented
    (:func:`segment_patch`), vectorised, and ``sopa.segmentation.solve_conflicts`` merges the copies
    of a cell that sit in two overlapping patches.
    """
    import geopandas as gpd
    import pandas as pd
    from sopa.segmentation import solve_conflicts

    sopa = _sopa()
    params = params or WatershedParams()
    image = sample.require_image("--method watershed")
    t0 = time.perf_counter()
    channels = [image.nuclear_channel]
    if params.use_cytoplasm_stain and image.cytoplasm_channel:
        channels.append(image.cytoplasm_channel)
    if image.kind == "he":
        channels = list(image.channels)  # R, G, B: the haematoxylin channel is computed per patch
    ch_idx = [image.channels.index(c) for c in channels]
    sdata = sample.to_spatialdata(with_points=False)
    px = image.pixel_size_um
    # overlap: a whole cell (nucleus + maximal expansion on both sides) fits in it
    overlap = overlap_um if overlap_um is not None else 2 * (params.nucleus_diameter_um / 2 + params.expand_um) + 4
    sopa.make_image_patches(sdata, patch_width=int(round(patch_um / px)), patch_overlap=int(round(overlap / px)),
                            image_key="image", roi_key=None)
    patches = sdata.shapes["image_patches"]
    col, row = image.to_pixels(sample.transcripts["x"].to_numpy(), sample.transcripts["y"].to_numpy())
    order = np.argsort(col, kind="stable")
    col, row = col[order], row[order]
    f = working_factor(px, params)
    cell_parts = []
    n = len(patches)
    for i, geom in enumerate(patches.geometry):
        x0, y0, x1, y1 = (int(v) for v in geom.bounds)
        window = np.asarray(image.data[ch_idx, y0:y1, x0:x1])
        lo, hi = np.searchsorted(col, [x0, x1])
        c, r = col[lo:hi], row[lo:hi]
        inside = (r >= y0) & (r < y1)
        rc = (r[inside] - y0, c[inside] - x0)
        if image.kind == "he":
            nuclear, cyto = he_to_nuclear(np.moveaxis(window, 0, -1)), None
        else:
            nuclear, cyto = window[0], (window[1] if len(ch_idx) > 1 else None)
        cells, nuc = segment_patch(nuclear, px, params, cytoplasm=cyto, transcripts_rc=rc if len(c) else None, native=False)
        if cells.max() > 0:
            nuc_px = np.bincount(nuc.ravel(), minlength=int(cells.max()) + 1).astype(np.float64)
            part = _vectorize(cells, f, x0, y0, nucleus_px=nuc_px)
            part["patch"] = i
            cell_parts.append(part)
        if progress:
            progress(f"watershed patch {i + 1}/{n}: {int(cells.max())} cells")
    parts = [p for p in cell_parts if len(p)]
    if parts:
        allp = pd.concat(parts).reset_index(drop=True)
        allp = allp[~allp.is_empty & allp.is_valid].reset_index(drop=True)
        # cells of one patch never overlap (one label image): only copies across patches can conflict
        resolved = (solve_conflicts(allp, patch_indices=allp["patch"].to_numpy()) if len(allp)
                    else gpd.GeoDataFrame(geometry=[]))
        # a cell seen by two patches is merged by sopa: keep the larger of its nucleus measurements
        pts = gpd.GeoDataFrame({"nucleus_px": allp["nucleus_px"].to_numpy()}, geometry=allp.geometry.representative_point().to_numpy())
        j = gpd.sjoin(pts, gpd.GeoDataFrame(geometry=resolved.geometry.to_numpy()), how="inner", predicate="within")
        nuc_px = j.groupby("index_right")["nucleus_px"].max().reindex(range(len(resolved))).to_numpy()
    else:
        resolved, nuc_px = gpd.GeoDataFrame(geometry=[]), np.zeros(0)
    cells = _to_um(resolved, image.pixel_to_um)
    cells["nucleus_area_um2"] = nuc_px * px * px
    nuclei = None
    parameters = {**params.as_dict(), "patch_um": patch_um, "overlap_um": overlap, "channels": channels,
                  "pixel_size_um": px, "working_factor": f, "n_patches": n,
                  "pipeline": "sopa.make_image_patches + segment_patch + sopa.shapes.vectorize + sopa.segmentation.solve_conflicts"}
    return Segmentation(cells, nuclei, parameters, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ comseg

def run_comseg(sample: RawSample, prior: Segmentation, *, patch_um: float = 200.0, config: dict | None = None,
               seed: int = 0) -> Segmentation:
    """ComSeg via sopa on transcript patches, seeded by the prior's nuclei (falls back to its cells)."""
    import geopandas as gpd

    sopa = _sopa()
    t0 = time.perf_counter()
    shapes = prior.nuclei if prior.nuclei is not None and len(prior.nuclei) else prior.cells
    if shapes is None or len(shapes) == 0:
        raise SegmentationInputError(f"{sample.folder}: comseg needs prior nuclei; the watershed found none")
    sdata = sample.to_spatialdata(with_points=True, shapes={"prior": gpd.GeoDataFrame(geometry=list(shapes.geometry))})
    if not config:
        # sopa's default (diameter from the prior's mean area, max radius 1.75 diameters, alpha 0.5),
        # except that disconnected polygons are allowed: with sopa's default ComSeg stopped after
        # 33 min on the CosMx FOV with "disconnected polygons are not allowed" (docs/segmentation.md)
        diameter = float(2 * np.sqrt(np.mean(shapes.geometry.area) / np.pi))
        config = {"dict_scale": {"x": 1, "y": 1, "z": 1}, "mean_cell_diameter": diameter,
                  "max_cell_radius": 1.75 * diameter, "norm_vector": False, "alpha": 0.5,
                  "allow_disconnected_polygon": True, "min_rna_per_cell": 20, "gene_column": "gene"}
    from spatial_assets.segmentation.coexpression import fast_coexpression

    state = np.random.get_state()
    try:  # sopa keeps its transcript patches in a per-object cache directory; removed afterwards
        sopa.make_transcript_patches(sdata, patch_width=patch_um, patch_overlap=20, prior_shapes_key="prior",
                                     write_cells_centroids=True, min_points_per_patch=50, roi_key=None)
        # ComSeg samples its co-expression vectors with numpy's global generator: seeded for a
        # deterministic result, the caller's state restored afterwards
        np.random.seed(seed)
        with fast_coexpression():
            sopa.segmentation.comseg(sdata, config=config or None, min_area=0)
        cells = sdata.shapes["comseg_boundaries"]
    finally:
        np.random.set_state(state)
        sopa.utils.delete_cache(sdata)
    out = gpd.GeoDataFrame(geometry=list(cells.geometry))
    return Segmentation(out, prior.nuclei, {"comseg_config": config,
                                            "patch_um": patch_um, "prior": "watershed nuclei"}, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ external tools

def run_external(sample: RawSample, method: str, *, weights_dir: str | None = None, prior: Segmentation | None = None) -> Segmentation:
    """proseg / baysor / stardist / cellpose through sopa, once :func:`check_method_available` passed.

    Not exercised on this machine (none of these can be installed here); the availability checks are.
    """
    import geopandas as gpd

    check_method_available(method, weights_dir=weights_dir)
    sopa = _sopa()
    t0 = time.perf_counter()
    if method in ("stardist", "cellpose"):
        image = sample.require_image(f"--method {method}")
        sdata = sample.to_spatialdata(with_points=False)
        sopa.make_image_patches(sdata, patch_width=int(400 / image.pixel_size_um), patch_overlap=int(30 / image.pixel_size_um), image_key="image", roi_key=None)
        wdir = weights_dir or os.environ[WEIGHTS_ENV[method]]
        if method == "stardist":
            sopa.segmentation.stardist(sdata, channels=[image.nuclear_channel], model_type=None, local_model=wdir)
            key = "stardist_boundaries"
        else:
            sopa.segmentation.cellpose(sdata, channels=[image.nuclear_channel], diameter=8 / image.pixel_size_um, pretrained_model=wdir)
            key = "cellpose_boundaries"
        # sopa's vertices sit on pixel centres at integer coordinates: shift by half a pixel
        cells = _to_um(gpd.GeoDataFrame(geometry=list(sdata.shapes[key].geometry.translate(0.5, 0.5))), image.pixel_to_um)
    else:
        if prior is None:
            raise SegmentationInputError(f"--method {method} needs a prior segmentation")
        sdata = sample.to_spatialdata(with_points=True, shapes={"prior": gpd.GeoDataFrame(geometry=list(prior.cells.geometry))})
        if method == "proseg":
            sopa.make_transcript_patches(sdata, patch_width=None, prior_shapes_key="prior", roi_key=None)
            sopa.segmentation.proseg(sdata)
            key = "proseg_boundaries"
        else:
            sopa.make_transcript_patches(sdata, patch_width=200, prior_shapes_key="prior", roi_key=None)
            sopa.segmentation.baysor(sdata)
            key = "baysor_boundaries"
        cells = gpd.GeoDataFrame(geometry=list(sdata.shapes[key].geometry))
    return Segmentation(cells, None, {"tool": method}, time.perf_counter() - t0)


__all__ = ["METHODS", "Segmentation", "check_method_available", "default_method", "run_comseg", "run_external", "run_watershed"]
