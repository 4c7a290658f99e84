"""Annotation: outputs, calibrated confidence beyond the K=2 cap, gene checks, batching, no mutation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from spatial_assets.core import schema
from spatial_assets.celltyping.annotation import GeneMismatchError, annotate
from spatial_assets.celltyping.training import train_model


def _counts(rng, labels, mu, shape=4.0):
    return rng.poisson(rng.gamma(shape, mu[labels] / shape)).astype(np.float32)


def _lognorm(c):
    return np.log1p(c / np.maximum(c.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)


def _pair(k=2, n_ref=300, n_q=2000, n_genes=30, seed=0, efficiency_sd=0.0, overlap=1.5, base=3.0, depth=0.3):
    """Reference (log1p) and raw-count query; classes differ by a marker block of height ``overlap``."""
    rng = np.random.default_rng(seed)
    mu = np.full((k, n_genes), float(base))
    for i in range(k):
        mu[i, i * 5 : i * 5 + 5] *= overlap
    yr = np.repeat(np.arange(k), n_ref // k)
    yq = rng.choice(k, size=n_q, p=np.linspace(1, 2, k) / np.linspace(1, 2, k).sum())
    genes = [f"G{i}" for i in range(n_genes)]
    ref = AnnData(
        X=sp.csr_matrix(_lognorm(_counts(rng, yr, mu))),
        obs=pd.DataFrame({"cell_type": [f"type{i}" for i in yr]}, index=[f"r{i}" for i in range(len(yr))]),
        var=pd.DataFrame(index=genes),
    )
    eff = np.exp(rng.normal(0, efficiency_sd, size=n_genes))
    q = AnnData(
        X=sp.csr_matrix(_counts(rng, yq, mu * eff * depth)),
        obs=pd.DataFrame({"truth": [f"type{i}" for i in yq]}, index=[f"q{i}" for i in range(n_q)]),
        var=pd.DataFrame(index=genes),
    )
    q.obsm["spatial"] = rng.uniform(0, 100, size=(n_q, 2))
    return ref, q


def test_outputs_and_calibrated_confidence_for_two_classes():
    ref, q = _pair(k=2, overlap=2.5)
    model = train_model(ref, seed=0)
    out = annotate(q, model, confidence_threshold=0.9, alignment="none")
    conf = out.obs[schema.CONFIDENCE].to_numpy()
    # SpatialCore-style z-score confidence is stuck in [0.5, sigmoid(1)=0.731] for K=2; ours spans [0.5, 1]
    assert conf.min() >= 0.5 and conf.max() <= 1.0
    assert np.quantile(conf, 0.9) > 0.9 and conf.min() < 0.731
    assert (conf > 0.731).mean() > 0.5
    acc = (out.obs[schema.PREDICTED].astype(str).to_numpy() == out.obs["truth"].to_numpy()).mean()
    assert acc > 0.8
    unassigned = out.obs[schema.CELL_TYPE].astype(str) == schema.UNASSIGNED
    np.testing.assert_array_equal(unassigned.to_numpy(), conf < 0.9)
    assert 0 < unassigned.mean() < 1
    assert (out.obs.loc[unassigned, schema.CELL_TYPE_ONTOLOGY_ID].astype(str) == "unknown").all()
    scores = out.obsm[schema.DECISION_SCORES_OBSM]
    assert scores.dtype == np.float32 and scores.shape == (q.n_obs, 2)
    assert out.uns[schema.CELLTYPING_UNS]["classes"] == ["type0", "type1"]
    raw = out.obs[schema.CONFIDENCE_RAW].to_numpy()
    np.testing.assert_allclose(raw, 1 / (1 + np.exp(-scores.max(1))), rtol=1e-5)
    assert out.uns[schema.LABEL_MAP_UNS] == {"type0": ["type0"], "type1": ["type1"]}


def test_confident_cells_are_more_often_right():
    ref, q = _pair(k=4, overlap=1.4, efficiency_sd=0.3, seed=2)
    out = annotate(q, train_model(ref), confidence_threshold=0.5)
    right = out.obs[schema.PREDICTED].astype(str).to_numpy() == out.obs["truth"].to_numpy()
    conf = out.obs[schema.CONFIDENCE].to_numpy()
    hi = conf >= np.median(conf)
    assert right[hi].mean() > right[~hi].mean() + 0.05


def test_batching_does_not_change_calls_and_input_is_not_mutated():
    ref, q = _pair(k=3)
    before = q.X.copy()
    cols = list(q.obs.columns)
    model = train_model(ref)
    a = annotate(q, model, batch_size=97)
    b = annotate(q, model, batch_size=100_000)
    np.testing.assert_array_equal(a.obs[schema.PREDICTED].to_numpy(), b.obs[schema.PREDICTED].to_numpy())
    np.testing.assert_allclose(a.obsm[schema.DECISION_SCORES_OBSM], b.obsm[schema.DECISION_SCORES_OBSM], rtol=1e-5, atol=1e-5)
    assert list(q.obs.columns) == cols and schema.DECISION_SCORES_OBSM not in q.obsm
    assert (q.X != before).nnz == 0


def test_missing_model_gene_is_an_error_naming_it():
    ref, q = _pair(k=2)
    model = train_model(ref)
    with pytest.raises(GeneMismatchError, match="G7") as err:
        annotate(q[:, [g for g in q.var_names if g != "G7"]].copy(), model)
    assert "29/30" in str(err.value)


def test_recentering_fixes_a_per_gene_platform_shift_and_auto_picks_it():
    # strong per-gene detection efficiency differences: the reference scaler misplaces the query
    ref, q = _pair(k=4, overlap=2.0, efficiency_sd=1.0, seed=5, base=10, depth=1.0)
    model = train_model(ref)
    truth = q.obs["truth"].to_numpy()
    acc, info = {}, {}
    for mode in ("none", "recenter", "auto"):
        out = annotate(q, model, alignment=mode)
        acc[mode] = (out.obs[schema.PREDICTED].astype(str).to_numpy() == truth).mean()
        info[mode] = out.uns[schema.CELLTYPING_UNS]
    assert acc["recenter"] > acc["none"] + 0.2
    auto = info["auto"]
    # the measured index sees the shift and switches both alignment and regime on, and says why
    assert auto["shift_index"] > auto["shift_index_threshold"] and auto["platform_shift"]
    assert auto["alignment"] == "recenter" and auto["regime"] == "shifted"
    assert "platform shift" in auto["regime_reason"]
    assert acc["auto"] == acc["recenter"]
    # a forced alignment is recorded as forced; the regime still follows the index
    assert info["none"]["alignment_requested"] == "none" and info["none"]["regime"] == "shifted"


def test_no_platform_shift_means_no_alignment_and_the_cross_validated_regime():
    ref, q = _pair(k=4, overlap=2.0, efficiency_sd=0.0, seed=6, base=10, depth=1.0)
    model = train_model(ref)
    truth = q.obs["truth"].to_numpy()
    out = annotate(q, model)
    info = out.uns[schema.CELLTYPING_UNS]
    assert info["shift_index"] < info["shift_index_threshold"] and not info["platform_shift"]
    assert info["alignment"] == "none" and info["regime"] == "same_platform"
    none = annotate(q, model, alignment="none", regime="same_platform")
    np.testing.assert_array_equal(out.obsm[schema.DECISION_SCORES_OBSM], none.obsm[schema.DECISION_SCORES_OBSM])
    assert (out.obs[schema.PREDICTED].astype(str).to_numpy() == truth).mean() > 0.85
    # the query's composition differs from the reference's (1:2 ramp vs balanced): not a shift
    est = info["composition_from_means"]
    assert est["type3"] > est["type0"]


def test_streamed_gene_subset_equals_annotating_the_exact_panel():
    """Extra, permuted query genes are cut per batch: same calls and scores as the exact panel."""
    ref, q = _pair(k=3, seed=9, efficiency_sd=0.5)
    model = train_model(ref)
    rng = np.random.default_rng(1)
    extra = sp.csr_matrix(rng.poisson(2.0, size=(q.n_obs, 7)).astype(np.float32))
    wide = AnnData(
        X=sp.hstack([extra, q.X], format="csr"),
        obs=q.obs.copy(),
        var=pd.DataFrame(index=[f"X{i}" for i in range(7)] + list(q.var_names)),
    )
    perm = rng.permutation(wide.n_vars)
    wide = wide[:, perm].copy()
    a = annotate(q, model, batch_size=333)
    b = annotate(wide, model, batch_size=500)
    np.testing.assert_array_equal(a.obs[schema.PREDICTED].to_numpy(), b.obs[schema.PREDICTED].to_numpy())
    np.testing.assert_allclose(a.obsm[schema.DECISION_SCORES_OBSM], b.obsm[schema.DECISION_SCORES_OBSM], rtol=1e-4, atol=1e-4)
    # the library size is over the model genes only, so the extra genes change nothing
    assert b.uns[schema.CELLTYPING_UNS]["normalization"]["method"] == "from_raw_counts"
