"""Cell-typing validation plots on an annotated AnnData built from the real POA MERFISH data."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from spatial_assets.celltyping import plots
from spatial_assets.core import schema
from spatial_assets.celltyping.plots import (
    PlotInputError,
    plot_confidence_map,
    plot_deg_heatmap,
    plot_marker_validation,
    plot_ontology_table,
    write_celltyping_plots,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MARKERS = {"OD Mature": ["Mbp", "Ermn", "Gjc3"], "Astrocyte": ["Aqp4", "Mlc1"], "Microglia": ["Selplg", "NotAGene"]}


@pytest.fixture()
def annotated(load_merfish) -> ad.AnnData:
    """2,000 real cells; author classes as predictions, seeded Beta(5, 2) confidence, threshold 0.5."""
    full = load_merfish()
    rng = np.random.default_rng(0)
    adata = full[np.sort(rng.choice(full.n_obs, 2000, replace=False))].copy()
    adata = adata[adata.obs["Cell_class_major"].astype(str) != "Ambiguous"].copy()
    adata.obs[schema.PREDICTED] = adata.obs["Cell_class_major"].astype(str)
    conf = rng.beta(5, 2, adata.n_obs)
    adata.obs[schema.CONFIDENCE] = conf
    adata.obs[schema.CELL_TYPE] = np.where(conf >= 0.5, adata.obs[schema.PREDICTED], schema.UNASSIGNED)
    from spatial_assets.celltyping.calibration import coverage_curve

    held_out_conf = rng.beta(5, 2, 1000)
    adata.uns[schema.CELLTYPING_UNS] = {
        "confidence_threshold": 0.5,
        "threshold_target_precision": 0.9,
        "threshold_expected_coverage": float((held_out_conf >= 0.5).mean()),
        "threshold_verified": True,
        "regime": "same_platform",
        "unassigned_fraction": float((conf < 0.5).mean()),
        "coverage_curve_reference": coverage_curve(held_out_conf, rng.random(1000) < held_out_conf),
        "coverage_curve_query": coverage_curve(conf),
    }
    return adata


@pytest.fixture()
def mapping_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "label": ["OD Mature", "Astrocyte", "Inhibitory", "Pericytes"],
            "ontology_term_id": ["CL:0000128", "CL:0000127", "CL:0000617", "CL:0000669"],
            "ontology_label": ["oligodendrocyte", "astrocyte", "GABAergic neuron", "pericyte"],
            "tier": ["curated", "exact", "synonym", "fuzzy"],
            "score": [1.0, 1.0, 0.92, 0.71],
            "n_cells": [2167, 1402, 3409, 128],
        }
    )


def _assert_real_png(path: Path) -> None:
    """A PNG (signature) whose pixels are not one flat colour (something was drawn)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.05, f"{path} looks blank"
    # more than a handful of distinct colours: axes, text and data, not an empty frame
    assert np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0).shape[0] > 20


def test_confidence_map(annotated: ad.AnnData, tmp_path: Path) -> None:
    out = plot_confidence_map(annotated, tmp_path / "sub" / "conf.png", threshold=0.5)
    assert out == tmp_path / "sub" / "conf.png"
    _assert_real_png(out)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # temp file renamed away


def test_deg_heatmap_and_marker_ranking(annotated: ad.AnnData, tmp_path: Path) -> None:
    _assert_real_png(plot_deg_heatmap(annotated, tmp_path / "deg.png", n_genes=5))
    # the one-vs-rest ranking behind the heatmap must recover textbook markers from real data
    labels = annotated.obs[schema.PREDICTED].to_numpy()
    groups, means, _, _, genes = plots._group_stats(annotated, labels)
    top = plots._top_markers(groups, means, labels, genes, 5)
    top_names = {g: {str(genes[j]) for j in idx} for g, idx in top.items()}
    assert top_names["OD Mature"] & {"Ermn", "Gjc3", "Opalin", "Mbp"}
    assert top_names["Astrocyte"] & {"Aqp4", "Mlc1", "Aldh1l1", "Cxcl14"}
    assert "Selplg" in top_names["Microglia"]
    assert not any(g.startswith("Blank") for names in top_names.values() for g in names)


