"""The platform's cell-typing stages record what was decided from the data, and use the settings.

Real data: PBMC3k split in two halves, the query either from the same platform or with a simulated
platform effect (per-gene detection efficiency, lower depth; ``celltyping.synthetic.platform_split``).
"""

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from spatial_assets.celltyping.shift import SHIFT_INDEX_THRESHOLD
from spatial_assets.celltyping.synthetic import platform_split
from spatial_assets.celltyping.training import CV_REG_GRID, RARE_CLASS_CELLS, TrainingError
from spatial_assets.core import schema
from spatial_assets.defs.settings import PlatformSettings, check_celltyping_settings, settings_from_env
from spatial_assets.platform.workflow import (
    annotate_sample,
    annotation_decisions,
    coverage_curve_table,
    cv_scores_table,
    model_decisions,
    train_celltype_model,
)

DATA = Path(__file__).resolve().parents[2] / "data"
LABEL = "seurat_annotations"


@dataclass
class Settings:
    reg_per_cell: str = "auto"
    alignment: str = "auto"
    confidence_threshold: float | None = None
    seed: int = 0


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    p = ad.read_h5ad(DATA / "human_PBMC3k_400genes_seurat_labels.h5ad")
    return p[p.obs[LABEL].notna()].copy()


def _training_set(ref: ad.AnnData) -> ad.AnnData:
    ref.uns["content_sha256"] = "test"
    return ref


@pytest.fixture(scope="module")
def same(pbmc):
    ref, query = platform_split(pbmc, LABEL, efficiency_sd=0.0, depth=1.0, seed=0)
    return train_celltype_model(_training_set(ref), Settings()), query


@pytest.fixture(scope="module")
def shifted_query(pbmc):
    _, query = platform_split(pbmc, LABEL, efficiency_sd=0.5, depth=0.3, seed=0)
    return query


def test_model_card_records_the_regularisation_chosen_by_cv(same):
    model, _ = same
    d = model.card["decisions"]
    assert d == model_decisions(model.card)
    reg = d["regularization"]
    assert reg["requested"] == "auto" and model.card["platform_settings"]["reg_per_cell"] == "auto"
    assert reg["cv_grid"] and set(reg["cv_grid"]) <= set(CV_REG_GRID) | {float(f"{g * s:.3g}") for g in CV_REG_GRID for s in (2**0.5, 2**-0.5)}
    # the chosen CV value of each regime is one the cross-validation scored, and the shifted regime shrinks more
    scored = set(cv_scores_table(model.card)["reg_per_cell"])
    for regime in ("same_platform", "shifted"):
        assert reg["chosen"][regime]["cv_reg_per_cell"] in scored
    assert "stratified CV" in reg["chosen"]["same_platform"]["why"]
    assert "one-standard-error rule" in reg["chosen"]["shifted"]["why"]
    assert reg["chosen"]["shifted"]["cv_reg_per_cell"] >= reg["chosen"]["same_platform"]["cv_reg_per_cell"]
    table = cv_scores_table(model.card)
    # same_platform: of the values whose held-out balanced accuracy is within one SE of the highest,
    # the lowest class-balanced NLL
    top = table.loc[table["held_out_balanced_accuracy"].idxmax()]
    tied = table[table["held_out_balanced_accuracy"] >= top["held_out_balanced_accuracy"] - top["held_out_balanced_accuracy_se"]]
    best = tied.loc[tied["held_out_nll_class_balanced"].idxmin(), "reg_per_cell"]
    assert model.card["cross_validation"]["selection_tolerance"] == pytest.approx(top["held_out_balanced_accuracy_se"])
    assert reg["chosen"]["same_platform"]["cv_reg_per_cell"] == best
    assert "same_platform" in table.loc[table["reg_per_cell"] == best, "chosen_for"].iloc[0]
    # shifted: the strongest value within one SE of the class-balanced NLL minimum (never weaker than same_platform)
    i = table["held_out_nll_class_balanced"].idxmin()
    limit = table.loc[i, "held_out_nll_class_balanced"] + table.loc[i, "held_out_nll_class_balanced_se"]
    one_se = table.loc[table["held_out_nll_class_balanced"] <= limit, "reg_per_cell"].max()
    assert reg["chosen"]["shifted"]["cv_reg_per_cell"] == max(one_se, best)
    assert table["held_out_accuracy"].between(0, 1).all() and len(table) == len(model.card["cross_validation"]["grid"])


def test_model_card_records_thresholds_coverage_and_rare_classes(same):
    model, _ = same
    d = model.card["decisions"]
    for regime, thr in d["thresholds"].items():
        assert 0.0 < thr["threshold"] < 1.0, regime
        assert 0.0 <= thr["expected_coverage"] <= 1.0, regime
        assert thr["target_precision"] == 0.9
        if thr["target_reached"]:
            assert thr["expected_precision"] >= 0.9 - 1e-9
    assert d["thresholds"]["same_platform"]["verified"] and not d["thresholds"]["shifted"]["verified"]
    counts = model.card["n_cells_per_class"]
    assert d["rare_classes"] == sorted(k for k, n in counts.items() if n < RARE_CLASS_CELLS)
    assert d["rare_classes"]  # PBMC3k's platelets: 7 cells in this half
    assert str(RARE_CLASS_CELLS) in d["rare_class_rule"]


