"""The synthetic generator's truth, the Visium HD reader and bins → cells, fingerprints and staging."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from spatial_assets.segmentation.errors import SegmentationInputError


def test_synthetic_truth_is_as_specified(synthetic_folder):
    summ = json.loads((synthetic_folder / "synthetic.json").read_text())
    truth = pd.read_csv(synthetic_folder / "truth_cells.csv")
    tx = pd.read_csv(synthetic_folder / "detected_transcripts.csv", index_col=0)
    assert summ["background_fraction"] == pytest.approx(0.10, abs=0.01)
    assert truth["expansion_um"].between(2, 9).all() and truth["expansion_um"].std() > 1.5
    assert 0.05 < truth["dim"].mean() < 0.3 and truth["in_band"].any() and (~truth["in_band"]).any()
    # touching nuclei in the band: the gap to the nearest nucleus (centre distance minus mean radii)
    # is about zero there and several µm elsewhere
    from scipy.spatial import cKDTree

    def gaps(t):
        d, j = cKDTree(t[["x", "y"]]).query(t[["x", "y"]], k=2)
        r = ((t["a"] + t["b"]) / 2).to_numpy()
        return d[:, 1] - r - r[j[:, 1]]

    assert np.median(gaps(truth[truth["in_band"]])) < 1.0
    assert np.median(gaps(truth[~truth["in_band"]])) > 5.0
    # marker genes: each type's markers are enriched in its own cells
    cell_type = truth.set_index("cell_id")["cell_type"]
    own = tx[tx["cell_id"] != "-1"]
    t0 = own[own["cell_id"].map(cell_type) == "type0"]["gene"]
    assert t0.str.startswith("Mk0_").mean() > 3 * own["gene"].str.startswith("Mk0_").mean() / 2


def test_visium_hd_bins_and_cells(tmp_path):
    import geopandas as gpd

    from spatial_assets.segmentation.visium_hd import bins_to_cells, read_visium_hd_bins, write_synthetic_visium_hd

    write_synthetic_visium_hd(tmp_path / "vhd", width_um=80, height_um=80, seed=2)
    b8 = read_visium_hd_bins(tmp_path / "vhd", 8)
    assert b8.uns["spot"] == {"kind": "visium_hd_bin", "bin_size_um": 8}
    assert {"array_row", "array_col"} <= set(b8.obs.columns)
    assert np.allclose(b8.obsm["spatial"] - 8 * (b8.obs[["array_col", "array_row"]].to_numpy() + 0.5), 0, atol=1e-6)
    b2 = read_visium_hd_bins(tmp_path / "vhd", 2)
    assert int(b2.X.sum()) == int(b8.X.sum())
    nuclei = gpd.read_parquet(tmp_path / "vhd" / "truth_nuclei.parquet")
    cells = bins_to_cells(b2, nuclei, expand_um=5.0)
    truth = pd.read_csv(tmp_path / "vhd" / "truth_bins_002um.csv").set_index("barcode")["cell_id"]
    # a cell's counts come mostly from bins its own cell produced
    per_cell_true = truth.loc[b2.obs_names].value_counts()
    assert cells.n_obs >= 0.9 * len(nuclei) and (cells.obs["n_bins"] > 0).all()
    assert int(cells.X.sum()) <= int(b2.X.sum())
    assert cells.obs["n_bins"].median() == pytest.approx(per_cell_true.drop("-1", errors="ignore").median(), rel=0.35)
    with pytest.raises(SegmentationInputError, match="2 µm bins"):
        bins_to_cells(b8, nuclei)
    with pytest.raises(SegmentationInputError, match="no 16 µm bins"):
        read_visium_hd_bins(tmp_path / "vhd", 16)


def test_fingerprints_and_staging(tmp_path):
    from spatial_assets.segmentation.fingerprint import fingerprint_files, stage_files

    from .conftest import XENIUM

    fp = fingerprint_files(XENIUM)
    assert set(fp) >= {"experiment.xenium", "transcripts.parquet"} and all(len(v["sha256"]) == 64 for v in fp.values())
    staged = stage_files([(k, XENIUM / k) for k in fp], tmp_path / "stage")
    assert fingerprint_files(staged) == fp
    with pytest.raises(SegmentationInputError, match="unsafe key"):
        stage_files([("../x", XENIUM / "experiment.xenium")], tmp_path / "s2")


def test_he_nuclei_through_rgb2hed():
    """An H&E-like image (purple nuclei on pink) gives one nucleus per painted nucleus."""
    from spatial_assets.segmentation.visium_hd import nuclei_from_image

    rng = np.random.default_rng(3)
    px = 0.5
    h = w = 240
    yy, xx = np.mgrid[0:h, 0:w] * px
    centres = [(15 + 20 * i, 15 + 20 * j) for i in range(5) for j in range(5)]
    inside = np.zeros((h, w), bool)
    for cx, cy in centres:
        inside |= (xx - cx) ** 2 + (yy - cy) ** 2 < 4.0**2
    rgb = np.where(inside[..., None], [95, 60, 150], [235, 170, 200]).astype(float)
    rgb = np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    nuclei = nuclei_from_image(rgb, np.array([[px, 0, 0], [0, px, 0], [0, 0, 1.0]]))
    assert len(nuclei) == 25
    assert nuclei.area.median() == pytest.approx(np.pi * 16, rel=0.3)
