"""Cell QC after segmentation: per-cell metrics, configurable filters, a report and the invariants a
platform check asserts.

Per cell (``obs``): ``total_counts`` (panel genes), ``n_genes_by_counts``, ``control_counts`` and
``control_fraction`` (Blank-*, NegPrb*, NegControlProbe_*, NegControlCodeword_*,
UnassignedCodeword_*, SystemControl*), ``mt_fraction`` where the panel has mitochondrial genes
(``mt-``/``MT-``), ``area_um2``, ``is_island`` (cells in small detached patches, by the domain
package's scale-free radius graph: ``platform.domains.mark_islands``), and one ``qc_fail_<rule>``
flag per filter plus ``qc_pass``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from spatial_assets.segmentation.aggregation import is_control
from spatial_assets.segmentation.errors import SegmentationInputError

QC_UNS = "cell_qc"


@dataclass(frozen=True)
class QCFilters:
    min_counts: int = 10
    min_genes: int = 3
    max_control_fraction: float = 0.10
    min_area_um2: float | None = 10.0
    max_area_um2: float | None = 2000.0
    max_mt_fraction: float | None = None
    island_min_size: int = 5
    exclude_islands: bool = False


@dataclass(frozen=True)
class QCLimits:
    """Above these the platform check WARNs (it never fails on them)."""

    max_control_fraction: float = 0.05
    min_assigned_fraction: float = 0.30


def _counts(adata: Any, mask: np.ndarray) -> np.ndarray:
    import scipy.sparse as sp

    if not mask.any():
        return np.zeros(adata.n_obs)
    X = adata.X[:, np.flatnonzero(mask)]
    return np.asarray(X.sum(1)).ravel().astype(float) if sp.issparse(X) else np.asarray(X).sum(1).astype(float)


def qc_metrics(adata: Any) -> pd.DataFrame:
    """Per-cell QC metrics (does not modify ``adata``)."""
    import scipy.sparse as sp

    names = adata.var_names
    control = adata.var["is_control"].to_numpy(bool) if "is_control" in adata.var else is_control(names)
    mt = np.asarray([str(g).lower().startswith("mt-") for g in names], dtype=bool)
    panel = ~control
    X = adata.X
    total = _counts(adata, panel)
    ctrl = _counts(adata, control)
    Xp = X[:, np.flatnonzero(panel)]
    n_genes = np.asarray((Xp > 0).sum(1)).ravel() if sp.issparse(Xp) else (np.asarray(Xp) > 0).sum(1)
    all_counts = total + ctrl
    df = pd.DataFrame(index=adata.obs_names.copy())
    df["total_counts"] = total
    df["n_genes_by_counts"] = n_genes.astype(np.int64)
    df["control_counts"] = ctrl
    df["control_fraction"] = np.divide(ctrl, all_counts, out=np.zeros_like(ctrl), where=all_counts > 0)
    df["mt_fraction"] = (np.divide(_counts(adata, mt), total, out=np.zeros_like(total), where=total > 0)
                         if mt.any() else np.nan)
    if "area_um2" in adata.obs:
        df["area_um2"] = adata.obs["area_um2"].to_numpy(float)
    return df


def cell_qc(adata: Any, filters: QCFilters | None = None, *, filter_cells: bool = True) -> tuple[Any, dict]:
    """(cells with QC columns — only the passing ones when ``filter_cells`` —, report dict).

    Never modifies ``adata``. A cell missing an area (``NaN``) is not failed by the area rules.
    """
    from spatial_assets.platform.domains import mark_islands

    f = filters or QCFilters()
    if adata.n_obs == 0:
        raise SegmentationInputError("cell_qc: the segmentation has no cells")
    out = adata.copy()
    m = qc_metrics(out)
    for c in m.columns:
        out.obs[c] = m[c].to_numpy()
    if out.n_obs >= 2 and "spatial" in out.obsm:
        out.obs["is_island"] = mark_islands(out, min_size=f.island_min_size).obs["is_island"].to_numpy(bool)
    else:
        out.obs["is_island"] = False
    area = out.obs["area_um2"].to_numpy(float) if "area_um2" in out.obs else np.full(out.n_obs, np.nan)
    rules = {
        "min_counts": out.obs["total_counts"].to_numpy() < f.min_counts,
        "min_genes": out.obs["n_genes_by_counts"].to_numpy() < f.min_genes,
        "max_control_fraction": out.obs["control_fraction"].to_numpy() > f.max_control_fraction,
        "min_area": (area < f.min_area_um2) if f.min_area_um2 is not None else np.zeros(out.n_obs, bool),
        "max_area": (area > f.max_area_um2) if f.max_area_um2 is not None else np.zeros(out.n_obs, bool),
        "max_mt_fraction": (np.nan_to_num(out.obs["mt_fraction"].to_numpy(float)) > f.max_mt_fraction)
        if f.max_mt_fraction is not None else np.zeros(out.n_obs, bool),
        "island": out.obs["is_island"].to_numpy(bool) if f.exclude_islands else np.zeros(out.n_obs, bool),
    }
    fail = np.zeros(out.n_obs, bool)
    for name, flag in rules.items():
        out.obs[f"qc_fail_{name}"] = flag
        fail |= flag
    out.obs["qc_pass"] = ~fail
    seg = dict(adata.uns.get("segmentation", {}))
    total_all = float(out.obs["total_counts"].sum() + out.obs["control_counts"].sum())
    report = {
        "n_cells_in": int(out.n_obs),
        "n_cells_out": int((~fail).sum()),
        "failed_by": {k: int(v.sum()) for k, v in rules.items()},
        "median_counts": float(np.median(out.obs["total_counts"])),
        "median_genes": float(np.median(out.obs["n_genes_by_counts"])),
        "median_area_um2": float(np.nanmedian(area)) if np.isfinite(area).any() else None,
        "control_fraction": float(out.obs["control_counts"].sum() / total_all) if total_all else 0.0,
        "mt_genes": int(np.sum([str(g).lower().startswith("mt-") for g in out.var_names])),
        "mt_fraction_median": float(np.nanmedian(out.obs["mt_fraction"])) if out.obs["mt_fraction"].notna().any() else None,
        "n_islands": int(out.obs["is_island"].sum()),
        "assigned_fraction": seg.get("assigned_fraction"),
        "filters": asdict(f),
    }
    if filter_cells:
        out = out[~fail].copy()
    out.uns[QC_UNS] = _plain(report)
    return out, report


def _plain(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items() if v is not None}
    return d


def qc_invariants(adata: Any, report: dict, limits: QCLimits | None = None) -> list[dict]:
    """Checks for the platform: ``[{"name", "passed", "severity": "ERROR"|"WARN", "message", "value"}]``.

    ERROR: an empty cell after filtering, or no cell left. WARN: control fraction above
    ``limits.max_control_fraction``, assigned-transcript fraction below ``limits.min_assigned_fraction``.
    """
    lim = limits or QCLimits()
    tot = adata.obs["total_counts"].to_numpy() if "total_counts" in adata.obs else np.asarray(adata.X.sum(1)).ravel()
    empty = int((tot <= 0).sum())
    out = [
        {"name": "cells_left", "passed": adata.n_obs > 0, "severity": "ERROR", "value": int(adata.n_obs),
         "message": f"{adata.n_obs} cells after filtering"},
        {"name": "no_empty_cells", "passed": empty == 0, "severity": "ERROR", "value": empty,
         "message": f"{empty} cells without panel transcripts after filtering"},
    ]
    cf = float(report.get("control_fraction", 0.0))
    out.append({"name": "control_fraction", "passed": cf <= lim.max_control_fraction, "severity": "WARN", "value": cf,
                "message": f"control-probe fraction {cf:.2%} (limit {lim.max_control_fraction:.0%})"})
    af = report.get("assigned_fraction")
    if af is not None:
        out.append({"name": "assigned_fraction", "passed": float(af) >= lim.min_assigned_fraction, "severity": "WARN",
                    "value": float(af), "message": f"{float(af):.1%} of transcripts assigned to cells (limit {lim.min_assigned_fraction:.0%})"})
    return out


__all__ = ["QCFilters", "QCLimits", "QC_UNS", "cell_qc", "qc_invariants", "qc_metrics"]
