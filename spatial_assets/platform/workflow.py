"""The platform's cell-typing stages over stored objects (no Dagster).

Each Dagster asset calls one function here; the functions add what the platform needs on top of
the science modules: hash verification of the bytes that were registered, the gene panel each
model is trained for (:mod:`spatial_assets.platform.panels`), and the provenance chain written
into every annotations object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import anndata as ad
import numpy as np
import pandas as pd

from spatial_assets.core import schema
from spatial_assets.core.lineage import content_hash, library_versions
from spatial_assets.platform.manifest import ReferenceEntry, merged_target_proportions
from spatial_assets.platform.panels import Panel, missing_genes
from spatial_assets.storage.objectstore import S3Settings, fetch_to_cache, sha256_file


class Settings(Protocol):
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
    panel: Panel,
    settings: Settings,
    *,
    s3_settings: S3Settings | None = None,
) -> TrainingSetResult:
    """Combine the registered references (bytes verified) on ``panel``'s genes → ontology → Cap & Fill."""
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
        list(panel.genes),
        max_cells_per_type=settings.max_cells_per_type,
        target_proportions=proportions,
        strategy=settings.balance_strategy,
        placeholder_labels=list(dict.fromkeys(placeholders)),
        min_cells_per_type=settings.min_cells_per_type,
        min_per_source=settings.min_cells_per_source,
        seed=settings.seed,
    )
    params = {
        "panel_id": panel.id,
        "panel_source": panel.source,
        "n_panel_genes": panel.n_genes,
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
    balanced.uns["panel"] = {"id": panel.id, "name": panel.name, "n_genes": panel.n_genes, "source": panel.source}
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
    if "panel" in training_set.uns:
        model.card["panel"] = dict(training_set.uns["panel"])
    model.card["platform_settings"] = {"reg_per_cell": str(settings.reg_per_cell), "seed": int(settings.seed)}
    model.card["decisions"] = model_decisions(model.card)
    model.card.setdefault("library_versions", library_versions())
    return model


def model_decisions(card: dict[str, Any]) -> dict[str, Any]:
    """What training decided from the data, and why, in one readable block of the model card.

    * ``regularization``: the L2 penalty per training cell that was asked for (``auto`` = chosen by
      cross-validation), the grid the cross-validation walked, the value chosen per regime with
      the reason the training module gave;
    * ``thresholds``: per regime, the default confidence threshold (the confidence at which
      out-of-fold reference cells reach the target precision), its expected coverage and whether
      the target was reached; the ``shifted`` regime's is unverified by construction (reference
      cells say little about a query from another platform);
    * ``rare_classes``: classes kept with fewer training cells than the rare-class rule.
    """
    params = card.get("parameters", {})
    cv = card.get("cross_validation", {})
    regimes = card.get("regimes", {})
    walked = sorted({float(r["reg_per_cell"]) for r in cv.get("grid", []) if r.get("reg_per_cell") is not None}, reverse=True)
    chosen, thresholds = {}, {}
    for name, reg in regimes.items():
        chosen[name] = {
            "reg_per_cell": reg.get("reg_per_cell"),
            "cv_reg_per_cell": reg.get("cv_reg_per_cell", reg.get("reg_per_cell")),
            "why": str(reg.get("why", "")),
        }
        thr = reg.get("threshold", {})
        thresholds[name] = {
            "threshold": float(thr.get("threshold", float("nan"))),
            "expected_coverage": float(thr.get("expected_coverage", float("nan"))),
            "expected_precision": float(thr.get("expected_precision", float("nan"))),
            "target_precision": float(thr.get("target_precision", params.get("target_precision", float("nan")))),
            "target_reached": bool(thr.get("target_reached", False)),
            "verified": bool(reg.get("threshold_verified", False)),
            "temperature": float(reg.get("temperature", float("nan"))),
        }
    return {
        "regularization": {
            "requested": params.get("reg_per_cell"),
            "cv_criterion": params.get("cv_criterion", ""),
            "cv_folds": cv.get("folds", params.get("cv_folds")),
            "cv_n_cells": cv.get("n_cells"),
            "cv_grid": walked,
            "chosen": chosen,
        },
        "thresholds": thresholds,
        "rare_classes": list(card.get("rare_classes", [])),
        "rare_class_rule": str(card.get("rare_class_rule", "")),
    }


def cv_scores_table(card: dict[str, Any]) -> pd.DataFrame:
    """One row per regularisation value the cross-validation tried (strongest first), and which
    regime chose it: the evidence behind ``decisions['regularization']``."""
    chosen: dict[float, list[str]] = {}
    for name, reg in card.get("regimes", {}).items():
        value = reg.get("cv_reg_per_cell", reg.get("reg_per_cell"))
        if isinstance(value, (int, float)):
            chosen.setdefault(float(value), []).append(name)
    rows = []
    for rec in card.get("cross_validation", {}).get("grid", []):
        reg = rec.get("reg_per_cell")
        rows.append(
            {
                "reg_per_cell": float("nan") if reg is None else float(reg),
                "held_out_nll_class_balanced": float(rec.get("held_out_nll_class_balanced", float("nan"))),
                "held_out_nll_class_balanced_se": float(rec.get("held_out_nll_class_balanced_se", float("nan"))),
                "held_out_accuracy": float(rec.get("held_out_accuracy", float("nan"))),
                "held_out_balanced_accuracy": float(rec.get("held_out_balanced_accuracy", float("nan"))),
                "held_out_balanced_accuracy_se": float(rec.get("held_out_balanced_accuracy_se", float("nan"))),
                "temperature": float(rec.get("temperature", float("nan"))),
                "chosen_for": ", ".join(chosen.get(float(reg), [])) if reg is not None else "",
            }
        )
    table = pd.DataFrame(rows, columns=["reg_per_cell", "held_out_nll_class_balanced", "held_out_nll_class_balanced_se",
                                        "held_out_accuracy", "held_out_balanced_accuracy", "held_out_balanced_accuracy_se",
                                        "temperature", "chosen_for"])
    return table.sort_values("reg_per_cell", ascending=False, kind="stable").reset_index(drop=True)


def coverage_curve_table(card: dict[str, Any]) -> pd.DataFrame:
    """The coverage–accuracy curve per regime on held-out reference cells: for each confidence
    threshold, the Unassigned fraction and the accuracy of the cells still assigned."""
    rows = []
    for name, reg in card.get("regimes", {}).items():
        curve = reg.get("curve", {})
        for t, u, a in zip(curve.get("threshold", []), curve.get("unassigned_fraction", []), curve.get("assigned_accuracy", [])):
            rows.append({"regime": str(name), "threshold": float(t), "unassigned_fraction": float(u), "assigned_accuracy": float(a)})
    return pd.DataFrame(rows, columns=["regime", "threshold", "unassigned_fraction", "assigned_accuracy"])


#: what annotation decided, as recorded in ``uns['celltyping']`` (annotation.annotate); the keys the
#: platform copies into the provenance and the materialization metadata
DECISION_KEYS = (
    "shift_index",
    "shift_index_threshold",
    "shift_index_genes",
    "platform_shift",
    "regime",
    "regime_reason",
    "alignment_requested",
    "alignment",
    "reg_per_cell",
    "regularization_reason",
    "confidence_threshold",
    "threshold_source",
    "threshold_target_precision",
    "threshold_expected_coverage",
    "threshold_verified",
    "threshold_note",
    "unassigned_fraction",
    "rare_classes",
)


def annotation_decisions(annotated: ad.AnnData) -> dict[str, Any]:
    """The decisions annotation took for this query (shift index → regime → alignment → threshold)."""
    info = annotated.uns[schema.CELLTYPING_UNS]
    missing = [k for k in DECISION_KEYS if k not in info]
    if missing:
        raise KeyError(f"uns[{schema.CELLTYPING_UNS!r}] lacks {missing}: annotated by an older annotate()")
    out: dict[str, Any] = {}
    for key in DECISION_KEYS:
        value = info[key]
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, np.ndarray):
            value = value.tolist()
        out[key] = value
    out["rare_classes"] = [str(k) for k in out["rare_classes"]]
    return out


