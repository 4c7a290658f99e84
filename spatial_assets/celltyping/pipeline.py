"""End-to-end cell typing: references → training set → model → annotated spatial sample.

Plain functions (no Dagster) so the CLI, the Dagster assets and the benchmarks run the same code.
Also holds :func:`score_against_labels`, the scoring used against author labels (benchmarks, demo).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from spatial_assets.core import schema
from spatial_assets.celltyping.annotation import annotate
from spatial_assets.core.spatial import SpatialInputError, panel_genes, validate_spatial  # noqa: F401 (re-exported)
from spatial_assets.celltyping.training import TrainedModel, train_model


@dataclass
class CellTypingResult:
    """Everything a run produced; ``mapping_table`` is the ontology audit table."""

    annotated: AnnData
    model: TrainedModel
    training_set: AnnData
    mapping_table: pd.DataFrame


def build_training_set(
    references: Sequence[Any],
    panel: Sequence[str],
    *,
    max_cells_per_type: int = 5000,
    target_proportions: Mapping[str, float] | str | None = None,
    strategy: str = "proportional",
    placeholder_labels: Sequence[str] | None = None,
    min_cells_per_type: int = 3,
    min_per_source: int = 0,
    seed: int = 0,
) -> tuple[AnnData, pd.DataFrame]:
    """combine → ontology → balance; returns (balanced training set, ontology mapping table).

    ``min_cells_per_type=3``: a class a query may contain must exist in the model to be called at
    all; dropping classes below 10 cells made their query cells always wrong, and keeping them
    down to 3 cost nothing elsewhere (docs/celltyping.md). Such classes are flagged as rare in the
    model card and ``uns['celltyping']['rare_classes']``.
    """
    from spatial_assets.celltyping.balancing import cap_and_fill
    from spatial_assets.celltyping.ontology import apply_ontology
    from spatial_assets.celltyping.references import DEFAULT_PLACEHOLDER_LABELS, combine_references

    placeholders = tuple(placeholder_labels) if placeholder_labels is not None else DEFAULT_PLACEHOLDER_LABELS
    combined = combine_references(
        references, panel, min_cells_per_type=min_cells_per_type, placeholder_labels=placeholders, seed=seed
    )
    harmonised, mapping = apply_ontology(combined)
    balanced = cap_and_fill(
        harmonised,
        label_column=schema.CELL_TYPE,
        source_column=schema.REFERENCE_SOURCE,
        max_cells_per_type=max_cells_per_type,
        strategy=strategy,
        min_per_source=min_per_source,
        target_proportions=target_proportions,
        seed=seed,
    )
    return balanced, mapping


def run_celltyping(
    references: Sequence[Any],
    spatial: AnnData,
    *,
    confidence_threshold: float | None = None,
    max_cells_per_type: int = 5000,
    target_proportions: Mapping[str, float] | str | None = None,
    strategy: str = "proportional",
    seed: int = 0,
    placeholder_labels: Sequence[str] | None = None,
    min_cells_per_type: int = 3,
    alignment: str = "auto",
    reg_per_cell: float | str = "auto",
    spatial_name: str = "spatial",
    progress: Callable[[str], None] | None = None,
) -> CellTypingResult:
    """Train on the references over the spatial panel and annotate ``spatial`` (not modified).

    Defaults decide from the data: ``reg_per_cell="auto"`` (cross-validated on the reference, plus
    the strong path for a platform shift), ``alignment="auto"`` (by the measured shift index) and
    ``confidence_threshold=None`` (the model's threshold at its target precision).
    ``progress`` (e.g. the CLI's progress printer) is called with one line before each long step.
    """
    say = progress or (lambda message: None)
    validate_spatial(spatial, spatial_name)
    panel = panel_genes(spatial)
    if not panel:
        raise SpatialInputError(f"{spatial_name}: no genes left after removing Blank control probes")
    say(f"building training set from {len(references)} reference(s) over {len(panel):,} panel genes")
    training, mapping = build_training_set(
        references,
        panel,
        max_cells_per_type=max_cells_per_type,
        target_proportions=target_proportions,
        strategy=strategy,
        placeholder_labels=placeholder_labels,
        min_cells_per_type=min_cells_per_type,
        seed=seed,
    )
    say(f"training model on {training.n_obs:,} cells × {training.n_vars:,} genes")
    model = train_model(training, label_column=schema.CELL_TYPE, seed=seed, reg_per_cell=reg_per_cell)
    say(f"annotating {spatial.n_obs:,} cells with {len(model.classes)} classes")
    annotated = annotate(
        spatial, model, confidence_threshold=confidence_threshold, alignment=alignment, seed=seed, name=spatial_name
    )
    return CellTypingResult(annotated=annotated, model=model, training_set=training, mapping_table=mapping)


def decision_metadata(annotated: AnnData) -> dict[str, Any]:
    """What annotation decided and why, flat and JSON-safe (for materialization metadata).

    Shift index and threshold, regime and alignment with their reasons, the confidence threshold
    with its source and whether held-out reference cells vouch for it, rare classes, and the
    coverage-accuracy curves (reference held-out cells; query Unassigned fraction per threshold).
    """
    info = annotated.uns.get(schema.CELLTYPING_UNS, {})
    keys = (
        "shift_index", "shift_index_threshold", "platform_shift", "regime", "regime_reason", "alignment_requested",
        "alignment", "reg_per_cell", "regularization_reason", "confidence_threshold", "threshold_source",
        "threshold_target_precision", "threshold_expected_coverage", "threshold_verified", "threshold_note",
        "temperature", "unassigned_fraction", "rare_classes",
    )  # fmt: skip
    out: dict[str, Any] = {k: _plain(info[k]) for k in keys if k in info}
    for k in ("coverage_curve_reference", "coverage_curve_query"):
        if k in info:
            out[k] = {c: [float(v) for v in vals] for c, vals in info[k].items()}
    return out


def model_metadata(model: TrainedModel) -> dict[str, Any]:
    """The model card's decisions per regime (regularisation and why, temperature, default
    threshold with its expected coverage), the rare classes and the cross-validation walk."""
    card = model.card
    regimes = {}
    for name, r in card.get("regimes", {}).items():
        thr = r.get("threshold", {})
        regimes[name] = {
            "reg_per_cell": _plain(r.get("reg_per_cell")),
            "why": r.get("why", ""),
            "temperature": _plain(r.get("temperature")),
            "threshold": _plain(thr.get("threshold")),
            "target_precision": _plain(thr.get("target_precision")),
            "expected_coverage": _plain(thr.get("expected_coverage")),
            "held_out_accuracy": _plain(thr.get("held_out_accuracy")),
            "threshold_verified": bool(r.get("threshold_verified", False)),
        }
    grid = card.get("cross_validation", {}).get("grid", [])
    return {
        "regimes": regimes,
        "rare_classes": list(card.get("rare_classes", [])),
        "cv_criterion": card.get("parameters", {}).get("cv_criterion", ""),
        "cv_selection": card.get("parameters", {}).get("cv_selection", ""),
        "cv_grid": [
            {"reg_per_cell": _plain(g["reg_per_cell"]), "criterion": _plain(g.get("held_out_nll_class_balanced")),
             "se": _plain(g.get("held_out_nll_class_balanced_se")), "accuracy": _plain(g.get("held_out_accuracy")),
             "balanced_accuracy": _plain(g.get("held_out_balanced_accuracy"))}
            for g in grid
        ],  # fmt: skip
    }


def _plain(v: Any) -> Any:
    """numpy scalars/arrays to Python; NaN to None (JSON has no NaN)."""
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def score_against_labels(
    pred: Sequence[str],
    truth: Sequence[str],
    label_map: Mapping[str, str | None],
    *,
    confidence: Sequence[float] | None = None,
    class_origins: Mapping[str, Sequence[str]] | None = None,
    ignore_truth: Sequence[str] = ("Ambiguous",),
) -> dict[str, Any]:
    """Accuracy, balanced accuracy and confidence AUROC of predicted vs author labels.

    ``label_map``: reference label → truth label (``None``: no counterpart, always wrong).
    ``class_origins`` (``uns['cell_type_label_map']``) translates ontology classes back to the
    reference labels they came from; a class whose origins map to several truth labels counts as
    correct for any of them (reported as ``n_ambiguous_classes``). Cells whose truth is in
    ``ignore_truth`` are not scored. Balanced accuracy = mean recall over truth classes.
    """
    pred = np.asarray(pred, dtype=object).astype(str)
    truth = np.asarray(truth, dtype=object).astype(str)
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth differ in length: {pred.shape} vs {truth.shape}")
    origins = {str(k): [str(v) for v in vs] for k, vs in (class_origins or {}).items()}
    targets: dict[str, set[str]] = {}
    n_amb = 0
    for p in np.unique(pred):
        labels = origins.get(p, [p])
        t = {label_map[o] for o in labels if label_map.get(o) is not None}
        if len(t) > 1:
            n_amb += 1
        targets[p] = t
    keep = ~np.isin(truth, list(ignore_truth))
    correct = np.array([t in targets[p] for p, t in zip(pred[keep], truth[keep])], dtype=bool)
    tr = truth[keep]
    recalls = {str(k): float(correct[tr == k].mean()) for k in np.unique(tr)}
    out: dict[str, Any] = {
        "n_scored": int(keep.sum()),
        "accuracy": float(correct.mean()) if correct.size else float("nan"),
        "balanced_accuracy": float(np.mean(list(recalls.values()))) if recalls else float("nan"),
        "recall_per_class": recalls,
        "n_ambiguous_classes": n_amb,
    }
    if confidence is not None:
        conf = np.asarray(confidence, dtype=np.float64)[keep]
        if correct.all() or not correct.any():
            out["confidence_auroc"] = float("nan")
        else:
            from sklearn.metrics import roc_auc_score

            out["confidence_auroc"] = float(roc_auc_score(correct, conf))
    return out


#: Moffitt 2018 POA: scRNA reference label → MERFISH ``Cell_class_major`` (data/README.md).
POA_LABEL_MAP: dict[str, str | None] = {
    "Astrocytes": "Astrocyte",
    "Endothelial": "Endothelial",
    "Ependymal": "Ependymal",
    "Excitatory": "Excitatory",
    "Inhibitory": "Inhibitory",
    "Immature oligodendrocyte": "OD Immature",
    "Newly formed oligodendrocyte": "OD Immature",
    "Mature oligodendrocyte": "OD Mature",
    "Mural": "Pericytes",
    "Microglia": "Microglia",
    "Macrophage": "Microglia",
    "Fibroblast": None,
}
#: labels the POA reference uses as placeholders (data/README.md)
POA_PLACEHOLDERS: tuple[str, ...] = ("Ambiguous", "Unstable")
