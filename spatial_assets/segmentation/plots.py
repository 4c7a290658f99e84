"""QC histograms and a segmentation overlay (a crop of the image with the cell outlines), as PNG bytes.

PNG bytes rather than files so the platform can attach them to a materialization or store them
wherever it stores outputs; ``path=`` writes them too.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np


def _fig_bytes(fig: Any, path: str | Path | None) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def qc_plots(adata: Any, report: dict | None = None, *, path: str | Path | None = None) -> bytes:
    """Histograms of counts, genes, area and control fraction per cell, with the filter thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spatial_assets.segmentation.qc import qc_metrics

    m = qc_metrics(adata)
    filt = (report or {}).get("filters", {})
    panels = [("total_counts", "transcripts per cell", filt.get("min_counts")),
              ("n_genes_by_counts", "genes per cell", filt.get("min_genes")),
              ("area_um2", "cell area (µm²)", filt.get("min_area_um2")),
              ("control_fraction", "control-probe fraction", filt.get("max_control_fraction"))]
    fig, axs = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (col, label, thr) in zip(axs, panels):
        v = m[col].to_numpy(float) if col in m else np.array([])
        v = v[np.isfinite(v)]
        if v.size:
            ax.hist(v, bins=50, color="#4477aa")
        if thr is not None:
            ax.axvline(thr, color="#cc3311", ls="--", lw=1)
        ax.set_xlabel(label)
        ax.set_ylabel("cells")
    fig.suptitle(f"{adata.n_obs} cells")
    return _fig_bytes(fig, path)


def segmentation_overlay(sample: Any, boundaries: Any, *, center_um: tuple[float, float] | None = None,
                         size_um: float = 150.0, path: str | Path | None = None) -> bytes:
    """A ``size_um`` crop of the nuclear channel with the cell outlines (µm GeoDataFrame) drawn on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = sample.require_image("the segmentation overlay")
    x0, y0, x1, y1 = image.extent_um()
    cx, cy = center_um if center_um is not None else ((x0 + x1) / 2, (y0 + y1) / 2)
    half = size_um / 2
    corners_x = np.array([cx - half, cx + half, cx - half, cx + half])
    corners_y = np.array([cy - half, cy - half, cy + half, cy + half])
    col, row = image.to_pixels(corners_x, corners_y)
    h, w = image.shape
    c0, c1 = int(max(col.min(), 0)), int(min(col.max(), w))
    r0, r1 = int(max(row.min(), 0)), int(min(row.max(), h))
    crop = image.read(image.nuclear_channel, slice(r0, r1), slice(c0, c1)).astype(float)
    fig, ax = plt.subplots(figsize=(7, 7))
    vmax = np.percentile(crop, 99.5) if crop.size else 1
    ax.imshow(crop, cmap="gray", vmax=vmax, extent=(c0, c1, r1, r0))
    from shapely.geometry import box

    win = box(cx - half, cy - half, cx + half, cy + half)
    sel = boundaries[boundaries.intersects(win)] if len(boundaries) else boundaries
    for g in sel.geometry:
        for poly in getattr(g, "geoms", [g]):
            if poly.geom_type != "Polygon":
                continue
            xy = np.asarray(poly.exterior.coords)
            pc, pr = image.to_pixels(xy[:, 0], xy[:, 1])
            ax.plot(pc, pr, "-", color="#ee7733", lw=0.8)
    ax.set_xlim(c0, c1)
    ax.set_ylim(r1, r0)
    ax.set_title(f"{len(sel)} cells in a {size_um:.0f} µm crop")
    ax.axis("off")
    return _fig_bytes(fig, path)


__all__ = ["qc_plots", "segmentation_overlay"]