class PanelMismatchError(ValueError):
    """A model trained for another panel than the sample's (names both panels)."""


def annotate_sample(
    spatial: ad.AnnData, model: Any, settings: Settings, *, run_id: str, sample_id: str, panel: Panel | None = None
) -> ad.AnnData:
    """Annotate with the model of the sample's own panel; the panel is recorded in the provenance.

    A sample that came from a raw instrument folder also gets ``raw`` (every raw file's sha256 /
    ETag / size), ``segmentation`` (platform, method, parameters, versions, content hash of the
    segmented cells) and ``cell_qc`` (cells in / out, filters) sections: the chain raw files →
    segmentation → cells → annotations that ``spatial-assets audit`` shows and checks.
    """
    from spatial_assets.celltyping.annotation import annotate
    from spatial_assets.platform.raw_samples import lineage_of

    card = model.card
    if panel is not None:
        model_panel = (card.get("panel") or {}).get("id")
        if model_panel is not None and model_panel != panel.id:
            raise PanelMismatchError(
                f"sample {sample_id!r} is on panel {panel.id} but the model was trained for panel {model_panel}"
            )
        absent = missing_genes(model.genes, spatial.var_names)
        if absent:
            raise PanelMismatchError(
                f"sample {sample_id!r} lacks {len(absent)} gene(s) of its panel's model ({panel.id}): {absent[:10]}"
            )
    annotated = annotate(spatial, model, confidence_threshold=settings.confidence_threshold, alignment=settings.alignment)
    info = annotated.uns[schema.CELLTYPING_UNS]
    raw = lineage_of(spatial) or {}
    annotated.uns[schema.PROVENANCE_UNS] = _h5ad_safe(
        {
            **raw,  # raw / segmentation / cell_qc, for a sample segmented from a raw folder
            "references": card.get("references", {}),
            "training_set": card.get("training_set", {}),
            "model": {"sha256": getattr(model, "sha256", None) or card.get("sha256", ""), "n_classes": len(model.classes)},
            "panel": {"id": panel.id, "name": panel.name, "n_genes": panel.n_genes, "source": panel.source} if panel else None,
            "sample": {"id": sample_id, "spatial_cells_sha256": spatial.uns.get("content_sha256", "")},
            "run_id": run_id,
            # what was decided for this query and why (also in uns['celltyping'])
            "decisions": annotation_decisions(annotated),
            "confidence_threshold": float(info["confidence_threshold"]),
            "threshold_source": info["threshold_source"],
            "threshold_verified": bool(info["threshold_verified"]),
            "alignment": info["alignment"],
            "regime": info["regime"],
            "shift_index": float(info["shift_index"]),
            "settings": {"alignment": settings.alignment, "confidence_threshold": settings.confidence_threshold},
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
