"""Figures for tissue domains: domain maps, composition bars, elbow plots, islands.

Best-effort by design: nothing in the computation depends on a figure, and callers wrap these
calls. Figures are drawn on a private ``Figure`` + Agg canvas (never pyplot), so no global
backend state is touched and no display is needed; each PNG is written to a temporary file and
renamed, so a failed plot never leaves a half-written file. Every function returns the path.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from spatial_assets.core.schema import DOMAIN, SPATIAL_OBSM

_LEVEL_RE = re.compile(r"^domain_level_(\d+)$")
_MAX_PANELS = 48  # beyond this a grid is unreadable; extra panels are left out


def _save(fig: Figure, out_path: str | Path, dpi: int = 110) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _palette(labels: Sequence[str]) -> dict[str, str]:
    """Stable colours: same label -> same colour in every panel of a figure."""
    from matplotlib import colormaps

    base = colormaps["tab20"].colors if len(labels) <= 20 else colormaps["gist_ncar"](
        np.linspace(0.05, 0.95, len(labels)))
    return {lab: to_hex(base[i % len(base)]) for i, lab in enumerate(labels)}


def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


def _coords(adata: AnnData) -> np.ndarray:
    if SPATIAL_OBSM not in adata.obsm:
        raise ValueError(f"obsm[{SPATIAL_OBSM!r}] (cell coordinates) is missing; cannot plot tissue")
    xy = np.asarray(adata.obsm[SPATIAL_OBSM])[:, :2].astype(np.float64)
    return xy


def _samples(adata: AnnData, sample_key: str | None) -> list[tuple[str, np.ndarray]]:
    if sample_key is None:
        return [("all cells", np.ones(adata.n_obs, dtype=bool))]
    if sample_key not in adata.obs:
        raise ValueError(f"sample column {sample_key!r} not in obs: {list(adata.obs.columns)}")
    col = adata.obs[sample_key].astype(str).to_numpy()
    return [(s, col == s) for s in sorted(set(col), key=_natural_key)]


def _panel_height(xy: np.ndarray, width: float) -> float:
    """Panel height following the tissue's aspect ratio, so equal-aspect maps fill the panel."""
    span = np.nanmax(xy, axis=0) - np.nanmin(xy, axis=0) if len(xy) else np.ones(2)
    ratio = float(span[1] / span[0]) if span[0] > 0 else 1.0
    return float(np.clip(width * ratio, 1.5, 2.0 * width)) + 0.5


def _marker_size(n: int) -> float:
    return float(np.clip(4000.0 / max(n, 1), 0.3, 12.0))


def default_level_keys(adata: AnnData) -> list[str]:
    """``domain_level_{k}`` columns by increasing k, else ``domain``."""
    levels = sorted((int(m.group(1)), c) for c in adata.obs.columns if (m := _LEVEL_RE.match(c)))
    if levels:
        return [c for _, c in levels]
    if DOMAIN in adata.obs:
        return [DOMAIN]
    raise ValueError("no obs 'domain' or 'domain_level_{k}' column to plot")


