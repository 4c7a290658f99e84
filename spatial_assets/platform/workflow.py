"""The platform's cell-typing stages over stored objects (no Dagster).

Each Dagster asset calls one function here; the functions add what the platform needs on top of
the science modules: hash verification of the bytes that were registered, the panel of the
registered samples, and the provenance chain written into every annotations object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Protocol

import anndata as ad
import numpy as np
import pandas as pd

from spatial_assets.core import schema
from spatial_assets.core.lineage import content_hash, library_versions
from spatial_assets.platform.manifest import ReferenceEntry, merged_target_proportions
from spatial_assets.storage.objectstore import S3Settings, fetch_to_cache, sha256_file
from spatial_assets.platform.registry import scan_landing
from spatial_assets.core.spatial import panel_genes


class Settings(Protocol):
    panel_genes: list[str]
    landing_prefix: str
    min_cells_per_type: int
    max_cells_per_type: int
    balance_strategy: str
    min_cells_per_source: int
    confidence_threshold: float | None
    reg_per_cell: str
    alignment: str
    seed: int


class StaleReferenceError(ValueError):
    """The file at a reference URI is no longer the one that was registered."""


def read_panel(path: Any) -> list[str]:
    backed = ad.read_h5ad(path, backed="r")
    try:
        return panel_genes(backed)
    finally:
        backed.file.close()


def resolve_panel(store: Any, settings: Settings, sample_ids: Iterable[str]) -> tuple[list[str], str]:
    """Configured panel, else the genes shared by every registered sample's landed file."""
    if settings.panel_genes:
        return list(dict.fromkeys(settings.panel_genes)), "configured"
    wanted = set(sample_ids)
    landed = [s for s in scan_landing(store, settings.landing_prefix)[0] if s.sample_id in wanted]
    if not landed:
        raise ValueError(
            "no panel: no registered sample has landed data and settings.panel_genes is empty; "
            f"land a sample under {store.uri(settings.landing_prefix)} or configure panel_genes"
        )
    panel: list[str] | None = None
    for sample in landed:
        genes = read_panel(store.get_file(sample.h5ad_key))
        panel = genes if panel is None else [g for g in panel if g in set(genes)]
    assert panel is not None
    if not panel:
        raise ValueError(f"the registered samples {[s.sample_id for s in landed]} share no genes")
    return panel, "samples:" + ",".join(s.sample_id for s in landed)


@dataclass
class TrainingSetResult:
    training_set: ad.AnnData
    mapping_table: pd.DataFrame


def _h5ad_safe(value: Any) -> Any:
    """uns must be writable to h5ad: nested dicts of scalars/strings, no lists of dicts, no None."""
    if isinstance(value, dict):
        return {str(k): _h5ad_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (str, int, float, bool, np.generic)) for v in value):
            return list(value)
        return {str(i): _h5ad_safe(v) for i, v in enumerate(value)}
    return value


