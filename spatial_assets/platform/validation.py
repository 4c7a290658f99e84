"""Invariants behind the platform's asset checks (no Dagster, so they are unit-testable)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from spatial_assets.core import schema


@dataclass
class CheckReport:
    passed: bool
    summary: str
    metadata: dict[str, Any] = field(default_factory=dict)


def check_balanced_set(adata: ad.AnnData, *, tolerance: float = 0.02) -> CheckReport:
    """Recount the balanced set from ``obs`` and compare with what Cap & Fill promised.

    * each class ≤ the cap (classes with a target proportion are bounded by availability instead),
    * each source's share within ``tolerance`` (of the class size, at least one cell) of the
      allocation the strategy gives for the recorded availability,
    * target proportions within ``tolerance`` of the final size (or the class exhausted).
    """
    from spatial_assets.celltyping.balancing import allocate_source_targets

    bal = adata.uns.get("balancing")
    if not bal:
        return CheckReport(False, "uns['balancing'] missing: not produced by cap_and_fill")
    label_col = bal["label_column"]
    source_col = bal["source_column"] or None
    counts = pd.DataFrame({k: np.asarray(v) for k, v in bal["counts"].items()})
    classes = pd.DataFrame({k: np.asarray(v) for k, v in bal["classes"].items()}).set_index("cell_type")
    obs = adata.obs
    actual = obs.groupby([obs[label_col].astype(str), obs[source_col].astype(str)] if source_col else [obs[label_col].astype(str)], observed=True).size()
    cap = int(bal["max_cells_per_type"])
    problems: list[str] = []
    worst_share = 0.0
    n_total = adata.n_obs
    for cls, group in counts.groupby("cell_type"):
        n_cls = int(obs[label_col].astype(str).eq(cls).sum())
        has_prop = "proportion" in classes.columns and np.isfinite(classes.loc[cls, "proportion"])
        if not has_prop and n_cls > cap:
            problems.append(f"{cls}: {n_cls} cells > cap {cap}")
        available = {str(s): int(a) for s, a in zip(group["reference_source"], group["available"])}
        expected = allocate_source_targets(available, n_cls, strategy=bal["strategy"], min_per_source=int(bal["min_per_source"]))
        for src, exp in expected.items():
            got = int(actual.get((cls, src), 0)) if source_col else n_cls
            allowed = max(1.0, tolerance * n_cls)
            worst_share = max(worst_share, abs(got - exp) / max(n_cls, 1))
            if abs(got - exp) > allowed:
                problems.append(f"{cls}/{src}: {got} cells, strategy gives {exp}")
        if has_prop:
            p = float(classes.loc[cls, "proportion"])
            avail_cls = int(group["available"].sum())
            requested = int(bal["output_size_requested"])
            size = requested if requested >= 0 else n_total
            if abs(n_cls / max(size, 1) - p) > tolerance and n_cls < avail_cls:
                problems.append(f"{cls}: share {n_cls / max(size, 1):.3f} vs target {p:.3f}")
    metadata = {
        "n_cells": int(n_total),
        "n_classes": int(counts["cell_type"].nunique()),
        "cap": cap,
        "strategy": str(bal["strategy"]),
        "max_source_share_deviation": float(worst_share),
        "problems": "; ".join(problems[:20]),
    }
    return CheckReport(not problems, "balanced as requested" if not problems else f"{len(problems)} problem(s)", metadata)


def check_confidence_invariants(adata: ad.AnnData) -> CheckReport:
    obs = adata.obs
    conf = obs[schema.CONFIDENCE].to_numpy(dtype=float)
    threshold = float(adata.uns[schema.CELLTYPING_UNS]["confidence_threshold"])
    problems = []
    n_nan = int(np.isnan(conf).sum())
    if n_nan:
        problems.append(f"{n_nan} NaN confidences")
    out_of_range = int(((conf < 0) | (conf > 1)).sum())
    if out_of_range:
        problems.append(f"{out_of_range} confidences outside [0, 1]")
    unassigned = obs[schema.CELL_TYPE].astype(str).eq(schema.UNASSIGNED).to_numpy()
    below = conf < threshold
    mismatch = int((unassigned != below).sum())
    if mismatch:
        problems.append(f"{mismatch} cells where Unassigned ≠ (confidence < {threshold})")
    ids = obs[schema.CELL_TYPE_ONTOLOGY_ID].astype(str)
    bad_ids = ids[~(ids.str.startswith("CL:") | ids.eq(schema.UNASSIGNED_ONTOLOGY_ID))]
    if len(bad_ids):
        problems.append(f"{len(bad_ids)} ontology ids neither CL: nor '{schema.UNASSIGNED_ONTOLOGY_ID}', e.g. {bad_ids.unique()[:3].tolist()}")
    if (ids[unassigned] != schema.UNASSIGNED_ONTOLOGY_ID).any():
        problems.append("Unassigned cells carry a CL id")
    metadata = {
        "n_cells": int(adata.n_obs),
        "confidence_min": float(np.nanmin(conf)) if conf.size else 0.0,
        "confidence_max": float(np.nanmax(conf)) if conf.size else 0.0,
        "threshold": threshold,
        "unassigned_fraction": float(unassigned.mean()) if conf.size else 0.0,
        "problems": "; ".join(problems),
    }
    return CheckReport(not problems, "invariants hold" if not problems else "; ".join(problems), metadata)


def check_domains(adata: ad.AnnData) -> CheckReport:
    """Domains complete, levels with exactly k ids, ids carrying their own level's prefix only."""
    import re

    problems = []
    level_cols = sorted((c for c in adata.obs.columns if re.fullmatch(r"domain_level_\d+", c)), key=lambda c: int(c.rsplit("_", 1)[1]))
    if "domain" not in adata.obs or not level_cols:
        return CheckReport(False, "obs['domain'] or obs['domain_level_*'] missing")
    island = adata.obs["is_island"].astype(bool).to_numpy() if "is_island" in adata.obs else np.zeros(adata.n_obs, bool)
    missing = adata.obs["domain"].isna().to_numpy() & ~island
    if missing.any():
        problems.append(f"{int(missing.sum())} cells without a domain and not flagged as islands")
    per_level = {}
    for col in level_cols:
        k = int(col.rsplit("_", 1)[1])
        values = adata.obs[col]
        cats = list(values.cat.categories) if hasattr(values, "cat") else sorted(values.dropna().unique())
        observed = values.dropna().astype(str).unique()
        per_level[col] = len(observed)
        if len(cats) != k:
            problems.append(f"{col}: {len(cats)} domain ids defined, expected {k}")
        leaked = [v for v in observed if not str(v).startswith(f"L{k}_")]
        if leaked:
            problems.append(f"{col}: ids from another level {leaked[:3]}")
    metadata = {"n_cells": int(adata.n_obs), "levels": ", ".join(level_cols), "problems": "; ".join(problems),
                **{f"observed_{c}": v for c, v in per_level.items()}}
    return CheckReport(not problems, "domains consistent" if not problems else "; ".join(problems), metadata)