def plot_domains(
    adata: AnnData,
    out_path: str | Path,
    *,
    level_keys: Sequence[str] | None = None,
    sample_key: str | None = None,
) -> Path:
    """Domains on tissue coordinates: one row per sample, one column per level."""
    keys = list(level_keys) if level_keys is not None else default_level_keys(adata)
    missing = [k for k in keys if k not in adata.obs]
    if missing:
        raise ValueError(f"domain columns {missing} not in obs")
    xy = _coords(adata)
    samples = _samples(adata, sample_key)[: max(1, _MAX_PANELS // max(len(keys), 1))]
    nrow, ncol = len(samples), len(keys)
    fig = Figure(figsize=(3.6 * ncol + 1.6, _panel_height(xy, 3.6) * nrow), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrow, ncol, squeeze=False))
    for j, key in enumerate(keys):
        vals = adata.obs[key].astype(str).to_numpy()
        labels = sorted(set(vals), key=_natural_key)
        colors = _palette(labels)
        for i, (name, mask) in enumerate(samples):
            ax = axes[i, j]
            ax.scatter(xy[mask, 0], xy[mask, 1], c=[colors[v] for v in vals[mask]],
                       s=_marker_size(int(mask.sum())), linewidths=0, rasterized=True)
            ax.set_aspect("equal")
            ax.invert_yaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} - {key}" if nrow > 1 else key, fontsize=9)
        if len(labels) <= 30:
            axes[-1, j].legend(handles=[Patch(color=colors[lab], label=lab) for lab in labels],
                               fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                               frameon=False, ncol=1 + len(labels) // 16)
    return _save(fig, out_path)


def plot_domain_proportions(composition_df: pd.DataFrame, out_path: str | Path) -> Path:
    """Stacked bars of cell-type fractions per domain, one panel per sample."""
    needed = {"domain", "cell_type", "n_cells"}
    if not needed <= set(composition_df.columns):
        raise ValueError(f"composition table lacks {sorted(needed - set(composition_df.columns))}")
    df = composition_df.copy()
    if "sample_id" not in df:
        df["sample_id"] = "all"
    samples = sorted(df["sample_id"].astype(str).unique(), key=_natural_key)[:_MAX_PANELS]
    types = (df.groupby("cell_type")["n_cells"].sum().sort_values(ascending=False).index
             .astype(str).tolist())
    colors = _palette(types)
    ncol = min(len(samples), 3)
    nrow = math.ceil(len(samples) / ncol)
    fig = Figure(figsize=(4.5 * ncol + 2.5, 3.6 * nrow), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel())
    for ax, sample in zip(axes, samples):
        sub = df[df["sample_id"].astype(str) == sample]
        table = sub.pivot_table(index="domain", columns="cell_type", values="n_cells",
                                aggfunc="sum", fill_value=0)
        table = table.loc[sorted(table.index, key=_natural_key)]
        frac = table.div(table.sum(axis=1), axis=0)
        bottom = np.zeros(len(frac))
        for t in types:
            if t in frac.columns:
                ax.bar(range(len(frac)), frac[t].to_numpy(), bottom=bottom, color=colors[t],
                       width=0.85)
                bottom += frac[t].to_numpy()
        ax.set_xticks(range(len(frac)), [str(d) for d in frac.index], rotation=60, fontsize=7,
                      ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("fraction of cells")
        ax.set_title(str(sample), fontsize=9)
    for ax in axes[len(samples):]:
        ax.set_visible(False)
    fig.legend(handles=[Patch(color=colors[t], label=t) for t in types[:40]], fontsize=6,
               loc="outside right upper", frameon=False)
    return _save(fig, out_path)


def plot_elbows(assignment_df: pd.DataFrame, out_path: str | Path) -> Path:
    """Sorted signature statistics per domain, the assigned types highlighted, the gap marked."""
    needed = {"domain", "scores", "n_types", "assigned_cell_types"}
    if not needed <= set(assignment_df.columns):
        raise ValueError(f"assignment table lacks {sorted(needed - set(assignment_df.columns))}")
    rows = list(assignment_df.itertuples(index=False))[:_MAX_PANELS]
    ncol = min(len(rows), 4)
    nrow = math.ceil(len(rows) / ncol)
    fig = Figure(figsize=(3.6 * ncol, 3.0 * nrow), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel())
    for ax, row in zip(axes, rows):
        s = np.asarray(row.scores, dtype=np.float64)
        k = int(row.n_types)
        pos = np.arange(1, len(s) + 1)
        ax.plot(pos, s, "-", color="0.6", lw=1)
        ax.scatter(pos[k:], s[k:], color="0.5", s=14, zorder=3)
        ax.scatter(pos[:k], s[:k], color="tab:red", s=22, zorder=4)
        if 0 < k < len(s):
            ax.axvline(k + 0.5, color="tab:red", ls="--", lw=1)
            ax.annotate("", xy=(k + 0.5, s[k]), xytext=(k + 0.5, s[k - 1]),
                        arrowprops={"arrowstyle": "<->", "color": "tab:red"})
        ax.axhline(0, color="0.8", lw=0.8)
        names = getattr(row, "cell_types", None)
        if names is not None and len(names) == len(s):
            shown = min(len(s), 6)
            ax.set_xticks(pos[:shown], [str(n)[:18] for n in list(names)[:shown]], rotation=60,
                          fontsize=6, ha="right")
        ax.set_title(f"{row.domain}: {row.assigned_cell_types}", fontsize=8)
        ax.set_ylabel("enrichment z", fontsize=7)
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    return _save(fig, out_path)


def plot_islands(
    adata: AnnData,
    out_path: str | Path,
    *,
    island_key: str = "is_island",
    sample_key: str | None = None,
) -> Path:
    """Cells flagged as islands (small disconnected patches) over the tissue, per sample."""
    if island_key not in adata.obs:
        raise ValueError(f"obs column {island_key!r} not found; available: {list(adata.obs.columns)}")
    flag = adata.obs[island_key].fillna(False).astype(bool).to_numpy()
    xy = _coords(adata)
    samples = _samples(adata, sample_key)[:_MAX_PANELS]
    ncol = min(len(samples), 3)
    nrow = math.ceil(len(samples) / ncol)
    fig = Figure(figsize=(4.2 * ncol, _panel_height(xy, 4.2) * nrow), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel())
    for ax, (name, mask) in zip(axes, samples):
        size = _marker_size(int(mask.sum()))
        bg = mask & ~flag
        fg = mask & flag
        ax.scatter(xy[bg, 0], xy[bg, 1], c="0.85", s=size, linewidths=0, rasterized=True)
        ax.scatter(xy[fg, 0], xy[fg, 1], c="tab:red", s=size * 2.5, linewidths=0,
                   rasterized=True)
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name}: {int(fg.sum())} island cells of {int(mask.sum())}", fontsize=9)
    for ax in axes[len(samples):]:
        ax.set_visible(False)
    return _save(fig, out_path)
