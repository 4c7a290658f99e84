"""Figures of a deconvolution: the dominant type on the tissue and proportion maps of the top types.

Drawn on ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot state, safe in worker threads);
written to a temporary file beside the target and renamed, so a failed plot never leaves a partial
PNG. More than ``max_points`` spots are subsampled with a seed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spatial_assets.core.spatial import spatial_coordinates
from spatial_assets.deconvolution.deconvolve import DOMINANT, PROPORTIONS_KEY
from spatial_assets.deconvolution.reference import DeconvolutionInputError

PLOT_FILES = {"dominant_type": "dominant_cell_type.png", "proportion_maps": "cell_type_proportions.png"}
_MAX_POINTS = 200_000


def _save(fig: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".png", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _marker_size(xy: np.ndarray, ax_inches: float, n: int) -> float:
    """Marker area (pt²) so neighbouring spots about touch, whatever the units of the coordinates."""
    per_side = max(np.sqrt(n), 1.0)
    return float(np.clip((ax_inches * 72.0 / per_side) ** 2, 0.05, 80.0))


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def deconvolution_plots(
    adata: AnnData,
    out_dir: str | os.PathLike,
    *,
    key: str = PROPORTIONS_KEY,
    n_top: int = 6,
    max_points: int = _MAX_POINTS,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``dominant_cell_type.png`` and ``cell_type_proportions.png`` (top ``n_top`` types by mean share).

    Returns ``{name: path}``. Needs :func:`deconvolve`'s output (``obsm[key]``, ``obs['dominant_cell_type']``)
    and ``obsm['spatial']``.
    """
    if key not in adata.obsm or DOMINANT not in adata.obs.columns:
        raise DeconvolutionInputError(f"adata has no obsm[{key!r}] / obs[{DOMINANT!r}]; run deconvolve first")
    xy = spatial_coordinates(adata, "deconvolved spots")
    props = adata.obsm[key]
    props = props if isinstance(props, pd.DataFrame) else pd.DataFrame(np.asarray(props))
    idx = _subsample(adata.n_obs, int(max_points), seed)
    pts = xy[idx]
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}

    dom = adata.obs[DOMINANT].astype("category")
    cats = list(dom.cat.categories)
    codes = dom.cat.codes.to_numpy()[idx]
    fig = Figure(figsize=(8.5, 7))
    ax = fig.add_subplot(111)
    size = _marker_size(pts, 7.0, len(idx))
    cmap = _palette(len(cats))
    for c, name in enumerate(cats):
        m = codes == c
        if m.any():
            ax.scatter(pts[m, 0], pts[m, 1], s=size, color=cmap[c], marker="s", linewidths=0, label=f"{name} ({int(m.sum())})")
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_title(f"dominant cell type per spot ({adata.n_obs} spots)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=max(1.0, 20.0 / max(size, 1e-3)) ** 0.5, frameon=False)
    fig.tight_layout()
    written["dominant_type"] = _save(fig, out_dir / PLOT_FILES["dominant_type"])

    top = props.mean(axis=0).sort_values(ascending=False, kind="stable").index[: max(1, int(n_top))]
    ncol = min(3, len(top))
    nrow = int(np.ceil(len(top) / ncol))
    fig = Figure(figsize=(4.2 * ncol, 3.8 * nrow))
    size = _marker_size(pts, 3.2, len(idx))
    for i, name in enumerate(top):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        v = props[name].to_numpy(dtype=np.float64)[idx]
        sc = ax.scatter(pts[:, 0], pts[:, 1], c=v, s=size, cmap="viridis", vmin=0.0, vmax=max(float(v.max()), 1e-6), marker="s", linewidths=0)
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name} (mean {float(props[name].mean()):.2f})", fontsize=9)
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle("cell-type proportions, top types")
    fig.tight_layout()
    written["proportion_maps"] = _save(fig, out_dir / PLOT_FILES["proportion_maps"])
    return written


def _palette(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    base = colormaps["tab20"].colors if n > 10 else colormaps["tab10"].colors
    return [(*base[i % len(base)], 1.0) for i in range(n)]
