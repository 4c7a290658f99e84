"""End-to-end cell typing on the real POA pair (acceptance thresholds), determinism and bad inputs."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.core import schema
from spatial_assets.celltyping.pipeline import (
    POA_LABEL_MAP,
    POA_PLACEHOLDERS,
    run_celltyping,
    score_against_labels,
    validate_spatial,
)
from spatial_assets.celltyping.references import DEFAULT_PLACEHOLDER_LABELS, ReferenceSpec
from spatial_assets.celltyping.training import model_bytes

PLACEHOLDERS = tuple(DEFAULT_PLACEHOLDER_LABELS) + POA_PLACEHOLDERS


@pytest.fixture(scope="module")
def poa_result(poa_reference_path, load_merfish):
    return run_celltyping([ReferenceSpec(str(poa_reference_path), "cell_type")], load_merfish(), placeholder_labels=PLACEHOLDERS, seed=0)


def test_poa_acceptance_thresholds(poa_result):
    out = poa_result.annotated
    s = score_against_labels(
        out.obs[schema.PREDICTED],
        out.obs["Cell_class_major"],
        POA_LABEL_MAP,
        confidence=out.obs[schema.CONFIDENCE],
        class_origins=out.uns[schema.LABEL_MAP_UNS],
    )
    assert s["n_scored"] == 9619  # data/README.md: Ambiguous cells not scored
    assert s["accuracy"] >= 0.75
    assert s["balanced_accuracy"] >= 0.80
    assert s["confidence_auroc"] >= 0.80
    # Blank probes are not model genes; placeholders are not classes
    assert not any(g.startswith("Blank") for g in poa_result.model.genes)
    assert len(poa_result.model.genes) == 134
    origins = {o for v in out.uns[schema.LABEL_MAP_UNS].values() for o in v}
    assert "Ambiguous" not in origins and "Unstable" not in origins and len(origins) == 12


def test_same_inputs_same_model_bytes_and_calls(poa_result, poa_reference_path, load_merfish):
    again = run_celltyping([ReferenceSpec(str(poa_reference_path), "cell_type")], load_merfish(), placeholder_labels=PLACEHOLDERS, seed=0)
    assert model_bytes(again.model) == model_bytes(poa_result.model)
    np.testing.assert_array_equal(
        again.annotated.obs[schema.CELL_TYPE].to_numpy(), poa_result.annotated.obs[schema.CELL_TYPE].to_numpy()
    )
    np.testing.assert_array_equal(
        again.annotated.obsm[schema.DECISION_SCORES_OBSM], poa_result.annotated.obsm[schema.DECISION_SCORES_OBSM]
    )


def test_score_against_labels_by_hand():
    s = score_against_labels(
        ["A", "A", "B", "C", "B"], ["x", "y", "y", "x", "Ambiguous"], {"A": "x", "B": "y", "C": None}, confidence=[0.9, 0.2, 0.8, 0.1, 0.5]
    )
    assert s["n_scored"] == 4
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["balanced_accuracy"] == pytest.approx(0.5)  # x: 1/2, y: 1/2
    assert s["confidence_auroc"] == pytest.approx(1.0)


# ----------------------------------------------------------------- bad inputs


def _ref(tmp_path: Path, X, labels, name="ref.h5ad", genes=None, layers=None) -> str:
    n, g = X.shape
    a = ad.AnnData(
        X=X,
        obs=pd.DataFrame({"label": labels}, index=[f"c{i}" for i in range(n)]),
        var=pd.DataFrame(index=genes or [f"G{i}" for i in range(g)]),
        layers=layers or {},
    )
    path = tmp_path / name
    a.write_h5ad(path)
    return str(path)


def _spatial(n=200, g=20, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    a = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(3, size=(n, g)).astype(np.float32)),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(g)]),
    )
    a.obsm["spatial"] = rng.uniform(0, 10, size=(n, 2))
    return a


def _counts(n=120, g=20, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.poisson(3, size=(n, g)).astype(np.float32)
    labels = np.array(["A", "B"] * (n // 2))
    X[labels == "A", :3] += 20
    return X, labels


def _assert_no_files(tmp_path: Path, before: set[Path]) -> None:
    assert set(tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "case",
    ["missing_label_column", "zero_shared_genes", "zscored_no_raw", "log1p_cpm_no_raw", "empty_after_filter", "single_class"],
)
def test_bad_reference_inputs_raise_clear_errors(tmp_path, case):
    X, labels = _counts()
    spatial = _spatial()
    label_column = "label"
    if case == "missing_label_column":
        path, label_column, expect = _ref(tmp_path, sp.csr_matrix(X), labels), "celltype", "celltype"
    elif case == "zero_shared_genes":
        path, expect = _ref(tmp_path, sp.csr_matrix(X), labels, genes=[f"X{i}" for i in range(20)]), "shares no gene"
    elif case == "zscored_no_raw":
        Z = (X - X.mean(0)) / X.std(0)
        path, expect = _ref(tmp_path, Z.astype(np.float32), labels), "negative|z-scored|scaled"
    elif case == "log1p_cpm_no_raw":
        L = np.log1p(X / X.sum(1, keepdims=True) * 1e6)
        path, expect = _ref(tmp_path, sp.csr_matrix(L.astype(np.float32)), labels), "CPM"
    elif case == "empty_after_filter":
        path, expect = _ref(tmp_path, sp.csr_matrix(X), np.array(["Unknown"] * len(labels))), "no cells left|Unknown"
    else:
        path, expect = _ref(tmp_path, sp.csr_matrix(X), np.array(["A"] * len(labels))), "single|'A'"
    before = set(tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=expect) as err:
        run_celltyping([ReferenceSpec(path, label_column)], spatial)
    if case != "single_class":
        assert "ref.h5ad" in str(err.value)
    _assert_no_files(tmp_path, before)


def test_bad_spatial_inputs(tmp_path):
    X, labels = _counts()
    path = _ref(tmp_path, sp.csr_matrix(X), labels)
    dup = _spatial()
    dup.obs_names = ["s0"] + list(dup.obs_names[1:-1]) + ["s0"]
    with pytest.raises(ValueError, match="duplicate cell ids.*s0"):
        run_celltyping([ReferenceSpec(path, "label")], dup, spatial_name="sample.h5ad")
    nan = _spatial()
    nan.obsm["spatial"][5, 1] = np.nan
    with pytest.raises(ValueError, match=r"sample.h5ad.*obsm\['spatial'\].*NaN.*'s5'"):
        validate_spatial(nan, "sample.h5ad")
    text = _spatial()
    text.obsm["spatial"] = np.array([["a", "b"]] * text.n_obs, dtype=object)
    with pytest.raises(ValueError, match=r"sample.h5ad.*non-numeric"):
        validate_spatial(text, "sample.h5ad")


def test_platform_split_thins_the_query_and_is_seeded(load_pbmc):
    """PBMC3k second case: labelled cells only, query depth ≈ depth * E[lognormal] of the original."""
    from spatial_assets.celltyping.synthetic import platform_split

    pbmc = load_pbmc()
    ref, q = platform_split(pbmc, "seurat_annotations", seed=0)
    ref2, q2 = platform_split(pbmc, "seurat_annotations", seed=0)
    assert ref.n_obs + q.n_obs == int(pbmc.obs["seurat_annotations"].notna().sum()) == 2638
    assert list(q.obs_names) == list(q2.obs_names) and (q.X != q2.X).nnz == 0
    orig = np.asarray(pbmc[q.obs_names].X.sum(axis=1)).ravel()
    ratio = np.asarray(q.X.sum(axis=1)).ravel().sum() / orig.sum()
    assert 0.40 < ratio < 0.5 * np.exp(0.5**2 / 2) + 0.01  # E[0.5 * lognormal(0, 0.5)], clipped at 1
    np.testing.assert_allclose(np.expm1(ref.X.toarray()).sum(axis=1), 1e4, rtol=1e-3)
    with pytest.raises(ValueError, match="no obs column 'nope'"):
        platform_split(pbmc, "nope")
