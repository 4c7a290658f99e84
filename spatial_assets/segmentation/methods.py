"""Segmentation methods, chosen by name; each fails with a clear message when what it needs is absent.

* ``vendor`` — the instrument's own cells (default where the folder has them).
* ``watershed`` — weight-free nuclei + expansion (:mod:`.nuclei`) run through sopa's image-patch
  pipeline: ``sopa.make_image_patches`` → ``sopa.segmentation.StainingSegmentation`` (the class
  behind ``custom_staining_based``) → ``sopa.segmentation.solve_conflicts``. We drive the patch loop
  ourselves (``write_patch_cells`` per patch, exactly what ``custom_staining_based`` does) so the patch
  callable knows its patch's position: it needs the transcripts under the patch for the adaptive
  expansion and it records the nuclei beside the cells.
* ``comseg`` — sopa's ComSeg wrapper on transcript patches, with the watershed nuclei as prior.
* ``proseg`` / ``baysor`` — only when their binary is on PATH; ``stardist`` / ``cellpose`` — only
  when the package is installed *and* a local weights directory is configured. Nothing is ever
  downloaded and there is no silent fallback to another method.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spatial_assets.segmentation.errors import MethodUnavailableError, SegmentationInputError
from spatial_assets.segmentation.nuclei import WatershedParams, segment_patch
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

class _PatchMethod:
    """The callable sopa runs on each patch ((C, y, x) integer image → cell mask), aware of its patch."""

    def __init__(self, sample: RawSample, params: WatershedParams, channels: list[str], nuclei_dir: Path):
        self.params = params
        self.channels = channels
        self.pixel_um = sample.image.pixel_size_um
        col, row = sample.image.to_pixels(sample.transcripts["x"].to_numpy(), sample.transcripts["y"].to_numpy())
        order = np.argsort(col, kind="stable")
        self.col, self.row = col[order], row[order]
        self.nuclei_dir = nuclei_dir
        self.bounds: tuple[int, int, int, int] | None = None
        self.index = -1

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from sopa.shapes import vectorize

        x0, y0, x1, y1 = self.bounds
        lo, hi = np.searchsorted(self.col, [x0, x1])
        c, r = self.col[lo:hi], self.row[lo:hi]
        inside = (r >= y0) & (r < y1)
        rc = (r[inside] - y0, c[inside] - x0)
        nuclear = image[0]
        cyto = image[1] if len(self.channels) > 1 else None
        cells, nuc = segment_patch(nuclear, self.pixel_um, self.params, cytoplasm=cyto, transcripts_rc=rc)
        gdf = vectorize(nuc) if nuc.max() > 0 else None
        if gdf is not None and len(gdf):
            gdf.geometry = gdf.translate(x0, y0)
            gdf.to_parquet(self.nuclei_dir / f"{self.index}.parquet")
        return cells


def _pixels_to_um(gdf: Any, pixel_to_um: np.ndarray) -> Any:
    """sopa's pixel polygons (vertex = pixel centre at integer coordinates) → µm."""
    import shapely

    A = pixel_to_um
    # + 0.5: our pixel (col, row) covers [col, col + 1), centre at col + 0.5
    coeffs = [A[0, 0], A[0, 1], A[1, 0], A[1, 1], A[0, 2] + 0.5 * (A[0, 0] + A[0, 1]), A[1, 2] + 0.5 * (A[1, 0] + A[1, 1])]
    out = gdf.copy()
    out.geometry = [shapely.affinity.affine_transform(g, coeffs) for g in gdf.geometry]
    return out