def test_coverage_curve_table_is_a_curve_that_meets_the_threshold(same):
    model, _ = same
    curve = coverage_curve_table(model.card)
    assert set(curve["regime"]) == {"same_platform", "shifted"}
    for regime, part in curve.groupby("regime"):
        part = part.sort_values("threshold")
        assert part["unassigned_fraction"].between(0, 1).all() and part["assigned_accuracy"].between(0, 1).all()
        assert (np.diff(part["unassigned_fraction"]) >= -1e-12).all()  # a higher threshold never assigns more
        thr = model.card["decisions"]["thresholds"][regime]
        # at the curve's first threshold above the model's, the assigned cells are at least as accurate as the target
        above = part[part["threshold"] >= thr["threshold"]]
        if thr["target_reached"] and len(above):
            assert above["assigned_accuracy"].iloc[0] >= thr["target_precision"] - 0.02
            assert above["unassigned_fraction"].iloc[0] >= 1 - thr["expected_coverage"] - 1e-9


def test_annotation_records_a_low_shift_and_a_verified_threshold(same):
    model, query = same
    out = annotate_sample(query, model, Settings(), run_id="r", sample_id="s")
    d = annotation_decisions(out)
    assert d["shift_index"] < d["shift_index_threshold"] == SHIFT_INDEX_THRESHOLD
    assert not d["platform_shift"] and d["regime"] == "same_platform" and d["alignment"] == "none"
    assert d["threshold_verified"] and d["confidence_threshold"] == model.card["decisions"]["thresholds"]["same_platform"]["threshold"]
    assert 0 < d["threshold_expected_coverage"] <= 1
    prov = out.uns[schema.PROVENANCE_UNS]
    assert prov["decisions"]["regime"] == "same_platform" and bool(prov["threshold_verified"])
    assert prov["decisions"]["regime_reason"].startswith("shift index")


def test_annotation_under_a_platform_shift_flags_the_threshold_unverified(same, shifted_query):
    model, _ = same
    out = annotate_sample(shifted_query, model, Settings(), run_id="r", sample_id="s")
    d = annotation_decisions(out)
    assert d["shift_index"] > SHIFT_INDEX_THRESHOLD and d["platform_shift"]
    assert d["regime"] == "shifted" and d["alignment"] == "recenter"
    assert not d["threshold_verified"] and "unverified" in d["threshold_note"]
    assert d["confidence_threshold"] == model.card["decisions"]["thresholds"]["shifted"]["threshold"]
    assert not bool(out.uns[schema.PROVENANCE_UNS]["threshold_verified"])


def test_alignment_setting_is_used(same):
    model, query = same
    out = annotate_sample(query, model, Settings(alignment="recenter"), run_id="r", sample_id="s")
    d = annotation_decisions(out)
    assert d["alignment_requested"] == "recenter" and d["alignment"] == "recenter"
    assert d["regime"] == "same_platform"  # the regime still follows the index
    assert out.uns[schema.PROVENANCE_UNS]["settings"]["alignment"] == "recenter"
    with pytest.raises(ValueError, match="alignment must be one of"):
        annotate_sample(query, model, Settings(alignment="zscore"), run_id="r", sample_id="s")


def test_reg_per_cell_setting_is_used(pbmc):
    ref, _ = platform_split(pbmc, LABEL, efficiency_sd=0.0, depth=1.0, seed=0)
    model = train_celltype_model(_training_set(ref), Settings(reg_per_cell="0.01"))
    reg = model.card["decisions"]["regularization"]
    assert reg["requested"] == [0.01] and model.card["platform_settings"]["reg_per_cell"] == "0.01"
    for regime in ("same_platform", "shifted"):
        assert reg["chosen"][regime]["reg_per_cell"] == [0.01]
        assert "given by the caller" in reg["chosen"][regime]["why"]
    assert model.card["parameters"]["regularization_path"][0]["reg_per_cell"] == 0.01
    with pytest.raises(TrainingError, match="reg_per_cell"):
        train_celltype_model(_training_set(ref[:200].copy()), Settings(reg_per_cell="strong"))


def test_settings_from_env_reads_and_checks_the_celltyping_knobs(monkeypatch):
    monkeypatch.setenv("SPATIAL_ASSETS_REG_PER_CELL", "0.001")
    monkeypatch.setenv("SPATIAL_ASSETS_ALIGNMENT", "none")
    s = settings_from_env()
    assert isinstance(s, PlatformSettings) and s.reg_per_cell == "0.001" and s.alignment == "none"
    monkeypatch.setenv("SPATIAL_ASSETS_ALIGNMENT", "zscore")
    with pytest.raises(ValueError, match="alignment must be one of .*'zscore'"):
        settings_from_env()
    monkeypatch.setenv("SPATIAL_ASSETS_ALIGNMENT", "auto")
    monkeypatch.setenv("SPATIAL_ASSETS_REG_PER_CELL", "-1")
    with pytest.raises(ValueError, match="reg_per_cell must be 'auto' or a positive number, got '-1'"):
        settings_from_env()
    check_celltyping_settings("auto", "recenter")  # valid: no error


def test_a_deployment_threshold_is_recorded_as_the_callers(same):
    model, query = same
    out = annotate_sample(query, model, Settings(confidence_threshold=0.5), run_id="r", sample_id="s")
    d = annotation_decisions(out)
    assert d["confidence_threshold"] == 0.5 and d["threshold_source"] == "caller"
    assert not d["threshold_verified"] and d["threshold_note"] == "set by the caller"
    assert np.isnan(d["threshold_expected_coverage"])
    assert out.uns[schema.PROVENANCE_UNS]["settings"]["confidence_threshold"] == 0.5
