"""``deconvolve`` end to end: proportions, dominant type and CL ids, lineage, bad inputs, the check."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.deconvolution import (
    DOMINANT,
    DOMINANT_ID,
    PROPORTIONS_KEY,
    RESIDUAL,
    STATUS,
    DeconvolutionInputError,
    check_proportions,
    deconvolve,
    mean_proportions,
)
from spatial_assets.deconvolution.synthetic import TRUTH_KEY
from spatial_assets_tests.deconvolution.conftest import truth_r


@pytest.fixture(scope="module")
def default_result(small_case):
    spots, ref = small_case
    return deconvolve(spots, ref, label_column="cell_type", seed=0)


def test_default_method_recovers_the_composition(small_case, default_result) -> None:
    spots, ref = small_case
    out = default_result
    P = out.obsm[PROPORTIONS_KEY]
    assert isinstance(P, pd.DataFrame) and list(P.columns) == sorted(ref.obs["cell_type"].unique())
    assert P.index.equals(spots.obs_names)
    assert check_proportions(out).passed
    assert truth_r(out, spots) > 0.9
    # the dominant call is the largest share, with its Cell Ontology id
    assert (out.obs[DOMINANT].astype(str).to_numpy() == P.idxmax(axis=1).to_numpy()).all()
    ids = dict(zip(out.obs[DOMINANT].astype(str), out.obs[DOMINANT_ID].astype(str)))
    assert ids["Astrocytes"] == "CL:0000127" and ids["Microglia"] == "CL:0000129"
    info = out.uns["deconvolution"]
    assert info["method"] == "platform_nb" and info["units"] == "cells" and info["seed"] == 0
    assert dict(zip(info["labels"]["label"], info["labels"]["ontology_term_id"]))["Endothelial"] == "CL:0000115"
    assert {"flashdeconv", "numpy", "anndata"} <= set(info["library_versions"])
    assert info["n_spots_fitted"] == spots.n_obs and (out.obs[STATUS] == "fitted").all()
    assert out.obs[RESIDUAL].between(0, 1).all() and float(out.obs[RESIDUAL].mean()) < 0.2
    # the caller's object is untouched; the matrix is shared, not copied
    assert PROPORTIONS_KEY not in spots.obsm and out.X is spots.X
    means = mean_proportions(out)
    np.testing.assert_allclose(means.sum(), 1.0)
    np.testing.assert_allclose(means.sort_index().to_numpy(), spots.obsm[TRUTH_KEY].mean().sort_index().to_numpy(), atol=0.03)


def test_result_writes_and_reads_back(default_result, tmp_path: Path) -> None:
    default_result.write_h5ad(tmp_path / "d.h5ad")
    back = ad.read_h5ad(tmp_path / "d.h5ad")
    pd.testing.assert_frame_equal(back.obsm[PROPORTIONS_KEY], default_result.obsm[PROPORTIONS_KEY])
    assert check_proportions(back).passed


@pytest.mark.parametrize("method", ["nnls", "flashdeconv"])
def test_other_methods_give_valid_proportions(small_case, default_result, method: str) -> None:
    spots, ref = small_case
    out = deconvolve(spots, ref, label_column="cell_type", method=method, seed=0)
    assert check_proportions(out).passed
    assert out.uns["deconvolution"]["method"] == method
    r = truth_r(out, spots)
    assert 0.6 < r <= truth_r(default_result, spots) + 0.01


def test_deterministic_and_units(small_case, default_result) -> None:
    spots, ref = small_case
    again = deconvolve(spots, ref, label_column="cell_type", seed=0)
    pd.testing.assert_frame_equal(again.obsm[PROPORTIONS_KEY], default_result.obsm[PROPORTIONS_KEY])
    tr = deconvolve(spots, ref, label_column="cell_type", units="transcripts")
    size = pd.Series(tr.uns["deconvolution"]["labels"]["mean_counts_per_cell"], index=tr.uns["deconvolution"]["labels"]["label"])
    expected = default_result.obsm[PROPORTIONS_KEY] * size
    expected = expected.div(expected.sum(axis=1), axis=0)
    np.testing.assert_allclose(tr.obsm[PROPORTIONS_KEY].to_numpy(), expected.to_numpy(), atol=1e-9)
    assert tr.uns["deconvolution"]["units"] == "transcripts"


def test_reference_from_a_file_and_from_a_training_set(small_case, default_result, tmp_path: Path) -> None:
    spots, ref = small_case
    path = tmp_path / "ref.h5ad"
    ref.write_h5ad(path)
    from_file = deconvolve(spots, str(path), label_column="cell_type")
    np.testing.assert_allclose(from_file.obsm[PROPORTIONS_KEY].to_numpy(), default_result.obsm[PROPORTIONS_KEY].to_numpy(), atol=1e-9)
    assert from_file.uns["deconvolution"]["reference"]["source"] == str(path)
    # a cell-typing training set: log1p in X, counts in layers['counts']
    ts = ref.copy()
    ts.layers["counts"] = ts.X.copy()
    X = ts.X.multiply(1e4 / np.asarray(ts.X.sum(axis=1))).tocsr()
    X.data = np.log1p(X.data)
    ts.X = X
    from_ts = deconvolve(spots, ts, label_column="cell_type")
    np.testing.assert_allclose(from_ts.obsm[PROPORTIONS_KEY].to_numpy(), default_result.obsm[PROPORTIONS_KEY].to_numpy(), atol=1e-9)
    assert from_ts.uns["deconvolution"]["reference"]["counts_source"] == "layers['counts']"


def test_spots_without_counts_get_the_prior_and_a_status(small_case) -> None:
    spots, ref = small_case
    s = spots.copy()
    X = s.X.tolil()
    X[[0, 5], :] = 0
    s.X = X.tocsr()
    out = deconvolve(s, ref, label_column="cell_type", method="nnls")
    assert check_proportions(out).passed
    assert list(out.obs[STATUS].iloc[[0, 5]]) == ["too_few_counts"] * 2 and (out.obs[STATUS] == "fitted").sum() == s.n_obs - 2
    fitted = out.obsm[PROPORTIONS_KEY][out.obs[STATUS] == "fitted"].mean()
    np.testing.assert_allclose(out.obsm[PROPORTIONS_KEY].iloc[0].to_numpy(), (fitted / fitted.sum()).to_numpy())
    assert out.obs[RESIDUAL].iloc[0] == 1.0


# ------------------------------------------------------------------------------------ bad input


def _with_value(spots: ad.AnnData, value: float) -> ad.AnnData:
    s = spots.copy()
    X = s.X.toarray()
    X[7, 3] = value
    s.X = sp.csr_matrix(X)
    return s


def test_negative_counts_are_refused_naming_spot_and_gene(small_case) -> None:
    spots, ref = small_case
    with pytest.raises(DeconvolutionInputError, match=rf"negative values.*{spots.obs_names[7]}.*{spots.var_names[3]}"):
        deconvolve(_with_value(spots, -1.0), ref, label_column="cell_type", name="visium_a.h5ad")


def test_non_integer_counts_are_refused(small_case) -> None:
    spots, ref = small_case
    with pytest.raises(DeconvolutionInputError, match=r"visium_a.h5ad.*non-integer values.*raw integer counts"):
        deconvolve(_with_value(spots, 2.5), ref, label_column="cell_type", name="visium_a.h5ad")
    s = spots.copy()
    X = s.X.multiply(1e4 / np.maximum(np.asarray(s.X.sum(axis=1)), 1)).tocsr()
    X.data = np.log1p(X.data)
    s.X = X
    with pytest.raises(DeconvolutionInputError, match="non-integer"):
        deconvolve(s, ref, label_column="cell_type")


def test_no_shared_gene_is_refused(small_case) -> None:
    spots, ref = small_case
    other = ref.copy()
    other.var_names = [f"ENSMUSG{i:011d}" for i in range(other.n_vars)]
    with pytest.raises(DeconvolutionInputError, match="shares no gene with the spot table"):
        deconvolve(spots, other, label_column="cell_type")


def test_tiny_reference_class_is_refused_naming_it(small_case) -> None:
    spots, ref = small_case
    r = ref.copy()
    labels = r.obs["cell_type"].astype(str).to_numpy()
    labels[:3] = "Fibroblast"
    r.obs["cell_type"] = labels
    with pytest.raises(DeconvolutionInputError, match=r"fewer than 5 cells: 'Fibroblast' \(3 cells\)"):
        deconvolve(spots, r, label_column="cell_type")
    # the same cells as a placeholder label are simply left out
    out = deconvolve(spots, r, label_column="cell_type", placeholder_labels=("Fibroblast",), method="nnls")
    assert "Fibroblast" not in out.obsm[PROPORTIONS_KEY].columns
    assert out.uns["deconvolution"]["reference"]["removed_labels"]["Fibroblast"] == 3


def test_other_reference_problems(small_case) -> None:
    spots, ref = small_case
    with pytest.raises(DeconvolutionInputError, match="label column 'celltype' not found"):
        deconvolve(spots, ref, label_column="celltype")
    logged = ref.copy()
    X = logged.X.multiply(1e4 / np.asarray(logged.X.sum(axis=1))).tocsr()
    X.data = np.log1p(X.data)
    logged.X = X
    with pytest.raises(DeconvolutionInputError, match="no raw counts"):
        deconvolve(spots, logged, label_column="cell_type")
    with pytest.raises(DeconvolutionInputError, match="unknown deconvolution method"):
        deconvolve(spots, ref, label_column="cell_type", method="cell2location")
    few = spots[:, :3].copy()
    with pytest.raises(DeconvolutionInputError, match="shares only 3 genes"):
        deconvolve(few, ref, label_column="cell_type")


def test_check_proportions_reports_what_is_wrong(default_result) -> None:
    out = default_result.copy()
    P = out.obsm[PROPORTIONS_KEY].copy()
    P.iloc[0, 0] = -0.1
    P.iloc[1, 1] = np.nan
    P.iloc[2] = P.iloc[2] * 0.5
    out.obsm[PROPORTIONS_KEY] = P
    rep = check_proportions(out)
    assert not rep.passed
    assert (rep.n_negative, rep.n_nan) == (1, 1) and rep.n_rows_not_summing_to_1 == 3
    assert any("negative" in p for p in rep.problems) and rep.to_dict()["n_spots"] == out.n_obs
    del out.obsm[PROPORTIONS_KEY]
    assert check_proportions(out).problems == [f"obsm['{PROPORTIONS_KEY}'] is missing"]


def test_platform_nb_variants_and_their_record(small_case) -> None:
    spots, ref = small_case
    out = deconvolve(spots, ref, label_column="cell_type", method_params={"variance": "reference"})
    assert check_proportions(out).passed and truth_r(out, spots) > 0.9
    params = out.uns["deconvolution"]["parameters"]
    assert params["variance"] == "reference" and params["n_genes_used"] == spots.n_vars
    with pytest.raises(DeconvolutionInputError, match="variance must be"):
        deconvolve(spots, ref, label_column="cell_type", method_params={"variance": "gamma"})
    with pytest.raises(DeconvolutionInputError, match=r"unknown method parameter\(s\) \['sketch'\]"):
        deconvolve(spots, ref, label_column="cell_type", method="flashdeconv", method_params={"sketch": 3})
