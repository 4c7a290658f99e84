"""Small spot samples with a known composition, shared by the deconvolution tests."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from spatial_assets.deconvolution.synthetic import TRUTH_KEY, synthetic_bins

#: real labels, so the Cell Ontology mapping is exercised (type_00 → Astrocytes …)
LABELS = {"type_00": "Astrocytes", "type_01": "Microglia", "type_02": "Endothelial", "type_03": "Mature oligodendrocyte"}


def _relabel(spots: ad.AnnData, ref: ad.AnnData) -> tuple[ad.AnnData, ad.AnnData]:
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str).map(LABELS).astype("category")
    spots.obsm[TRUTH_KEY] = spots.obsm[TRUTH_KEY].rename(columns=LABELS)
    return spots, ref


@pytest.fixture(scope="session")
def small_case() -> tuple[ad.AnnData, ad.AnnData]:
    """900 Visium-like bins (≈4 cells, ≈200 counts each) × 60 genes, 4 types; 40 reference cells per type."""
    spots, ref = synthetic_bins(900, 60, 4, n_reference_cells=40, cells_per_bin=4.0, counts_per_cell=50.0, seed=3)
    return _relabel(spots, ref)


def truth_r(out: ad.AnnData, spots: ad.AnnData) -> float:
    """Mean per-spot Pearson r of the proportions with the truth."""
    T = spots.obsm[TRUTH_KEY]
    P = out.obsm["cell_type_proportions"][T.columns].to_numpy()
    T = T.to_numpy()
    Pc, Tc = P - P.mean(1, keepdims=True), T - T.mean(1, keepdims=True)
    return float(np.nanmean((Pc * Tc).sum(1) / np.sqrt((Pc**2).sum(1) * (Tc**2).sum(1))))
