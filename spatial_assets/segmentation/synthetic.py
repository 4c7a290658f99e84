"""Synthetic imaging-based sample with known truth, written in MERSCOPE's own output layout.

Why a generator and not only real crops: the vendor segmentations of the real crops are reference
points, not truth. Here every transcript's cell is known, and the sample is built to be as hard as
tissue: a dense band of touching nuclei, dim nuclei, uneven background, cells reaching 2–9 µm beyond
their nucleus (each cell its own distance, stopped by its neighbours), 10 % background transcripts
and cell-type marker genes. It is written as a MERSCOPE folder (``detected_transcripts.csv`` with
the true ``cell_id``, ``images/mosaic_DAPI_z0.tif``, ``images/micron_to_mosaic_pixel_transform.csv``,
``cell_boundaries.parquet`` with the true cells), so it goes through the same reader as real data.

The image is rendered tile by tile straight into a tiled TIFF, so a 5 mm² region does not need the
whole image in memory.

Cell territory (the rule that decides truth): a point belongs to the cell whose nucleus it is
radially closest to (``excess = distance from centre − nucleus radius in that direction``), if that
excess is at most the cell's own expansion distance.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

N_HARMONICS = 3


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; every length in µm."""

    width_um: float = 400.0
    height_um: float = 400.0
    pixel_size_um: float = 0.2125
    #: centre spacing outside the band (Poisson-disc minimum distance) and inside the dense band
    spacing_um: float = 17.0
    band_spacing_um: float = 6.8
    band_width_fraction: float = 0.22
    nucleus_radius_um: tuple[float, float] = (3.0, 4.6)
    expansion_um: tuple[float, float] = (2.0, 9.0)
    dim_fraction: float = 0.15
    dim_factor: tuple[float, float] = (0.22, 0.4)
    psf_sigma_um: float = 0.8
    #: transcripts per µm² in the cytoplasm; the nucleus holds ``nuclear_density_ratio`` times more
    cytoplasm_density: float = 0.5
    nuclear_density_ratio: float = 1.6
    background_fraction: float = 0.10
    n_cell_types: int = 6
    markers_per_type: int = 8
    n_shared_genes: int = 30
    n_controls: int = 5
    z_range_um: float = 6.0
    seed: int = 0
    tile_px: int = 512
    extra: dict = field(default_factory=dict)