def run_watershed(
    sample: RawSample,
    params: WatershedParams | None = None,
    *,
    patch_um: float = 400.0,
    overlap_um: float | None = None,
    workdir: str | Path | None = None,
    progress: Any = None,
) -> Segmentation:
    """Weight-free segmentation through sopa's patch pipeline; memory bounded by the patch size."""
    import geopandas as gpd
    from sopa.segmentation import StainingSegmentation, solve_conflicts

    sopa = _sopa()
    params = params or WatershedParams()
    image = sample.require_image("--method watershed")
    t0 = time.perf_counter()
    channels = [image.nuclear_channel]
    if params.use_cytoplasm_stain and image.cytoplasm_channel:
        channels.append(image.cytoplasm_channel)
    sdata = sample.to_spatialdata(with_points=False)
    px = image.pixel_size_um
    # overlap: a whole cell (nucleus + maximal expansion on both sides) fits in it
    overlap = overlap_um if overlap_um is not None else 2 * (params.nucleus_diameter_um / 2 + params.expand_um) + 4
    sopa.make_image_patches(sdata, patch_width=int(round(patch_um / px)), patch_overlap=int(round(overlap / px)),
                            image_key="image", roi_key=None)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="watershed_") as tmp:
        cdir, ndir = Path(tmp) / "cells", Path(tmp) / "nuclei"
        cdir.mkdir()
        ndir.mkdir()
        method = _PatchMethod(sample, params, channels, ndir)
        seg = StainingSegmentation(sdata, method, channels, image_key="image", min_area=0, clip_limit=0, gaussian_sigma=0)
        n = len(seg.patches_gdf)
        for i in range(n):
            method.bounds = tuple(int(v) for v in seg.patches_gdf.geometry[i].bounds)
            method.index = i
            seg.write_patch_cells(str(cdir), i)
            if progress:
                progress(f"watershed patch {i + 1}/{n}")
        files = [f for f in cdir.iterdir() if f.suffix == ".parquet"]
        raw_cells = StainingSegmentation.read_patches_cells(str(cdir)) if files else gpd.GeoDataFrame(geometry=[])
        raw_cells = raw_cells[~raw_cells.is_empty] if len(raw_cells) else raw_cells
        cells = solve_conflicts(raw_cells) if len(raw_cells) else gpd.GeoDataFrame(geometry=[])
        nfiles = [f for f in ndir.iterdir() if f.suffix == ".parquet"]
        nuclei = None
        if nfiles:
            import pandas as pd

            nraw = pd.concat([gpd.read_parquet(f) for f in nfiles]).reset_index(drop=True)
            nraw = nraw[~nraw.is_empty]
            nuclei = solve_conflicts(nraw) if len(nraw) else None
    cells = _pixels_to_um(gpd.GeoDataFrame(geometry=list(cells.geometry)), image.pixel_to_um)
    if nuclei is not None:
        nuclei = _pixels_to_um(gpd.GeoDataFrame(geometry=list(nuclei.geometry)), image.pixel_to_um)
    parameters = {**params.as_dict(), "patch_um": patch_um, "overlap_um": overlap, "channels": channels,
                  "pixel_size_um": px, "pipeline": "sopa.make_image_patches + StainingSegmentation + solve_conflicts"}
    return Segmentation(cells, nuclei, parameters, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ comseg

def run_comseg(sample: RawSample, prior: Segmentation, *, patch_um: float = 200.0, config: dict | None = None) -> Segmentation:
    """ComSeg via sopa on transcript patches, seeded by the prior's nuclei (falls back to its cells)."""
    import geopandas as gpd

    sopa = _sopa()
    t0 = time.perf_counter()
    shapes = prior.nuclei if prior.nuclei is not None and len(prior.nuclei) else prior.cells
    if shapes is None or len(shapes) == 0:
        raise SegmentationInputError(f"{sample.folder}: comseg needs prior nuclei; the watershed found none")
    sdata = sample.to_spatialdata(with_points=True, shapes={"prior": gpd.GeoDataFrame(geometry=list(shapes.geometry))})
    with tempfile.TemporaryDirectory(prefix="comseg_") as tmp:
        sdata.attrs["cache_dir"] = tmp  # noqa: not used by every sopa version
        os.environ.setdefault("SOPA_CACHE_DIR", tmp)
        sopa.make_transcript_patches(sdata, patch_width=patch_um, patch_overlap=20, prior_shapes_key="prior",
                                     write_cells_centroids=True, min_points_per_patch=50, roi_key=None)
        sopa.segmentation.comseg(sdata, config=config or None, min_area=0)
        cells = sdata.shapes["comseg_boundaries"]
    out = gpd.GeoDataFrame(geometry=list(cells.geometry))
    return Segmentation(out, prior.nuclei, {"comseg_config": config or "sopa default (from prior cell area)",
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
        cells = _pixels_to_um(gpd.GeoDataFrame(geometry=list(sdata.shapes[key].geometry)), image.pixel_to_um)
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
