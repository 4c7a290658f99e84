"""Normalization detection and log1p-10k conversion, on the bundled real data and on synthetic
matrices whose scale is known by construction."""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatial_assets.core.normalization import (
    NormalizationError,
    NormalizationStatus,
    detect_normalization,
    ensure_normalized,
    is_count_matrix,
)


def synthetic_counts(n_cells: int = 600, n_genes: int = 200, seed: int = 0) -> ad.AnnData:
    """Poisson counts with log-normal gene means and a 10× spread of library sizes."""
    rng = np.random.default_rng(seed)
    gene_mean = rng.lognormal(mean=-1.0, sigma=1.2, size=n_genes)
    size_factor = rng.uniform(0.5, 5.0, size=n_cells)
    counts = rng.poisson(np.outer(size_factor, gene_mean)).astype(np.float32)
    counts[0, :] = 0  # one empty cell: must stay zero, not NaN
    obs = pd.DataFrame({"label": rng.choice(["a", "b"], n_cells)}, index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"G{j}" for j in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


def log1p_scaled(X: sp.csr_matrix, target: float) -> sp.csr_matrix:
    """Independent reference implementation (float64) of log1p(normalize_total)."""
    X = sp.csr_matrix(X, dtype=np.float64)
    sums = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(target, sums, out=np.zeros_like(sums), where=sums > 0)
    out = sp.diags(scale) @ X
    out.data = np.log1p(out.data)
    return sp.csr_matrix(out)


def expm1_row_sums(X) -> np.ndarray:
    Y = sp.csr_matrix(X, dtype=np.float64, copy=True)
    Y.data = np.expm1(Y.data)
    return np.asarray(Y.sum(axis=1)).ravel()


# ------------------------------------------------------------------------- real data


@pytest.mark.parametrize("loader", ["load_poa_reference", "load_starmap", "load_pbmc"])
def test_real_raw_count_datasets_are_raw(loader: str, request: pytest.FixtureRequest) -> None:
    adata = request.getfixturevalue(loader)()
    st = detect_normalization(adata)
    assert st.raw_source == "X"
    assert st.x_state == "raw"
    assert st.integer_fraction == 1.0
    assert st.is_usable
    # POA (1,308 cells) is sampled in full, so the median is exact
    if adata.n_obs <= st.n_rows_sampled:
        assert st.median_row_sum == pytest.approx(float(np.median(np.asarray(adata.X.sum(axis=1)).ravel())))
    assert st.n_sampled == min(10_000, adata.X.nnz)


def test_real_merfish_per_volume_is_linear(load_merfish) -> None:
    adata = load_merfish()
    st = detect_normalization(adata)
    assert st.x_state == "linear"
    assert st.raw_source is None
    assert st.integer_fraction < 0.01
    assert st.max_value > 25
    assert st.is_usable
    out = ensure_normalized(adata)
    ref = log1p_scaled(adata.X, 1e4)
    np.testing.assert_allclose(out.X.toarray(), ref.toarray(), rtol=1e-5, atol=1e-5)
    assert out.uns["normalization"]["source_state"] == "linear"
    assert out.uns["normalization"]["method"] == "from_linear"
    assert "counts" not in out.layers


# ------------------------------------------------------------------------- synthetic states


def test_log1p_10k_and_cpm_and_other() -> None:
    a = synthetic_counts()
    ten_k = ad.AnnData(log1p_scaled(a.X, 1e4).astype(np.float32), obs=a.obs, var=a.var)
    cpm = ad.AnnData(log1p_scaled(a.X, 1e6).astype(np.float32), obs=a.obs, var=a.var)
    plain = a.copy()
    plain.X = plain.X.copy()
    plain.X.data = np.log1p(plain.X.data)

    s10 = detect_normalization(ten_k)
    assert (s10.x_state, s10.raw_source) == ("log1p_10k", None)
    assert s10.median_row_sum == pytest.approx(1e4, rel=1e-4)
    assert s10.is_usable
    scpm = detect_normalization(cpm)
    assert scpm.x_state == "log1p_cpm"
    assert scpm.median_row_sum == pytest.approx(1e6, rel=1e-4)
    assert not scpm.is_usable
    sother = detect_normalization(plain)
    assert sother.x_state == "log1p_other"
    lib = np.asarray(a.X.sum(axis=1)).ravel()
    assert sother.median_row_sum == pytest.approx(float(np.median(lib[lib > 0])), rel=1e-4)


def test_zscored_is_negative_and_refused() -> None:
    a = synthetic_counts()
    dense = log1p_scaled(a.X, 1e4).toarray()
    z = (dense - dense.mean(0)) / (dense.std(0) + 1e-9)
    st = detect_normalization(ad.AnnData(z.astype(np.float32)))
    assert st.x_state == "negative"
    assert st.raw_source is None
    assert not st.is_usable
    with pytest.raises(NormalizationError, match=r"negative values .*no raw counts were found in layers\['counts'\]"):
        ensure_normalized(ad.AnnData(z.astype(np.float32)))


def test_log1p_cpm_without_raw_is_refused_with_state_in_message() -> None:
    a = synthetic_counts()
    cpm = ad.AnnData(log1p_scaled(a.X, 1e6).astype(np.float32))
    with pytest.raises(NormalizationError) as err:
        ensure_normalized(cpm)
    msg = str(err.value)
    assert "log1p CPM" in msg and "1.0e+06" in msg
    for where in ("layers['counts']", "layers['raw_counts']", "layers['raw']", "raw.X"):
        assert where in msg


def test_unsafe_force_warns_and_rescales_cpm_exactly(caplog: pytest.LogCaptureFixture) -> None:
    a = synthetic_counts()
    cpm = ad.AnnData(log1p_scaled(a.X, 1e6).astype(np.float32))
    with caplog.at_level(logging.WARNING, logger="spatial_assets.core.normalization"):
        out = ensure_normalized(cpm, unsafe_force=True)
    assert any(r.levelno == logging.WARNING and "UNSAFE" in r.getMessage() for r in caplog.records)
    # log1p of per-cell scaled counts: rescaling expm1(X) recovers the from-counts result
    np.testing.assert_allclose(out.X.toarray(), log1p_scaled(a.X, 1e4).toarray(), rtol=1e-4, atol=1e-4)
    assert out.uns["normalization"]["method"] == "forced_rescaled_log1p"


def test_counts_layer_with_log_x_and_candidate_order() -> None:
    a = synthetic_counts()
    logx = ad.AnnData(log1p_scaled(a.X, 1e4).astype(np.float32), layers={"counts": a.X.copy()})
    st = detect_normalization(logx)
    assert st.raw_source == "layers['counts']"
    assert st.x_state == "log1p_10k"
    # counts wins over raw_counts; a non-integer 'raw' layer is skipped
    b = ad.AnnData(logx.X.copy(), layers={"raw": logx.X.copy(), "raw_counts": a.X.copy()})
    assert detect_normalization(b).raw_source == "layers['raw_counts']"
    b.layers["counts"] = a.X.copy()
    assert detect_normalization(b).raw_source == "layers['counts']"


def test_raw_x_source_and_raw_with_missing_genes_ignored() -> None:
    a = synthetic_counts()
    full = a.copy()
    full.X = log1p_scaled(a.X, 1e4).astype(np.float32)
    full.raw = a.copy()  # raw.X = counts, same genes
    st = detect_normalization(full)
    assert st.raw_source == "raw.X"
    out = ensure_normalized(full)
    assert out.raw is None and out.uns["normalization"]["raw_dropped"]
    assert (out.layers["counts"] != a.X).nnz == 0
    np.testing.assert_allclose(out.X.toarray(), log1p_scaled(a.X, 1e4).toarray(), rtol=1e-5, atol=1e-5)

    sub = full[:, :150].copy()
    sub.raw = a[:, :100].copy()  # raw lacks 50 of X's genes: cannot supply counts for them
    assert detect_normalization(sub).raw_source is None


def test_small_linear_scaled_counts_are_linear_not_log() -> None:
    """Per-cell scaled counts with max < 25 (e.g. per-volume without ×1000) must not pass as log."""
    a = synthetic_counts()
    rng = np.random.default_rng(3)
    volume = rng.uniform(50, 500, size=a.n_obs)
    X = sp.diags(1.0 / volume) @ sp.csr_matrix(a.X, dtype=np.float64)
    st = detect_normalization(ad.AnnData(sp.csr_matrix(X, dtype=np.float32)))
    assert st.max_value < 25
    assert st.x_state == "linear"
    assert st.linear_count_structure > 0.9


def test_integer_tolerance_and_threshold() -> None:
    a = synthetic_counts(n_cells=300)
    rng = np.random.default_rng(1)
    noisy = a.X.astype(np.float64)
    noisy.data = noisy.data + rng.uniform(-5e-7, 5e-7, noisy.data.size)
    assert is_count_matrix(noisy)
    for frac, expected in ((0.03, True), (0.10, False)):
        m = a.X.astype(np.float64)
        hit = rng.random(m.data.size) < frac
        m.data[hit] += 0.5
        assert is_count_matrix(m) is expected


def test_detection_is_seeded_and_sampled() -> None:
    a = synthetic_counts(n_cells=3000)
    s1 = detect_normalization(a, n_sample=500, seed=7)
    s2 = detect_normalization(a, n_sample=500, seed=7)
    assert s1 == s2
    assert s1.n_sampled == 500
    assert s1.n_rows_sampled == 200  # max(200, n_sample // 5)


def test_detection_never_densifies_a_huge_sparse_matrix() -> None:
    """200k × 30k dense would be 24 GB; detection must stay at the size of the sampled rows."""
    rng = np.random.default_rng(0)
    n, g, nnz = 200_000, 30_000, 400_000
    X = sp.csr_matrix(
        (rng.integers(1, 5, nnz).astype(np.float32), (rng.integers(0, n, nnz), rng.integers(0, g, nnz))), shape=(n, g)
    )
    tracemalloc.start()
    st = detect_normalization(ad.AnnData(X))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert st.x_state == "raw"
    assert peak < 100e6


def test_backed_h5ad_detection(tmp_path: Path) -> None:
    a = synthetic_counts()
    a.X = log1p_scaled(a.X, 1e4).astype(np.float32)
    a.write_h5ad(tmp_path / "x.h5ad")
    b = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")
    st = detect_normalization(b)
    assert st.x_state == "log1p_10k"
    b.file.close()


# ------------------------------------------------------------------------- ensure_normalized


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_ensure_normalized_from_raw(fmt: str) -> None:
    a = synthetic_counts()
    if fmt == "csc":
        a.X = sp.csc_matrix(a.X)
    elif fmt == "dense":
        a.X = a.X.toarray()
    before_X = a.X.copy()
    before_obs = a.obs.copy()
    out = ensure_normalized(a)
    # caller untouched
    assert type(a.X) is type(before_X)
    assert (abs(a.X - before_X)).sum() == 0
    assert "counts" not in a.layers and "normalization" not in a.uns
    pd.testing.assert_frame_equal(a.obs, before_obs)
    # output
    assert out is not a
    assert out.X.dtype == np.float32
    assert sp.issparse(out.X) == (fmt != "dense")
    sums = expm1_row_sums(out.X)
    lib = np.asarray(before_X.sum(axis=1)).ravel()
    np.testing.assert_allclose(sums[lib > 0], 1e4, rtol=1e-5)
    assert np.all(sums[lib == 0] == 0)
    assert np.isfinite(out.X.data if sp.issparse(out.X) else out.X).all()
    np.testing.assert_array_equal(np.asarray(sp.csr_matrix(out.layers["counts"]).toarray()), np.asarray(sp.csr_matrix(before_X).toarray()))
    assert out.uns["normalization"] == {
        "source_state": "raw",
        "raw_source": "X",
        "target_sum": 1e4,
        "method": "from_raw_counts",
        "integer_fraction": 1.0,
        "median_row_sum": pytest.approx(float(np.median(lib[lib > 0]))),
        "raw_dropped": False,
    }


def test_ensure_normalized_log1p_10k_kept_as_is() -> None:
    a = synthetic_counts()
    X = log1p_scaled(a.X, 1e4).astype(np.float32)
    out = ensure_normalized(ad.AnnData(X))
    assert out.uns["normalization"]["method"] == "as_is"
    assert (out.X != X).nnz == 0
    assert out.X is not X


def test_ensure_normalized_counts_layer_over_log_x_uses_counts() -> None:
    a = synthetic_counts()
    wrong = log1p_scaled(a.X, 1e6).astype(np.float32)  # X on the wrong scale, counts present
    out = ensure_normalized(ad.AnnData(wrong, layers={"counts": a.X.copy()}))
    assert out.uns["normalization"]["raw_source"] == "layers['counts']"
    np.testing.assert_allclose(out.X.toarray(), log1p_scaled(a.X, 1e4).toarray(), rtol=1e-5, atol=1e-5)


def test_status_to_dict_is_h5ad_safe(tmp_path: Path) -> None:
    st = NormalizationStatus(raw_source=None, x_state="negative", integer_fraction=0.0, median_row_sum=None, n_sampled=3)
    d = st.to_dict()
    assert d["raw_source"] == "" and np.isnan(d["median_row_sum"]) and d["is_usable"] is False
    a = ad.AnnData(np.zeros((2, 2), dtype=np.float32), uns={"n": d})
    a.write_h5ad(tmp_path / "s.h5ad")
    assert ad.read_h5ad(tmp_path / "s.h5ad").uns["n"]["x_state"] == "negative"


def test_plan_rows_match_ensure_normalized_on_the_gene_subset_without_copying() -> None:
    """Streaming normalisation (per row block, gene subset read on demand) == whole-matrix path."""
    from spatial_assets.core.normalization import ensure_normalized, plan_normalization

    rng = np.random.default_rng(3)
    counts = sp.csr_matrix(rng.poisson(rng.gamma(1.0, 2.0, size=(500, 40))).astype(np.float32))
    genes = [f"G{i}" for i in range(40)]
    a = ad.AnnData(X=counts, var=pd.DataFrame(index=genes))
    pick = ["G7", "G3", "G30", "G12"] + genes[15:30]
    plan = plan_normalization(a, pick)
    assert plan.method == "from_raw_counts" and plan.status.raw_source == "X"
    whole = ensure_normalized(a[:, pick].copy()).X.toarray()
    streamed = sp.vstack([plan.rows(s, min(s + 64, a.n_obs)) for s in range(0, a.n_obs, 64)]).toarray()
    np.testing.assert_allclose(streamed, whole, rtol=1e-6, atol=1e-6)
    # library size is over the picked genes only: every non-empty row sums to 1e4 after expm1
    sums = np.expm1(streamed.astype(np.float64)).sum(1)
    np.testing.assert_allclose(sums[sums > 0], 1e4, rtol=1e-4)
    assert (a.X != counts).nnz == 0 and a.X.dtype == np.float32  # input untouched


def test_keep_counts_false_drops_the_counts_copy() -> None:
    from spatial_assets.core.normalization import ensure_normalized

    rng = np.random.default_rng(4)
    a = ad.AnnData(X=sp.csr_matrix(rng.poisson(2.0, size=(300, 20)).astype(np.float32)))
    assert "counts" in ensure_normalized(a).layers
    out = ensure_normalized(a, keep_counts=False)
    assert "counts" not in out.layers
    np.testing.assert_allclose(out.X.toarray(), ensure_normalized(a).X.toarray())


# ------------------------------------------------------------------ the one entry point for consumers


@pytest.mark.parametrize("state", ["raw_X", "counts_layer_log_X", "log1p_10k", "linear", "dense_raw"])
def test_log_normalized_equals_ensure_normalized_in_every_usable_state(state: str) -> None:
    """Domains, domain annotation, Novae and plots all call log_normalized: it must be exactly the
    matrix ensure_normalized puts in X, whatever state the input is in, and leave the input alone."""
    from spatial_assets.core.normalization import log_normalized

    a = synthetic_counts(seed=5)
    counts = a.X.copy()
    if state == "counts_layer_log_X":
        a.layers["counts"] = counts.copy()
        a.X = log1p_scaled(counts, 1e4).astype(np.float32)
    elif state == "log1p_10k":
        a.X = log1p_scaled(counts, 1e4).astype(np.float32)
    elif state == "linear":
        a.X = sp.csr_matrix(counts.multiply(1.0 / np.random.default_rng(1).uniform(50, 200, (a.n_obs, 1))), dtype=np.float32)
    elif state == "dense_raw":
        a.X = counts.toarray()
    before = a.X.copy()
    x, record = log_normalized(a)
    ref = ensure_normalized(a)
    assert record == ref.uns["normalization"]
    assert sp.issparse(x) == sp.issparse(ref.X) and x.dtype == np.float32
    dense = lambda m: m.toarray() if sp.issparse(m) else m  # noqa: E731
    np.testing.assert_allclose(dense(x), dense(ref.X), rtol=1e-6, atol=1e-6)
    assert np.array_equal(dense(a.X), dense(before))
    if state in ("log1p_10k", "linear"):
        return  # a 3-gene subset of already-scaled data has no recognisable scale of its own
    # a gene subset of counts is normalised over that subset, in the order asked for
    pick = ["G9", "G2", "G40"]
    sub, _ = log_normalized(a, pick)
    np.testing.assert_allclose(dense(sub), dense(ensure_normalized(a[:, pick].copy()).X), rtol=1e-6, atol=1e-6)


def test_log_normalized_refuses_what_ensure_normalized_refuses() -> None:
    from spatial_assets.core.normalization import log_normalized

    a = synthetic_counts(seed=6)
    a.X = log1p_scaled(a.X, 1e6).astype(np.float32)  # log1p CPM, no counts anywhere
    with pytest.raises(NormalizationError, match="log1p CPM"):
        log_normalized(a)
    x, record = log_normalized(a, unsafe_force=True)
    assert record["method"] == "forced_rescaled_log1p"
    np.testing.assert_allclose(expm1_row_sums(x)[1:], 1e4, rtol=1e-3)


def test_log_normalized_columns_use_the_library_of_all_genes() -> None:
    """Plots densify a few genes only; their values must be those of the full normalisation."""
    from spatial_assets.core.normalization import log_normalized, log_normalized_columns

    a = synthetic_counts(seed=7)
    idx = np.array([5, 0, 77])
    cols = log_normalized_columns(a, idx, block_rows=128)  # several row blocks
    full, _ = log_normalized(a)
    assert cols.shape == (a.n_obs, 3) and cols.dtype == np.float64
    np.testing.assert_allclose(cols, full[:, idx].toarray(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the dataset's own scale


@pytest.mark.parametrize("shipped", ["raw", "log1p_10k", "linear_median", "log1p_cpm"])
def test_library_scale_recovers_molecule_libraries_from_normalised_data(shipped: str) -> None:
    """Spot data is often shared library-size normalised: the libraries (and so the dataset's own
    target sum) must come out the same as from the raw counts, whatever normalisation was applied."""
    from spatial_assets.core.normalization import library_scale

    a = synthetic_counts(seed=8)
    true = np.asarray(a.X.sum(1)).ravel()
    if shipped == "log1p_10k":
        a.X = log1p_scaled(a.X, 1e4).astype(np.float32)
    elif shipped == "log1p_cpm":
        a.X = log1p_scaled(a.X, 1e6).astype(np.float32)
    elif shipped == "linear_median":  # scanpy normalize_total's default target
        x = sp.csr_matrix(a.X, dtype=np.float64)
        x = sp.diags(np.divide(np.median(true[true > 0]), true, out=np.zeros_like(true), where=true > 0)) @ x
        a.X = sp.csr_matrix(x, dtype=np.float32)
    scale = library_scale(a)
    assert scale.source == ("raw_counts" if shipped == "raw" else "recovered_counts")
    np.testing.assert_allclose(scale.sizes, true, rtol=1e-3)
    assert scale.median == pytest.approx(np.median(true[true > 0]), rel=1e-3)
    assert scale.record()["median"] == pytest.approx(scale.median)


def test_library_scale_without_count_structure_uses_the_linear_row_sums() -> None:
    from spatial_assets.core.normalization import library_scale

    a = synthetic_counts(seed=9)
    rng = np.random.default_rng(0)
    x = sp.csr_matrix(a.X, dtype=np.float64)
    x.data = x.data * rng.uniform(0.5, 1.5, x.data.size)  # continuous values: no integer ratios
    a.X = sp.csr_matrix(x, dtype=np.float32)
    scale = library_scale(a)
    assert scale.source == "row_sums"
    np.testing.assert_allclose(scale.sizes, np.asarray(a.X.sum(1), dtype=np.float64).ravel(), rtol=1e-5)


def test_rescale_scaled_log_is_exact_and_opt_in() -> None:
    """log1p CPM of counts is refused by default (cell typing's contract), but rescaled exactly when the
    caller opts in (the domain engines): expm1 has the integer-ratio structure of scaled counts."""
    from spatial_assets.core.normalization import log_normalized

    a = synthetic_counts(seed=10)
    counts = a.X.copy()
    a.X = log1p_scaled(counts, 1e6).astype(np.float32)
    with pytest.raises(NormalizationError):
        log_normalized(a, target_sum=300.0)
    x, record = log_normalized(a, target_sum=300.0, rescale_scaled_log=True)
    assert record["method"] == "rescaled_log1p"
    np.testing.assert_allclose(x.toarray(), log1p_scaled(counts, 300.0).toarray(), rtol=1e-4, atol=1e-4)
    noise = synthetic_counts(seed=11)
    y = sp.csr_matrix(noise.X, dtype=np.float64)
    y.data = np.log1p(y.data * np.random.default_rng(1).uniform(0.5, 1.5, y.data.size))  # log of non-counts
    noise.X = sp.csr_matrix(y, dtype=np.float32)
    with pytest.raises(NormalizationError):
        log_normalized(noise, target_sum=300.0, rescale_scaled_log=True)