def _poisson_disc(rng: np.random.Generator, w: float, h: float, r: float, keep=None, k: int = 20) -> np.ndarray:
    """Bridson sampling: points at least ``r`` apart over ``[0, w] × [0, h]`` (``keep(x, y)`` filters)."""
    cell = r / np.sqrt(2)
    gw, gh = int(np.ceil(w / cell)), int(np.ceil(h / cell))
    grid = -np.ones((gh, gw), dtype=np.int64)
    pts: list[tuple[float, float]] = []
    active: list[int] = []

    def ok(x: float, y: float) -> bool:
        if not (0 <= x < w and 0 <= y < h):
            return False
        gx, gy = int(x / cell), int(y / cell)
        for yy in range(max(gy - 2, 0), min(gy + 3, gh)):
            for xx in range(max(gx - 2, 0), min(gx + 3, gw)):
                j = grid[yy, xx]
                if j >= 0 and (pts[j][0] - x) ** 2 + (pts[j][1] - y) ** 2 < r * r:
                    return False
        return True

    def add(x: float, y: float) -> None:
        pts.append((x, y))
        grid[int(y / cell), int(x / cell)] = len(pts) - 1
        active.append(len(pts) - 1)

    # several starts so that disconnected keep-regions are all filled
    for _ in range(max(4, int(w * h / (50 * r * r)))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        if (keep is None or keep(x0, y0)) and ok(x0, y0):
            add(x0, y0)
    while active:
        i = active[rng.integers(len(active))]
        px, py = pts[i]
        found = False
        ang = rng.uniform(0, 2 * np.pi, k)
        rad = rng.uniform(r, 2 * r, k)
        for a, d in zip(ang, rad):
            x, y = px + d * np.cos(a), py + d * np.sin(a)
            if (keep is None or keep(x, y)) and ok(x, y):
                add(x, y)
                found = True
                break
        if not found:
            active.remove(i)
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


def _band_distance(spec: SyntheticSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance (µm) from the centre line of the dense band, a gentle curve across the region."""
    cy = spec.height_um * (0.5 + 0.12 * np.sin(2 * np.pi * x / max(spec.width_um, 1.0)))
    return np.abs(y - cy)


def make_cells(spec: SyntheticSpec) -> pd.DataFrame:
    """One row per cell: centre, nucleus shape, brightness, expansion distance and cell type."""
    rng = np.random.default_rng(spec.seed)
    half = spec.band_width_fraction * spec.height_um / 2
    outside = _poisson_disc(rng, spec.width_um, spec.height_um, spec.spacing_um,
                            keep=lambda x, y: _band_distance(spec, np.float64(x), np.float64(y)) > half)
    inside = _poisson_disc(rng, spec.width_um, spec.height_um, spec.band_spacing_um,
                           keep=lambda x, y: _band_distance(spec, np.float64(x), np.float64(y)) <= half)
    xy = np.vstack([outside, inside])
    in_band = np.r_[np.zeros(len(outside), bool), np.ones(len(inside), bool)]
    n = len(xy)
    r_lo, r_hi = spec.nucleus_radius_um
    base_r = rng.uniform(r_lo, r_hi, n)
    # band nuclei are packed: they touch (and may press into each other a little), as in tissue
    base_r[in_band] = np.minimum(base_r[in_band], spec.band_spacing_um * rng.uniform(0.45, 0.56, in_band.sum()))
    elong = rng.uniform(1.0, 1.5, n)
    elong[in_band] = rng.uniform(1.0, 1.25, in_band.sum())
    cells = pd.DataFrame({
        "cell_id": [f"cell{i:06d}" for i in range(n)],
        "x": xy[:, 0], "y": xy[:, 1], "in_band": in_band,
        "a": base_r * np.sqrt(elong), "b": base_r / np.sqrt(elong),
        "angle": rng.uniform(0, np.pi, n),
        "brightness": rng.lognormal(0.0, 0.25, n),
        "expansion_um": rng.uniform(*spec.expansion_um, n),
    })
    dim = rng.random(n) < spec.dim_fraction
    cells.loc[dim, "brightness"] *= rng.uniform(*spec.dim_factor, int(dim.sum()))
    cells["dim"] = dim
    for k in range(N_HARMONICS):  # irregular outlines
        cells[f"h{k}_amp"] = rng.uniform(0, 0.06, n)
        cells[f"h{k}_phase"] = rng.uniform(0, 2 * np.pi, n)
    # cell types: the band is mostly one type, elsewhere a mix
    types = rng.integers(0, spec.n_cell_types, n)
    types[in_band & (rng.random(n) < 0.7)] = 0
    cells["cell_type"] = pd.Categorical([f"type{t}" for t in types])
    cells["density"] = spec.cytoplasm_density * rng.lognormal(0.0, 0.3, n)
    return cells


def _nucleus_radius(cells: pd.DataFrame, idx: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Nucleus radius of cell ``idx`` in world direction ``theta`` (ellipse with a few harmonics)."""
    a = cells["a"].to_numpy()[idx]
    b = cells["b"].to_numpy()[idx]
    t = theta - cells["angle"].to_numpy()[idx]
    r = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
    mod = np.ones_like(r)
    for k in range(N_HARMONICS):
        mod += cells[f"h{k}_amp"].to_numpy()[idx] * np.cos((k + 2) * t + cells[f"h{k}_phase"].to_numpy()[idx])
    return r * mod


class _Territory:
    """Which cell owns a point, and whether the point is inside that cell's nucleus."""

    def __init__(self, cells: pd.DataFrame):
        self.cells = cells
        self.xy = cells[["x", "y"]].to_numpy()
        self.tree = cKDTree(self.xy)
        self.reach = float((cells["a"].max() * 1.2) + cells["expansion_um"].max())
        self.k = 12

    def owner(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cell index or -1, inside nucleus) for each point."""
        n = len(self.xy)
        k = min(self.k, n)
        d, nb = self.tree.query(np.column_stack([px, py]), k=k, distance_upper_bound=self.reach)
        d = d.reshape(len(px), k)
        nb = nb.reshape(len(px), k)
        valid = nb < n
        nbc = np.where(valid, nb, 0)
        theta = np.arctan2(py[:, None] - self.xy[nbc, 1], px[:, None] - self.xy[nbc, 0])
        rad = _nucleus_radius(self.cells, nbc, theta)
        excess = np.where(valid, d - rad, np.inf)
        allowed = excess <= self.cells["expansion_um"].to_numpy()[nbc]
        score = np.where(allowed & valid, excess, np.inf)
        best = np.argmin(score, axis=1)
        rows = np.arange(len(px))
        ok = np.isfinite(score[rows, best])
        own = np.where(ok, nbc[rows, best], -1)
        in_nucleus = ok & (excess[rows, best] <= 0)
        return own, in_nucleus


def _background_field(spec: SyntheticSpec, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(additive background, multiplicative illumination), smooth over hundreds of µm."""
    rng = np.random.default_rng(spec.seed + 7)
    ph = rng.uniform(0, 2 * np.pi, 4)
    add = 1.0 + 0.8 * np.sin(2 * np.pi * x / 330 + ph[0]) * np.cos(2 * np.pi * y / 270 + ph[1])
    add += 0.6 * np.sin(2 * np.pi * (x + y) / 520 + ph[2])
    illum = 0.8 + 0.2 * np.cos(2 * np.pi * x / 610 + ph[3]) * np.cos(2 * np.pi * y / 480)
    return np.clip(add, 0.2, None), illum


def render_tile(spec: SyntheticSpec, territory: _Territory, row0: int, col0: int, h: int, w: int, rng_seed: int) -> np.ndarray:
    """DAPI tile (uint16) of pixel rows ``row0:row0+h`` and columns ``col0:col0+w``."""
    from scipy.ndimage import gaussian_filter

    p = spec.pixel_size_um
    sigma_px = spec.psf_sigma_um / p
    m = int(np.ceil(4 * sigma_px))
    H, W = h + 2 * m, w + 2 * m
    r_first, c_first = row0 - m, col0 - m
    cells = territory.cells
    # only nuclei emit: paint each nucleus whose box meets the tile (brightest wins where they touch)
    x0, x1 = (c_first) * p, (c_first + W) * p
    y0, y1 = (r_first) * p, (r_first + H) * p
    rmax = cells["a"].to_numpy() * 1.2
    cx, cy = cells["x"].to_numpy(), cells["y"].to_numpy()
    near = np.flatnonzero((cx + rmax > x0) & (cx - rmax < x1) & (cy + rmax > y0) & (cy - rmax < y1))
    bright = cells["brightness"].to_numpy()
    signal = np.zeros((H, W), np.float32)
    for i in near:
        ca = max(int(np.floor((cx[i] - rmax[i]) / p)) - c_first, 0)
        cb = min(int(np.ceil((cx[i] + rmax[i]) / p)) - c_first + 1, W)
        ra = max(int(np.floor((cy[i] - rmax[i]) / p)) - r_first, 0)
        rb = min(int(np.ceil((cy[i] + rmax[i]) / p)) - r_first + 1, H)
        if ca >= cb or ra >= rb:
            continue
        X, Y = np.meshgrid((np.arange(ca, cb) + c_first + 0.5) * p, (np.arange(ra, rb) + r_first + 0.5) * p)
        theta = np.arctan2(Y - cy[i], X - cx[i])
        inside = np.hypot(X - cx[i], Y - cy[i]) <= _nucleus_radius(cells, np.full(theta.shape, i), theta)
        # chromatin texture: a fine pattern per nucleus
        tex = 0.85 + 0.15 * np.sin(X * 2.1 + i) * np.cos(Y * 1.7 - i)
        val = np.where(inside, bright[i] * tex, 0).astype(np.float32)
        np.maximum(signal[ra:rb, ca:cb], val, out=signal[ra:rb, ca:cb])
    rr = np.arange(r_first, r_first + H)
    cc = np.arange(c_first, c_first + W)
    X, Y = np.meshgrid((cc + 0.5) * p, (rr + 0.5) * p)
    signal = gaussian_filter(signal, sigma_px)[m:-m or None, m:-m or None]
    add, illum = _background_field(spec, X[m:-m or None, m:-m or None], Y[m:-m or None, m:-m or None])
    peak = 2200.0
    img = illum * (peak * signal + 260.0 * add)
    rng = np.random.default_rng(rng_seed)
    img = rng.poisson(np.clip(img, 0, None)).astype(np.float32) + rng.normal(0, 25.0, img.shape)
    return np.clip(img, 0, 65535).astype(np.uint16)


def _genes(spec: SyntheticSpec) -> tuple[list[str], np.ndarray, list[str]]:
    """Gene names, a (types × genes) expression profile and the control probe names."""
    markers = [f"Mk{t}_{j}" for t in range(spec.n_cell_types) for j in range(spec.markers_per_type)]
    shared = [f"Gene{j:03d}" for j in range(spec.n_shared_genes)]
    genes = markers + shared
    prof = np.full((spec.n_cell_types, len(genes)), 0.15)
    for t in range(spec.n_cell_types):
        prof[t, t * spec.markers_per_type:(t + 1) * spec.markers_per_type] = 6.0
    prof[:, len(markers):] = 1.0
    prof /= prof.sum(1, keepdims=True)
    controls = [f"Blank-{j}" for j in range(spec.n_controls)]
    return genes, prof, controls


def sample_transcripts(spec: SyntheticSpec, cells: pd.DataFrame, territory: _Territory) -> pd.DataFrame:
    """Transcripts uniform within each cell (denser in the nucleus) plus background; true cell known."""
    rng = np.random.default_rng(spec.seed + 1)
    genes, prof, controls = _genes(spec)
    n = len(cells)
    reach = cells["a"].to_numpy() * 1.2 + cells["expansion_um"].to_numpy()
    dens = cells["density"].to_numpy()
    peak = dens * spec.nuclear_density_ratio
    n_cand = rng.poisson(peak * np.pi * reach**2)
    owner_of = np.repeat(np.arange(n), n_cand)
    ang = rng.uniform(0, 2 * np.pi, owner_of.size)
    rad = reach[owner_of] * np.sqrt(rng.random(owner_of.size))
    x = cells["x"].to_numpy()[owner_of] + rad * np.cos(ang)
    y = cells["y"].to_numpy()[owner_of] + rad * np.sin(ang)
    inside = (x >= 0) & (x < spec.width_um) & (y >= 0) & (y < spec.height_um)
    own = np.empty(x.size, np.int64)
    in_nuc = np.empty(x.size, bool)
    step = 500_000  # bounded memory: the neighbour query holds k floats per point
    for s0 in range(0, x.size, step):
        own[s0:s0 + step], in_nuc[s0:s0 + step] = territory.owner(x[s0:s0 + step], y[s0:s0 + step])
    # keep a candidate when its generating cell owns the point; thin the cytoplasm to its density
    keep = inside & (own == owner_of)
    keep &= in_nuc | (rng.random(owner_of.size) < 1.0 / spec.nuclear_density_ratio)
    x, y, who = x[keep], y[keep], owner_of[keep]
    types = cells["cell_type"].cat.codes.to_numpy()[who]
    cum = np.cumsum(prof, axis=1)
    u = rng.random(who.size)
    gene_idx = _vector_choice(cum, types, u)
    all_genes = genes + controls
    n_bg = int(round(spec.background_fraction / (1 - spec.background_fraction) * who.size))
    bx = rng.uniform(0, spec.width_um, n_bg)
    by = rng.uniform(0, spec.height_um, n_bg)
    # background: the overall gene mix, plus the control probes (which cells never express)
    bg_genes = rng.choice(len(genes), size=n_bg)
    is_ctrl = rng.random(n_bg) < 0.08
    bg_genes[is_ctrl] = len(genes) + rng.integers(0, len(controls), int(is_ctrl.sum()))
    cell_ids = cells["cell_id"].to_numpy()
    df = pd.DataFrame({
        "gene": np.asarray(all_genes, dtype=object)[np.r_[gene_idx, bg_genes]],
        "global_x": np.r_[x, bx].astype(np.float32),
        "global_y": np.r_[y, by].astype(np.float32),
        "global_z": np.zeros(who.size + n_bg, np.int64),
        "cell_id": np.r_[cell_ids[who], np.full(n_bg, "-1", dtype=object)],
    })
    order = rng.permutation(len(df))  # no spatial or truth order in the file
    return df.iloc[order].reset_index(drop=True)


def _vector_choice(cum: np.ndarray, types: np.ndarray, u: np.ndarray) -> np.ndarray:
    out = np.empty(types.size, dtype=np.int64)
    for t in np.unique(types):
        m = types == t
        out[m] = np.searchsorted(cum[t], u[m])
    return np.minimum(out, cum.shape[1] - 1)


def truth_polygons(spec: SyntheticSpec, cells: pd.DataFrame, territory: _Territory, step_um: float = 0.5):
    """Truth cell outlines (µm) from the territory rule on a ``step_um`` raster, one polygon per cell."""
    import geopandas as gpd
    import shapely
    from skimage import measure

    rows = []
    geoms = []
    reach = cells["a"].to_numpy() * 1.2 + cells["expansion_um"].to_numpy()
    for i, (cx, cy, rch) in enumerate(zip(cells["x"], cells["y"], reach)):
        xs = np.arange(cx - rch - step_um, cx + rch + step_um, step_um)
        ys = np.arange(cy - rch - step_um, cy + rch + step_um, step_um)
        X, Y = np.meshgrid(xs, ys)
        own, _ = territory.owner(X.ravel(), Y.ravel())
        mask = (own.reshape(X.shape) == i)
        if not mask.any():
            continue
        cont = measure.find_contours(np.pad(mask, 1).astype(float), 0.5)
        best = max(cont, key=len)
        poly = shapely.Polygon(np.column_stack([xs[0] + (best[:, 1] - 1) * step_um, ys[0] + (best[:, 0] - 1) * step_um]))
        poly = shapely.make_valid(poly)
        if poly.geom_type != "Polygon":
            poly = max(getattr(poly, "geoms", [poly]), key=lambda g: g.area if g.geom_type == "Polygon" else 0)
        rows.append(cells["cell_id"].iloc[i])
        geoms.append(shapely.MultiPolygon([poly]) if poly.geom_type == "Polygon" else poly)
    return gpd.GeoDataFrame({"EntityID": rows}, geometry=geoms)


def _tiles(spec: SyntheticSpec, territory: _Territory, H: int, W: int) -> Iterator[np.ndarray]:
    t = spec.tile_px
    k = 0
    for r0 in range(0, H, t):
        for c0 in range(0, W, t):
            tile = np.zeros((t, t), np.uint16)
            h, w = min(t, H - r0), min(t, W - c0)
            tile[:h, :w] = render_tile(spec, territory, r0, c0, h, w, spec.seed * 100003 + k)
            k += 1
            yield tile


def write_merscope_sample(folder: str | Path, spec: SyntheticSpec | None = None, *, boundaries: bool = True) -> dict:
    """Write a synthetic sample as a MERSCOPE output folder; returns a summary (cells, transcripts, px).

    ``detected_transcripts.csv`` carries the true ``cell_id`` ("-1" = background), as the vendor
    writes its own assignment; ``cell_boundaries.parquet`` (optional: slow for huge regions) the
    true outlines; ``truth_cells.csv`` every cell's parameters.
    """
    import tifffile

    spec = spec or SyntheticSpec()
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    cells = make_cells(spec)
    territory = _Territory(cells)
    tx = sample_transcripts(spec, cells, territory)
    tx.insert(0, "barcode_id", pd.Categorical(tx["gene"]).codes)
    tx.index.name = None
    tx.to_csv(folder / "detected_transcripts.csv", index=True)
    p = spec.pixel_size_um
    H, W = int(np.ceil(spec.height_um / p)), int(np.ceil(spec.width_um / p))
    A = np.array([[1 / p, 0, 0], [0, 1 / p, 0], [0, 0, 1.0]])
    np.savetxt(folder / "images" / "micron_to_mosaic_pixel_transform.csv", A, fmt="%.6f", delimiter=" ")
    tifffile.imwrite(folder / "images" / "mosaic_DAPI_z0.tif", _tiles(spec, territory, H, W), shape=(H, W),
                     dtype=np.uint16, tile=(spec.tile_px, spec.tile_px))
    if boundaries:
        gdf = truth_polygons(spec, cells, territory)
        out = pd.DataFrame({"EntityID": gdf["EntityID"], "ZIndex": 0, "ZLevel": 1.5, "Type": "cell",
                            "Geometry": gdf.geometry.to_wkb()})
        out.to_parquet(folder / "cell_boundaries.parquet", index=False)
    cells.drop(columns=[c for c in cells.columns if c.startswith("h")]).to_csv(folder / "truth_cells.csv", index=False)
    summary = {"n_cells": int(len(cells)), "n_transcripts": int(len(tx)), "image_px": [H, W],
               "background_fraction": float((tx["cell_id"] == "-1").mean()), "spec": asdict(spec)}
    (folder / "synthetic.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


__all__ = ["SyntheticSpec", "make_cells", "render_tile", "sample_transcripts", "truth_polygons", "write_merscope_sample"]