def test_ontology_table(mapping_table: pd.DataFrame, tmp_path: Path) -> None:
    _assert_real_png(plot_ontology_table(mapping_table, tmp_path / "onto.png"))
    with pytest.raises(PlotInputError, match=r"\['tier', 'score'\]"):
        plot_ontology_table(mapping_table.drop(columns=["tier", "score"]), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_marker_validation(annotated: ad.AnnData, tmp_path: Path) -> None:
    _assert_real_png(plot_marker_validation(annotated, tmp_path / "mv.png", markers=MARKERS))
    three = annotated[annotated.obs[schema.PREDICTED].isin(["OD Mature", "Astrocyte", "Microglia"])].copy()
    _assert_real_png(plot_marker_validation(three, tmp_path / "mv_auto.png", markers=None))
    with pytest.raises(PlotInputError, match="no predicted type has markers"):
        plot_marker_validation(annotated, tmp_path / "none.png", markers={"Neuron X": ["NotAGene"]})


def test_coverage_accuracy(annotated: ad.AnnData, tmp_path: Path) -> None:
    _assert_real_png(plots.plot_coverage_accuracy(annotated, tmp_path / "cov.png"))
    bare = annotated.copy()
    bare.uns[schema.CELLTYPING_UNS] = {"confidence_threshold": 0.5}
    with pytest.raises(PlotInputError, match="coverage_curve_reference"):
        plots.plot_coverage_accuracy(bare, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_model_coverage_accuracy_from_a_model_card(tmp_path: Path) -> None:
    """The model-level curve (one per regime) is drawn from the card the training writes."""
    from spatial_assets.celltyping.calibration import coverage_curve, precision_threshold

    rng = np.random.default_rng(1)
    regimes = {}
    for name, a in (("same_platform", 6), ("shifted", 3)):
        conf = rng.beta(a, 2, 800)
        correct = rng.random(800) < conf
        regimes[name] = {"curve": coverage_curve(conf, correct), "threshold": precision_threshold(conf, correct, 0.9),
                         "threshold_verified": name == "same_platform"}
    card = {"classes": ["a", "b", "c"], "regimes": regimes, "calibration": {"n_held_out": 800}}
    _assert_real_png(plots.plot_model_coverage_accuracy(card, tmp_path / "model_cov.png"))
    with pytest.raises(PlotInputError, match="regimes"):
        plots.plot_model_coverage_accuracy({"classes": []}, tmp_path / "none.png")
    with pytest.raises(PlotInputError, match="coverage curve"):
        plots.plot_model_coverage_accuracy({"regimes": {"same_platform": {"curve": {}}}}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_write_all_plots(annotated: ad.AnnData, mapping_table: pd.DataFrame, tmp_path: Path) -> None:
    written = write_celltyping_plots(
        annotated, tmp_path / "plots", confidence_threshold=None, mapping_table=mapping_table, markers=MARKERS
    )
    assert set(written) == {"confidence_map", "deg_heatmap", "marker_validation", "ontology_table", "coverage_accuracy"}
    for path in written.values():
        _assert_real_png(path)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(plots.PLOT_FILES.values())


def test_broken_input_skips_only_that_plot(
    annotated: ad.AnnData, mapping_table: pd.DataFrame, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = annotated.copy()
    del broken.obsm[schema.SPATIAL_OBSM]
    bad_table = mapping_table.drop(columns=["ontology_term_id"])
    with caplog.at_level(logging.WARNING, logger="spatial_assets.celltyping.plots"):
        written = write_celltyping_plots(
            broken, tmp_path, confidence_threshold=0.5, mapping_table=bad_table, markers=MARKERS
        )
    assert set(written) == {"deg_heatmap", "marker_validation", "coverage_accuracy"}
    assert not (tmp_path / "confidence_map.png").exists()
    assert not (tmp_path / "ontology_table.png").exists()
    assert "'confidence_map' skipped" in caplog.text and "obsm['spatial']" in caplog.text
    assert "'ontology_table' skipped" in caplog.text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_nothing_plottable_never_raises(tmp_path: Path) -> None:
    empty = ad.AnnData(X=np.zeros((3, 2)))
    assert write_celltyping_plots(empty, tmp_path, confidence_threshold=0.5) == {}
    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")
    assert write_celltyping_plots(empty, blocked / "sub", confidence_threshold=0.5) == {}


def test_agg_backend_without_display(tmp_path: Path) -> None:
    """In a fresh interpreter with no DISPLAY, importing and plotting must not pick a GUI backend."""
    code = (
        "import matplotlib, sys; import spatial_assets.celltyping.plots as p; "
        "import anndata as ad, numpy as np, pandas as pd; "
        "t = pd.DataFrame({'label':['a'],'ontology_term_id':['CL:1'],'ontology_label':['x'],'tier':['exact'],'score':[1.0]}); "
        f"p.plot_ontology_table(t, {str(tmp_path / 'x.png')!r}); "
        "print('pyplot' in sys.modules)"
    )
    env = {"PATH": "/usr/bin:/bin", "MPLBACKEND": "", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"  # no pyplot, so no backend selection, no display needed
    _assert_real_png(tmp_path / "x.png")