def build_training_set(
    records: list[dict],
    panel: list[str],
    settings: Settings,
    *,
    s3_settings: S3Settings | None = None,
    panel_source: str = "configured",
) -> TrainingSetResult:
    """Combine the registered references (bytes verified) → ontology → Cap & Fill."""
    from spatial_assets.celltyping.pipeline import build_training_set as combine_map_balance
    from spatial_assets.celltyping.references import DEFAULT_PLACEHOLDER_LABELS, ReferenceSpec

    if not records:
        raise ValueError("no reference_atlas partitions are materialized: register a reference in the manifest")
    records = sorted(records, key=lambda r: r["id"])
    specs, lineage = [], {}
    for rec in records:
        local = fetch_to_cache(rec["uri"], settings=s3_settings)
        digest = sha256_file(local)
        if digest != rec["sha256"]:
            raise StaleReferenceError(
                f"reference {rec['id']!r}: {rec['uri']} changed since it was registered "
                f"(sha256 {digest[:12]}… ≠ recorded {rec['sha256'][:12]}…); re-materialize reference_atlas[{rec['id']}]"
            )
        specs.append(ReferenceSpec(uri=str(local), label_column=rec["label_column"], name=rec["id"]))
        lineage[rec["id"]] = {"uri": rec["uri"], "sha256": rec["sha256"], "etag": rec.get("etag", "")}
    entries = [
        ReferenceEntry(id=r["id"], uri=r["uri"], label_column=r["label_column"], target_proportions=r.get("target_proportions") or {})
        for r in records
    ]
    proportions = merged_target_proportions(entries) or None
    placeholders = list(DEFAULT_PLACEHOLDER_LABELS) + [l for r in records for l in r.get("placeholder_labels", [])]
    balanced, mapping = combine_map_balance(
        specs,
        panel,
        max_cells_per_type=settings.max_cells_per_type,
        target_proportions=proportions,
        strategy=settings.balance_strategy,
        placeholder_labels=list(dict.fromkeys(placeholders)),
        min_cells_per_type=settings.min_cells_per_type,
        min_per_source=settings.min_cells_per_source,
        seed=settings.seed,
    )
    params = {
        "panel_source": panel_source,
        "n_panel_genes": len(panel),
        "min_cells_per_type": settings.min_cells_per_type,
        "max_cells_per_type": settings.max_cells_per_type,
        "balance_strategy": settings.balance_strategy,
        "min_cells_per_source": settings.min_cells_per_source,
        "target_proportions": proportions or {},
        "placeholder_labels": list(dict.fromkeys(placeholders)),
        "seed": settings.seed,
    }
    for key in list(balanced.uns):
        balanced.uns[key] = _h5ad_safe(balanced.uns[key])
    balanced.uns["lineage_references"] = lineage
    balanced.uns["training_parameters"] = _h5ad_safe(params)
    balanced.uns["content_sha256"] = content_hash(
        balanced, obs_columns=(schema.CELL_TYPE, schema.ORIGINAL_LABEL, schema.REFERENCE_SOURCE)
    )
    mapping = mapping.copy()
    for col in mapping.columns:
        if mapping[col].dtype == object or isinstance(mapping[col].dtype, pd.CategoricalDtype):
            mapping[col] = mapping[col].astype("string")
    return TrainingSetResult(balanced, mapping.reset_index(drop=True))


def train_celltype_model(training_set: ad.AnnData, settings: Settings) -> Any:
    from spatial_assets.celltyping.training import train_model

    model = train_model(training_set, label_column=schema.CELL_TYPE, seed=settings.seed, reg_per_cell=settings.reg_per_cell)
    model.card["training_set"] = {
        "content_sha256": training_set.uns["content_sha256"],
        "n_cells": int(training_set.n_obs),
        "n_genes": int(training_set.n_vars),
    }
    model.card["references"] = dict(training_set.uns.get("lineage_references", {}))
    model.card.setdefault("library_versions", library_versions())
    return model


def annotate_sample(spatial: ad.AnnData, model: Any, settings: Settings, *, run_id: str, sample_id: str) -> ad.AnnData:
    from spatial_assets.celltyping.annotation import annotate

    annotated = annotate(spatial, model, confidence_threshold=settings.confidence_threshold, alignment=settings.alignment)
    info = annotated.uns[schema.CELLTYPING_UNS]
    card = model.card
    annotated.uns[schema.PROVENANCE_UNS] = _h5ad_safe(
        {
            "references": card.get("references", {}),
            "training_set": card.get("training_set", {}),
            "model": {"sha256": getattr(model, "sha256", None) or card.get("sha256", ""), "n_classes": len(model.classes)},
            "sample": {"id": sample_id, "spatial_cells_sha256": spatial.uns.get("content_sha256", "")},
            "run_id": run_id,
            "confidence_threshold": float(info["confidence_threshold"]),
            "threshold_source": info["threshold_source"],
            "alignment": info["alignment"],
            "regime": info["regime"],
            "shift_index": float(info["shift_index"]),
            "library_versions": library_versions(),
        }
    )
    return annotated


def summarize_annotations(annotated: ad.AnnData, *, sample_id: str) -> pd.DataFrame:
    obs = annotated.obs
    grouped = obs.groupby(schema.CELL_TYPE, observed=True)
    table = pd.DataFrame(
        {
            "n_cells": grouped.size(),
            "mean_confidence": grouped[schema.CONFIDENCE].mean(),
            "cell_type_ontology_term_id": grouped[schema.CELL_TYPE_ONTOLOGY_ID].first().astype(str),
        }
    ).reset_index()
    table.insert(0, "sample_id", sample_id)
    table["fraction"] = table["n_cells"] / max(len(obs), 1)
    table[schema.CELL_TYPE] = table[schema.CELL_TYPE].astype(str)
    return table.sort_values("n_cells", ascending=False, kind="stable").reset_index(drop=True)
