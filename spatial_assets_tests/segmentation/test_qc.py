"""QC metrics, filters, the report, the invariants and the plots."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.segmentation.qc import QCFilters, QCLimits, cell_qc, qc_invariants, qc_metrics


def _cells() -> ad.AnnData:
    rng = np.random.default_rng(0)
    genes = ["Gfap", "Snap25", "mt-Co1", "Blank-1", "NegControlProbe_1"]
    X = rng.poisson([20, 15, 2, 0.2, 0.2], size=(60, 5)).astype(np.int32)
    X[0] = [0, 1, 0, 0, 0]          # too few counts
    X[1] = [3, 3, 0, 8, 8]          # mostly control probes
    X[2] = [0, 0, 0, 0, 0]          # empty
    a = ad.AnnData(sp.csr_matrix(X), var=pd.DataFrame(index=genes))
    a.var["is_control"] = [False, False, False, True, True]
    xy = rng.uniform(0, 200, (60, 2))
    xy[-3:] = [[2000, 2000], [2003, 2001], [2001, 2004]]  # a detached patch of 3 cells
    a.obsm["spatial"] = xy
    a.obs["area_um2"] = rng.uniform(50, 150, 60)
    a.obs.iloc[3, a.obs.columns.get_loc("area_um2")] = 5000.0
    a.uns["segmentation"] = {"assigned_fraction": 0.2}
    return a


def test_metrics_by_hand():
    a = _cells()
    m = qc_metrics(a)
    assert m.loc["1", "total_counts"] == 6 and m.loc["1", "control_counts"] == 16
    assert m.loc["1", "control_fraction"] == pytest.approx(16 / 22)
    assert m.loc["0", "n_genes_by_counts"] == 1
    assert np.isfinite(m["mt_fraction"]).all()


def test_filters_report_and_no_mutation():
    a = _cells()
    before = a.obs.columns.tolist()
    out, rep = cell_qc(a, QCFilters(min_counts=10, max_area_um2=2000, island_min_size=5, exclude_islands=True))
    assert a.obs.columns.tolist() == before
    assert {"0", "1", "2", "3"}.isdisjoint(out.obs_names)
    assert rep["failed_by"]["max_control_fraction"] >= 1 and rep["failed_by"]["max_area"] == 1
    assert rep["n_islands"] == 3 and not set(a.obs_names[-3:]) & set(out.obs_names)
    assert rep["n_cells_out"] == out.n_obs and rep["mt_genes"] == 1
    assert (out.obs["total_counts"] >= 10).all()
    kept, _ = cell_qc(a, filter_cells=False)
    assert kept.n_obs == a.n_obs and not kept.obs.loc["2", "qc_pass"]


def test_invariants_warn_and_error():
    a = _cells()
    out, rep = cell_qc(a)
    inv = {c["name"]: c for c in qc_invariants(out, rep, QCLimits(max_control_fraction=0.001, min_assigned_fraction=0.3))}
    assert inv["no_empty_cells"]["passed"] and inv["cells_left"]["passed"]
    assert not inv["control_fraction"]["passed"] and inv["control_fraction"]["severity"] == "WARN"
    assert not inv["assigned_fraction"]["passed"] and inv["assigned_fraction"]["value"] == 0.2
    unfiltered, rep2 = cell_qc(a, filter_cells=False)
    inv2 = {c["name"]: c for c in qc_invariants(unfiltered, rep2)}
    assert not inv2["no_empty_cells"]["passed"] and inv2["no_empty_cells"]["severity"] == "ERROR"


def test_plots_are_pngs(tmp_path):
    from spatial_assets.segmentation.pipeline import segment
    from spatial_assets.segmentation.plots import qc_plots, segmentation_overlay
    from spatial_assets.segmentation.readers import read_sample

    from .conftest import COSMX

    s = read_sample(COSMX)
    r = segment(s, "vendor")
    out, rep = cell_qc(r.cells)
    png = qc_plots(out, rep, path=tmp_path / "qc.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "qc.png").stat().st_size == len(png)
    ov = segmentation_overlay(s, r.boundaries, size_um=60)
    assert ov[:4] == b"\x89PNG" and len(ov) > 10_000
