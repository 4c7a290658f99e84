"""Platform-shift index: composition fit, low without a shift (even with another composition), high
with a simulated platform effect on real PBMC3k data, and the regime / alignment it switches."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from spatial_assets.celltyping.annotation import annotate
from spatial_assets.celltyping.shift import SHIFT_INDEX_THRESHOLD, composition_from_means, dispersion_shift_index
from spatial_assets.celltyping.synthetic import platform_split
from spatial_assets.celltyping.training import train_model
from spatial_assets.core import schema

DATA = Path(__file__).resolve().parents[2] / "data"


def test_composition_from_means_recovers_a_mixture():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 1, size=(5, 40))
    pi = np.array([0.5, 0.05, 0.0, 0.3, 0.15])
    est = composition_from_means(means, pi @ means)
    np.testing.assert_allclose(est, pi, atol=1e-4)
    assert est.min() >= 0 and est.sum() == pytest.approx(1.0)


def test_index_is_zero_for_the_reference_mixture_and_grows_with_a_rescaling():
    rng = np.random.default_rng(1)
    means = rng.normal(0, 1, size=(4, 50))
    variances = rng.uniform(0.2, 1.0, size=(4, 50))
    pi = np.array([0.1, 0.2, 0.3, 0.4])
    mix_mean = pi @ means
    mix_sd = np.sqrt(pi @ (variances + means**2) - mix_mean**2)
    same = dispersion_shift_index(means, variances, mix_mean, mix_sd)
    assert same["index"] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(same["composition"], pi, atol=1e-4)
    scale = np.exp(rng.normal(0, 0.5, size=50))  # per-gene rescaling, as a detection-efficiency change
    shifted = dispersion_shift_index(means, variances, mix_mean, mix_sd * scale)
    assert shifted["index"] == pytest.approx(np.median(np.abs(np.log(scale))), rel=1e-6)


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    p = ad.read_h5ad(DATA / "human_PBMC3k_400genes_seurat_labels.h5ad")
    return p[p.obs["seurat_annotations"].notna()].copy()


@pytest.fixture(scope="module")
def split_none(pbmc):
    """Same platform: the query's counts are the cells' own (efficiency 1, depth 1)."""
    ref, query = platform_split(pbmc, "seurat_annotations", efficiency_sd=0.0, depth=1.0, seed=0)
    return train_model(ref, seed=0), query


def test_same_platform_split_reads_low_even_with_another_composition(split_none):
    model, query = split_none
    out = annotate(query, model)
    info = out.uns[schema.CELLTYPING_UNS]
    assert info["shift_index"] < SHIFT_INDEX_THRESHOLD and not info["platform_shift"]
    assert info["regime"] == "same_platform" and info["alignment"] == "none" and info["threshold_verified"]
    # drop most T cells: a very different composition from the same platform is not a shift
    labels = query.obs["seurat_annotations"].astype(str)
    t = labels.str.contains("CD4|CD8").to_numpy()
    keep = ~t | (np.arange(query.n_obs) % 5 == 0)
    skewed = annotate(query[keep].copy(), model).uns[schema.CELLTYPING_UNS]
    assert skewed["shift_index"] < SHIFT_INDEX_THRESHOLD and skewed["regime"] == "same_platform"
    # and the composition fitted from gene means follows the change
    t_classes = [k for k in model.classes if "T" in k]
    assert sum(skewed["composition_from_means"][k] for k in t_classes) < sum(info["composition_from_means"][k] for k in t_classes)


def test_simulated_platform_effect_reads_high_and_switches_alignment_and_regime(pbmc):
    ref, query = platform_split(pbmc, "seurat_annotations", efficiency_sd=0.5, depth=0.3, seed=0)
    model = train_model(ref, seed=0)
    out = annotate(query, model)
    info = out.uns[schema.CELLTYPING_UNS]
    assert info["shift_index"] > SHIFT_INDEX_THRESHOLD and info["platform_shift"]
    assert info["regime"] == "shifted" and info["alignment"] == "recenter"
    assert not info["threshold_verified"] and "unverified" in info["threshold_note"]
    assert info["reg_per_cell"] >= model.regime("same_platform")["reg_per_cell"]  # stronger shrinkage
    # the switch pays: the chosen handling beats the reference scaler with the same-platform model
    truth = query.obs["seurat_annotations"].astype(str).to_numpy()
    plain = annotate(query, model, regime="same_platform", alignment="none")
    acc = lambda a: (a.obs[schema.PREDICTED].astype(str).to_numpy() == truth).mean()  # noqa: E731
    assert acc(out) > acc(plain)


def test_too_few_cells_is_not_measured_and_stays_same_platform(split_none):
    model, query = split_none
    info = annotate(query[:20].copy(), model).uns[schema.CELLTYPING_UNS]
    assert np.isnan(info["shift_index"]) and info["regime"] == "same_platform" and "not measurable" in info["regime_reason"]
