"""Spot-level samples as the platform reads, deconvolves and clusters them (no Dagster)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.core import schema
from spatial_assets.deconvolution import PROPORTIONS_KEY, SpotSampleError, deconvolve
from spatial_assets.deconvolution.reference import DeconvolutionInputError
from spatial_assets.deconvolution.synthetic import synthetic_bins
from spatial_assets.platform.registry import scan_landing
from spatial_assets.platform.spots import (
    SPOT_DOMAIN,
    SPOT_DOMAIN_TOP_TYPE,
    SPOT_LANDING_PREFIX,
    labels_table,
    prepare_spot_sample,
    read_landed_spots,
    spot_domain_composition,
    spot_domains,
    spot_size,
)
from spatial_assets.storage.stores import LocalStore

LABELS = {"type_00": "Astrocytes", "type_01": "Microglia", "type_02": "Endothelial", "type_03": "Mature oligodendrocyte"}


@pytest.fixture(scope="module")
def case() -> tuple[ad.AnnData, ad.AnnData]:
    spots, ref = synthetic_bins(400, 60, 4, n_reference_cells=40, cells_per_bin=4.0, counts_per_cell=50.0, seed=5)
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str).map(LABELS).astype("category")
    del spots.obsm["true_proportions"]
    return spots, ref


def _land(store: LocalStore, sample_id: str, adata: ad.AnnData, tmp: Path) -> None:
    path = tmp / f"{sample_id}.h5ad"
    adata.write_h5ad(path)
    store.put_file(path, f"{SPOT_LANDING_PREFIX}{sample_id}.h5ad")


def _landed(store: LocalStore, sample_id: str):
    (landed,), _ = scan_landing(store, SPOT_LANDING_PREFIX, sample_id=sample_id)
    return landed


def test_a_marked_h5ad_is_read_with_its_bin_size(case, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    _land(store, "hd1", case[0], tmp_path)
    raw, uri = read_landed_spots(store, _landed(store, "hd1"))
    spots = prepare_spot_sample(raw, sample_id="hd1", source=uri)
    assert uri.endswith("landing/spots/hd1.h5ad") and spots.n_obs == 400
    assert spot_size(spots) == {"kind": "visium_hd_bin", "bin_size_um": 8.0, "center_to_center_um": 8.0}
    assert set(spots.obs[schema.SAMPLE_KEY]) == {"hd1"} and len(spots.uns["content_sha256"]) == 64


def test_an_unmarked_h5ad_is_refused_naming_the_file(case, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    cells = case[0].copy()
    cells.uns.pop("spot")
    _land(store, "cells1", cells, tmp_path)
    with pytest.raises(SpotSampleError, match=r"landing/spots/cells1\.h5ad: not marked as a spot-level sample"):
        read_landed_spots(store, _landed(store, "cells1"))


def test_non_integer_counts_are_refused_before_anything_is_stored(case) -> None:
    bad = case[0].copy()
    X = bad.X.toarray().astype(np.float32)
    X[3, 2] = 0.5
    bad.X = sp.csr_matrix(X)
    with pytest.raises(DeconvolutionInputError, match=r"bad\.h5ad.*non-integer"):
        prepare_spot_sample(bad, sample_id="bad", source="s3://b/landing/spots/bad.h5ad")


def test_a_visium_hd_folder_is_read_at_the_configured_bin_size(tmp_path: Path) -> None:
    from spatial_assets.segmentation.visium_hd import write_synthetic_visium_hd

    folder = tmp_path / "hd"
    write_synthetic_visium_hd(folder, width_um=60.0, height_um=60.0, bin_sizes=(8,), seed=1)
    store = LocalStore(tmp_path / "store")
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and "binned_outputs" in p.parts):
        store.put_file(f, f"{SPOT_LANDING_PREFIX}hd2/{f.relative_to(folder).as_posix()}")
    raw, uri = read_landed_spots(store, _landed(store, "hd2"), bin_size_um=8)
    assert uri.endswith("landing/spots/hd2/")
    assert spot_size(raw)["kind"] == "visium_hd_bin" and spot_size(raw)["bin_size_um"] == 8.0
    assert raw.n_obs == int((raw.obs["in_tissue"] == 1).sum()) > 0
    with pytest.raises(SpotSampleError, match=r"hd2/: not a readable Visium HD output at 16 µm.*present: \[.square_008um.\]"):
        read_landed_spots(store, _landed(store, "hd2"), bin_size_um=16)


def test_spot_domains_use_the_grid_and_composition_sums_to_one(case) -> None:
    spots, ref = case
    out = deconvolve(spots, ref, label_column="cell_type", method="nnls", seed=0)
    doms = spot_domains(out, n_domains=3, seed=0)
    conn = doms.obsp["spatial_connectivities"]
    # square lattice: 4 neighbours at most, and every edge joins lattice neighbours (one step in row or col)
    assert np.asarray((conn > 0).sum(axis=1)).max() == 4
    rows, cols = conn.nonzero()
    ij = doms.obs[["array_row", "array_col"]].to_numpy()
    assert (np.abs(ij[rows] - ij[cols]).sum(axis=1) == 1).all()
    sizes = doms.obs[SPOT_DOMAIN].value_counts().reindex(["D0", "D1", "D2"]).to_numpy()
    assert list(sizes) == sorted(sizes, reverse=True) and sizes.sum() == spots.n_obs
    table = spot_domain_composition(doms, sample_id="hd1")
    np.testing.assert_allclose(table.groupby("domain")["fraction"].sum(), 1.0, atol=1e-6)
    assert set(table[schema.CELL_TYPE_ONTOLOGY_ID]) == set(labels_table(out)[schema.CELL_TYPE_ONTOLOGY_ID])
    assert all(i.startswith("CL:") for i in table[schema.CELL_TYPE_ONTOLOGY_ID])
    # each domain is named by its highest mean proportion
    for d, grp in table.groupby("domain"):
        assert grp[SPOT_DOMAIN_TOP_TYPE].iloc[0] == grp.loc[grp["fraction"].idxmax(), "cell_type"]
    assert (doms.obs[SPOT_DOMAIN_TOP_TYPE].astype(str) == doms.obs[SPOT_DOMAIN].map(
        table.drop_duplicates("domain").set_index("domain")[SPOT_DOMAIN_TOP_TYPE]).astype(str)).all()
    assert PROPORTIONS_KEY in doms.obsm and "domain" not in out.obs  # the input is not modified
    again = spot_domains(out, n_domains=3, seed=0)
    assert (again.obs[SPOT_DOMAIN] == doms.obs[SPOT_DOMAIN]).all()  # seeded
