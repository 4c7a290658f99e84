"""Validation figures for a cell-typing result: where confidence is low, whether markers agree.

Plots are evidence for a reviewer, not part of the result: :func:`write_celltyping_plots` never
raises, it logs and skips the plot that failed. Figures are drawn on ``matplotlib.figure.Figure``
with the Agg canvas directly, so no GUI backend or global pyplot state is ever touched (safe in
Dagster worker processes and threads). Large inputs are subsampled (seeded) where a plot would
otherwise draw millions of points; expression is never densified beyond the plotted genes.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spatial_assets.core import schema
from spatial_assets.core.normalization import log_normalized, log_normalized_columns

logger = logging.getLogger(__name__)

MAPPING_COLUMNS = ("label", "ontology_term_id", "ontology_label", "tier", "score")
PLOT_FILES = {
    "confidence_map": "confidence_map.png",
    "deg_heatmap": "deg_heatmap.png",
    "ontology_table": "ontology_table.png",
    "marker_validation": "marker_validation.png",
    "coverage_accuracy": "coverage_accuracy.png",
}
_MAX_STRIP_POINTS_PER_TYPE = 2_000
_MAX_SPATIAL_POINTS = 200_000
_MAX_HEATMAP_GROUPS = 60
_MAX_TABLE_ROWS = 150


class PlotInputError(ValueError):
    """The AnnData or table lacks what a plot needs."""


# ---------------------------------------------------------------- public plots


def plot_confidence_map(adata: ad.AnnData, out_path: str | Path, *, threshold: float, seed: int = 0) -> Path:
    """Spatial map coloured by confidence (Unassigned marked) + per-type confidence strips.

    Low-confidence patches that follow tissue structure point at missing reference types rather
    than noise; the strips show which types sit near the threshold.
    """
    predicted, confidence = _predicted_and_confidence(adata)
    xy = _spatial(adata)
    unassigned = _unassigned_mask(adata, confidence, threshold)
    rng = np.random.default_rng(seed)

    fig = Figure(figsize=(15, 6.5), layout="constrained")
    ax_map, ax_strip = fig.subplots(1, 2, width_ratios=[1.0, 1.25])
    idx = np.arange(adata.n_obs)
    if idx.size > _MAX_SPATIAL_POINTS:
        idx = np.sort(rng.choice(idx, _MAX_SPATIAL_POINTS, replace=False))
    size = float(np.clip(3e4 / max(idx.size, 1), 0.5, 12))
    assigned_idx = idx[~unassigned[idx]]
    unassigned_idx = idx[unassigned[idx]]
    sc = ax_map.scatter(
        xy[assigned_idx, 0], xy[assigned_idx, 1], c=confidence[assigned_idx], cmap="viridis",
        vmin=0, vmax=1, s=size, linewidths=0, rasterized=True,
    )
    ax_map.scatter(
        xy[unassigned_idx, 0], xy[unassigned_idx, 1], c="#d62728", marker="x", s=size * 1.5,
        linewidths=0.6, rasterized=True, label=f"{schema.UNASSIGNED} ({unassigned.sum():,})",
    )
    ax_map.set_aspect("equal", adjustable="datalim")
    ax_map.set_title(f"{schema.CONFIDENCE} (threshold {threshold:g})")
    ax_map.set_xlabel("x")
    ax_map.set_ylabel("y")
    ax_map.legend(loc="upper right", fontsize=8, markerscale=3, frameon=True)
    fig.colorbar(sc, ax=ax_map, shrink=0.8, label="confidence")

    types = _order_by_median(predicted, confidence)
    for i, t in enumerate(types):
        members = np.flatnonzero(predicted == t)
        if members.size > _MAX_STRIP_POINTS_PER_TYPE:
            members = rng.choice(members, _MAX_STRIP_POINTS_PER_TYPE, replace=False)
        x = i + rng.uniform(-0.35, 0.35, members.size)
        colours = np.where(unassigned[members], "#d62728", "#1f77b4")
        ax_strip.scatter(x, confidence[members], c=colours, s=4, alpha=0.5, linewidths=0, rasterized=True)
        ax_strip.hlines(np.median(confidence[predicted == t]), i - 0.4, i + 0.4, colors="black", linewidth=1.5)
    ax_strip.axhline(threshold, color="#d62728", linestyle="--", linewidth=1.2, label=f"threshold {threshold:g}")
    ax_strip.set_xticks(range(len(types)))
    ax_strip.set_xticklabels(types, rotation=60, ha="right", fontsize=8)
    ax_strip.set_xlim(-0.7, len(types) - 0.3)
    ax_strip.set_ylabel("confidence")
    ax_strip.set_title(f"confidence per {schema.PREDICTED} (bar = median)")
    ax_strip.legend(loc="lower left", fontsize=8)
    return _save(fig, out_path)


def plot_deg_heatmap(
    adata: ad.AnnData, out_path: str | Path, *, groupby: str = schema.PREDICTED, n_genes: int = 5
) -> Path:
    """Heatmap of each predicted type's top one-vs-rest genes (group mean of per-gene z-scores).

    A clean block diagonal says the predicted types differ where biology says they should.
    """
    if groupby not in adata.obs.columns:
        raise PlotInputError(f"obs column {groupby!r} (groupby) not found; obs columns: {list(adata.obs.columns)}")
    if n_genes < 1:
        raise PlotInputError(f"n_genes must be ≥ 1, got {n_genes}")
    labels = adata.obs[groupby].astype(str).to_numpy()
    groups, means, overall_mean, overall_sd, genes = _group_stats(adata, labels)
    if len(groups) < 2:
        raise PlotInputError(f"obs[{groupby!r}] has {len(groups)} group(s); a one-vs-rest heatmap needs ≥ 2")
    top = _top_markers(groups, means, labels, genes, n_genes)
    if len(groups) > _MAX_HEATMAP_GROUPS:  # keep the largest groups readable
        counts = pd.Series(labels).value_counts()
        keep = set(counts.index[:_MAX_HEATMAP_GROUPS])
        sel = [i for i, g in enumerate(groups) if g in keep]
        groups, means = [groups[i] for i in sel], means[sel]
    chosen: list[int] = []
    for g in groups:
        for j in top[g]:
            if j not in chosen:
                chosen.append(j)
    z = (means[:, chosen] - overall_mean[chosen]) / overall_sd[chosen]

    fig = Figure(figsize=(max(6, 0.28 * len(chosen) + 3), max(4, 0.35 * len(groups) + 2)), layout="constrained")
    ax = fig.subplots()
    lim = float(np.nanmax(np.abs(z))) if z.size else 1.0
    im = ax.imshow(z, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels(groups, fontsize=8)
    ax.set_xticks(range(len(chosen)))
    ax.set_xticklabels([genes[j] for j in chosen], rotation=90, fontsize=7)
    ax.set_title(f"top {n_genes} one-vs-rest genes per {groupby} (mean z-score)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="mean z-scored log expression")
    return _save(fig, out_path)


def plot_ontology_table(mapping_table: pd.DataFrame, out_path: str | Path) -> Path:
    """The label → Cell Ontology mapping as a figure, so a reviewer sees it next to the maps."""
    if not isinstance(mapping_table, pd.DataFrame):
        raise PlotInputError(f"mapping_table must be a pandas DataFrame, got {type(mapping_table).__name__}")
    missing = [c for c in MAPPING_COLUMNS if c not in mapping_table.columns]
    if missing:
        raise PlotInputError(f"mapping table lacks columns {missing}; has {list(mapping_table.columns)}")
    if mapping_table.empty:
        raise PlotInputError("mapping table is empty")
    cols = list(MAPPING_COLUMNS) + (["n_cells"] if "n_cells" in mapping_table.columns else [])
    n_rows = len(mapping_table)
    table = mapping_table[cols].head(_MAX_TABLE_ROWS).copy()
    table["score"] = [f"{v:.3f}" if isinstance(v, (int, float, np.number)) and np.isfinite(v) else str(v) for v in table["score"]]
    cells = table.astype(str).to_numpy().tolist()

    fig = Figure(figsize=(10, 0.3 * len(cells) + 1.0), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    tab = ax.table(cellText=cells, colLabels=cols, loc="center", cellLoc="left", colLoc="left")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.auto_set_column_width(list(range(len(cols))))
    tier_col = cols.index("tier")
    palette = ["#e8f4e8", "#fff5d6", "#fde0dc", "#e8eaf6", "#f3e5f5"]
    tiers = {t: palette[i % len(palette)] for i, t in enumerate(pd.unique(table["tier"].astype(str)))}
    for r, row in enumerate(cells, start=1):
        for c in range(len(cols)):
            tab[r, c].set_facecolor(tiers[row[tier_col]])
    for c in range(len(cols)):
        tab[0, c].set_facecolor("#d0d0d0")
        tab[0, c].set_text_props(weight="bold")
    shown = f"; first {_MAX_TABLE_ROWS} of {n_rows} rows" if n_rows > _MAX_TABLE_ROWS else ""
    ax.set_title(f"cell type label → Cell Ontology mapping (row colour = tier{shown})")
    return _save(fig, out_path)


def plot_marker_validation(
    adata: ad.AnnData,
    out_path: str | Path,
    *,
    markers: Mapping[str, Sequence[str]] | None,
    threshold: float | None = None,
    max_types: int = 24,
) -> Path:
    """Per predicted type: marker score (x) vs confidence (y), assigned vs Unassigned.

    Confident calls should carry the type's markers; confident cells without them (or marker-rich
    Unassigned cells) point at a reference/threshold problem. The marker score is the mean of
    log1p-normalised expression of the type's markers present in the panel (= log of their
    shifted geometric mean). Without curated ``markers`` the top 3 one-vs-rest genes of each
    predicted type are used, which is only a self-consistency check.
    """
    predicted, confidence = _predicted_and_confidence(adata)
    if threshold is None:
        threshold = _threshold_from_uns(adata)
    unassigned = _unassigned_mask(adata, confidence, threshold if threshold is not None else -np.inf)
    genes = np.asarray(adata.var_names.astype(str))
    gene_pos = {g: i for i, g in enumerate(genes)}
    if markers is None:
        groups, means, _, _, kept_genes = _group_stats(adata, predicted)
        top = _top_markers(groups, means, predicted, kept_genes, 3)
        panel = {g: [str(kept_genes[j]) for j in top[g]] for g in groups}
        source = "data-derived top-3 one-vs-rest genes"
    else:
        panel = {str(t): [m for m in ms if m in gene_pos] for t, ms in markers.items()}
        source = "curated markers"
    present_types = set(pd.unique(predicted))
    todo = [(t, ms) for t, ms in panel.items() if ms and t in present_types][:max_types]
    if not todo:
        wanted = list(markers)[:10] if markers is not None else []
        raise PlotInputError(
            f"no predicted type has markers in the panel (types in obs[{schema.PREDICTED!r}]: "
            f"{sorted(present_types)[:10]}, marker types: {wanted})"
        )
    all_idx = sorted({gene_pos[m] for _, ms in todo for m in ms})
    logx = _log_expression_columns(adata, np.asarray(all_idx))
    col = {j: k for k, j in enumerate(all_idx)}

    ncols = min(4, len(todo))
    nrows = int(np.ceil(len(todo) / ncols))
    # fixed margins: a layout engine costs seconds per figure with many panels
    fig = Figure(figsize=(4.2 * ncols, 3.6 * nrows + 0.5))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    fig.subplots_adjust(left=0.07 / ncols * 4, right=0.98, bottom=0.5 / (3.6 * nrows + 0.5) + 0.06 / nrows,
                        top=1 - 0.6 / (3.6 * nrows + 0.5), wspace=0.3, hspace=0.45)
    rng = np.random.default_rng(0)
    for ax, (t, ms) in zip(axes, todo):
        score = logx[:, [col[gene_pos[m]] for m in ms]].mean(axis=1)
        members = np.flatnonzero(predicted == t)
        shown = members if members.size <= 5_000 else np.sort(rng.choice(members, 5_000, replace=False))
        ok = shown[~unassigned[shown]]
        bad = shown[unassigned[shown]]
        ax.scatter(score[ok], confidence[ok], s=5, c="#1f77b4", alpha=0.5, linewidths=0, label="assigned", rasterized=True)
        ax.scatter(score[bad], confidence[bad], s=5, c="#d62728", alpha=0.6, linewidths=0, label=schema.UNASSIGNED, rasterized=True)
        others = np.setdiff1d(np.arange(adata.n_obs), members, assume_unique=True)
        if others.size:
            ax.axvline(float(np.median(score[others])), color="grey", linestyle=":", label="median, other types")
        if threshold is not None:
            ax.axhline(threshold, color="#d62728", linestyle="--", linewidth=1)
        rho = _spearman(score[members], confidence[members])
        ax.set_title(f"{t} (n={members.size:,}, ρ={rho:.2f})", fontsize=9)
        ax.set_xlabel(", ".join(ms[:4]) + ("…" if len(ms) > 4 else "") + " score", fontsize=8)
        ax.set_ylabel("confidence", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(labelsize=7)
    for ax in axes[len(todo):]:
        ax.axis("off")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"marker score vs confidence per predicted type ({source})")
    return _save(fig, out_path)


def plot_coverage_accuracy(adata: ad.AnnData, out_path: str | Path) -> Path:
    """Coverage–accuracy curve behind the default confidence threshold, and the query's coverage.

    Left: held-out reference cells (out-of-fold at training), Unassigned fraction vs accuracy of
    the assigned cells as the threshold rises, the model's target precision and the threshold
    used. Right: the query's Unassigned fraction per threshold beside the reference's; a query
    far above the reference curve is less confident than the reference predicted (typically a
    platform shift, for which the threshold is marked unverified).
    """
    info = adata.uns.get(schema.CELLTYPING_UNS)
    if not isinstance(info, Mapping) or "coverage_curve_reference" not in info:
        raise PlotInputError(f"uns[{schema.CELLTYPING_UNS!r}] has no coverage_curve_reference (annotate() writes it)")
    ref = info["coverage_curve_reference"]
    query = info.get("coverage_curve_query", {})
    if not len(ref.get("threshold", [])):
        raise PlotInputError("the reference coverage curve is empty")
    thr = float(info["confidence_threshold"])
    t_ref = np.asarray(ref["threshold"], dtype=float)
    u_ref = np.asarray(ref["unassigned_fraction"], dtype=float)
    a_ref = np.asarray(ref["assigned_accuracy"], dtype=float)

    fig = Figure(figsize=(12, 5), layout="constrained")
    ax_l, ax_r = fig.subplots(1, 2)
    ax_l.plot(u_ref, a_ref, "o-", color="#1f77b4", markersize=3, label="held-out reference cells")
    for t, u, a in zip(t_ref, u_ref, a_ref):
        if abs(t * 10 - round(t * 10)) < 1e-9:  # label every 0.1
            ax_l.annotate(f"{t:.1f}", (u, a), textcoords="offset points", xytext=(3, -9), fontsize=7)
    target = info.get("threshold_target_precision")
    if target is not None and np.isfinite(float(target)):
        ax_l.axhline(float(target), color="grey", linestyle=":", label=f"target precision {float(target):g}")
    coverage = info.get("threshold_expected_coverage")
    if coverage is not None and np.isfinite(float(coverage)):
        ax_l.plot([1 - float(coverage)], [float(target)], "*", color="#d62728", markersize=12,
                  label=f"model threshold {thr:.2f}: expected Unassigned {1 - float(coverage):.0%}")  # fmt: skip
    ax_l.set_xlabel("Unassigned fraction")
    ax_l.set_ylabel("accuracy of assigned cells")
    verified = "verified" if info.get("threshold_verified") else "UNVERIFIED (platform shift or caller's threshold)"
    ax_l.set_title(f"coverage vs accuracy ({info.get('regime', '?')} regime; threshold {verified})", fontsize=9)
    ax_l.legend(fontsize=8, loc="lower right")

    ax_r.plot(t_ref, u_ref, "-", color="#1f77b4", label="held-out reference cells")
    if len(query.get("threshold", [])):
        ax_r.plot(query["threshold"], query["unassigned_fraction"], "-", color="#ff7f0e", label="this query")
    ax_r.axvline(thr, color="#d62728", linestyle="--", label=f"threshold used {thr:.2f}")
    ax_r.set_xlabel("confidence threshold")
    ax_r.set_ylabel("Unassigned fraction")
    ax_r.set_ylim(0, 1)
    ax_r.set_title(f"Unassigned at the threshold: {float(info.get('unassigned_fraction', float('nan'))):.1%} of the query", fontsize=9)
    ax_r.legend(fontsize=8, loc="upper left")
    return _save(fig, out_path)


def plot_model_coverage_accuracy(card: Mapping, out_path: str | Path) -> Path:
    """A model's coverage–accuracy curves on held-out reference cells, one per regime.

    Unassigned fraction vs accuracy of the assigned cells as the confidence threshold rises
    (out-of-fold predictions of the training cross-validation), the target precision, and the
    default threshold each regime chose with its expected Unassigned fraction. What a user reads
    before annotating: how many cells the default threshold will leave Unassigned for the
    precision it promises (on the reference's own platform; unverified under a platform shift).
    """
    regimes = card.get("regimes") if isinstance(card, Mapping) else None
    if not isinstance(regimes, Mapping) or not regimes:
        raise PlotInputError("the model card has no 'regimes' (train_model writes them)")
    colors = {"same_platform": "#1f77b4", "shifted": "#ff7f0e"}
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    target = None
    drawn = 0
    for name, reg in regimes.items():
        curve = reg.get("curve", {})
        if not len(curve.get("threshold", [])) or "assigned_accuracy" not in curve:
            continue
        color = colors.get(str(name), None)
        u = np.asarray(curve["unassigned_fraction"], dtype=float)
        a = np.asarray(curve["assigned_accuracy"], dtype=float)
        ax.plot(u, a, "o-", markersize=3, color=color, label=f"{name} regime")
        thr = reg.get("threshold", {})
        if "threshold" in thr:
            target = thr.get("target_precision", target)
            cov = float(thr.get("expected_coverage", float("nan")))
            verified = "verified" if reg.get("threshold_verified") else "unverified"
            ax.plot([1 - cov], [float(thr.get("expected_precision", float("nan")))], "*", markersize=13, color=color,
                    markeredgecolor="black",
                    label=f"{name} threshold {float(thr['threshold']):.2f}: Unassigned {1 - cov:.0%} ({verified})")  # fmt: skip
        drawn += 1
    if not drawn:
        raise PlotInputError("no regime of the model card has a coverage curve")
    if target is not None:
        ax.axhline(float(target), color="grey", linestyle=":", label=f"target precision {float(target):g}")
    ax.set_xlabel("Unassigned fraction (held-out reference cells)")
    ax.set_ylabel("accuracy of assigned cells")
    ax.set_xlim(-0.02, 1.02)
    n = card.get("calibration", {}).get("n_held_out", "?")
    ax.set_title(f"coverage vs accuracy, {len(card.get('classes', []))} classes, {n} held-out cells", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, out_path)


def write_celltyping_plots(
    adata: ad.AnnData,
    out_dir: str | Path,
    *,
    confidence_threshold: float | None,
    mapping_table: pd.DataFrame | None = None,
    markers: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Path]:
    """Write every plot that can be written; a failing plot is logged and skipped, never raised.

    ``confidence_threshold=None`` falls back to ``uns['celltyping']['confidence_threshold']``.
    Returns plot name → written PNG path.
    """
    written: dict[str, Path] = {}
    try:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        threshold = confidence_threshold if confidence_threshold is not None else _threshold_from_uns(adata)
    except Exception:  # noqa: BLE001 - plots must never break the computation
        logger.warning("cell-typing plots skipped: cannot prepare %s", out_dir, exc_info=True)
        return written

    jobs: dict[str, Callable[[Path], Path]] = {
        "confidence_map": lambda p: plot_confidence_map(adata, p, threshold=_need(threshold)),
        "deg_heatmap": lambda p: plot_deg_heatmap(adata, p),
        "marker_validation": lambda p: plot_marker_validation(adata, p, markers=markers, threshold=threshold),
        "coverage_accuracy": lambda p: plot_coverage_accuracy(adata, p),
    }
    if mapping_table is not None:
        jobs["ontology_table"] = lambda p: plot_ontology_table(mapping_table, p)
    for name, job in jobs.items():
        try:
            written[name] = job(out / PLOT_FILES[name])
        except Exception:  # noqa: BLE001 - plots must never break the computation
            logger.warning("cell-typing plot %r skipped", name, exc_info=True)
    return written


# ---------------------------------------------------------------- helpers


def _need(threshold: float | None) -> float:
    if threshold is None:
        raise PlotInputError(
            f"no confidence threshold: pass confidence_threshold or set uns[{schema.CELLTYPING_UNS!r}]['confidence_threshold']"
        )
    return float(threshold)


def _threshold_from_uns(adata: ad.AnnData) -> float | None:
    info = adata.uns.get(schema.CELLTYPING_UNS)
    if isinstance(info, Mapping) and info.get("confidence_threshold") is not None:
        return float(info["confidence_threshold"])
    return None


def _predicted_and_confidence(adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
    for c in (schema.PREDICTED, schema.CONFIDENCE):
        if c not in adata.obs.columns:
            raise PlotInputError(f"obs column {c!r} not found; obs columns: {list(adata.obs.columns)}")
    if adata.n_obs == 0:
        raise PlotInputError("AnnData has no cells")
    confidence = pd.to_numeric(adata.obs[schema.CONFIDENCE], errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(confidence).all():
        raise PlotInputError(f"obs[{schema.CONFIDENCE!r}] has no numeric values")
    return adata.obs[schema.PREDICTED].astype(str).to_numpy(), confidence


def _spatial(adata: ad.AnnData) -> np.ndarray:
    if schema.SPATIAL_OBSM not in adata.obsm:
        raise PlotInputError(f"obsm[{schema.SPATIAL_OBSM!r}] not found; obsm keys: {list(adata.obsm)}")
    xy = np.asarray(adata.obsm[schema.SPATIAL_OBSM], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise PlotInputError(f"obsm[{schema.SPATIAL_OBSM!r}] must be n_obs × ≥2, got shape {xy.shape}")
    return xy[:, :2]


def _unassigned_mask(adata: ad.AnnData, confidence: np.ndarray, threshold: float) -> np.ndarray:
    """The stored call wins (it is what users see); otherwise re-derive it from the threshold."""
    if schema.CELL_TYPE in adata.obs.columns:
        return (adata.obs[schema.CELL_TYPE].astype(str) == schema.UNASSIGNED).to_numpy()
    return ~(confidence >= threshold)


def _order_by_median(predicted: np.ndarray, confidence: np.ndarray) -> list[str]:
    med = pd.Series(confidence).groupby(predicted).median().sort_values(ascending=False)
    return [str(t) for t in med.index]


def _expressed_genes(adata: ad.AnnData) -> np.ndarray:
    """Drop control probes (MERFISH Blank_*, Xenium NegControl*) from marker ranking."""
    names = adata.var_names.astype(str)
    keep = ~(names.str.lower().str.startswith(("blank", "negcontrol", "negprb", "unassigned")))
    if "is_blank" in adata.var.columns:
        keep &= ~adata.var["is_blank"].astype(bool).to_numpy()
    return np.asarray(keep)


def _log_matrix(adata: ad.AnnData):
    """log1p of 10k-normalised expression (core.normalization decides from what), sparse-preserving.

    ``unsafe_force``: a plot is evidence, never a result, so a scale that annotation would refuse
    is drawn as best it can be (and the forcing is logged) instead of losing the figure.
    """
    if adata.X is None:
        raise PlotInputError("adata.X is empty")
    X, _ = log_normalized(adata, unsafe_force=True)
    return X


def _log_expression_columns(adata: ad.AnnData, idx: np.ndarray) -> np.ndarray:
    """Only the requested genes densified; normalisation uses full-row totals."""
    if adata.X is None:
        raise PlotInputError("adata.X is empty")
    return log_normalized_columns(adata, idx, unsafe_force=True)


def _group_stats(adata: ad.AnnData, labels: np.ndarray):
    """Per-group means, overall mean and sd of log expression via a sparse indicator product."""
    keep = _expressed_genes(adata)
    if not keep.any():
        raise PlotInputError("no genes left after dropping control probes")
    L = _log_matrix(adata)
    L = L[:, np.flatnonzero(keep)]
    genes = np.asarray(adata.var_names.astype(str))[keep]
    cats = pd.Categorical(labels)
    groups = [str(g) for g in cats.categories]
    codes = cats.codes
    n = labels.size
    indicator = sp.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(len(groups), n))
    sizes = np.asarray(indicator.sum(axis=1)).ravel()
    sums = indicator @ L  # groups × genes: small, dense is fine
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    means = sums / sizes[:, None]
    overall_mean = np.asarray(L.mean(axis=0)).ravel()
    sq = L.multiply(L) if sp.issparse(L) else L * L
    overall_sd = np.sqrt(np.maximum(np.asarray(sq.mean(axis=0)).ravel() - overall_mean**2, 0.0))
    overall_sd[overall_sd == 0] = 1.0
    return groups, means, overall_mean, overall_sd, genes


def _top_markers(
    groups: list[str], means: np.ndarray, labels: np.ndarray, genes: np.ndarray, n_genes: int
) -> dict[str, list[int]]:
    """One-vs-rest: rank genes by group mean minus the mean of all other cells (log scale)."""
    sizes = pd.Series(labels).value_counts().reindex(groups).fillna(0).to_numpy(dtype=np.float64)
    totals = means * sizes[:, None]
    all_sum = totals.sum(axis=0)
    top: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        rest = sizes.sum() - sizes[i]
        rest_mean = (all_sum - totals[i]) / rest if rest > 0 else np.zeros_like(all_sum)
        diff = means[i] - rest_mean
        order = np.lexsort((genes, -diff))  # ties broken by gene name: deterministic
        top[g] = [int(j) for j in order[:n_genes]]
    return top


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    rx = pd.Series(x[ok]).rank().to_numpy()
    ry = pd.Series(y[ok]).rank().to_numpy()
    return float(np.corrcoef(rx, ry)[0, 1])


def _save(fig: Figure, out_path: str | Path) -> Path:
    """Render with Agg to a temp file in the target folder, then rename: no half-written PNGs."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".png", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
