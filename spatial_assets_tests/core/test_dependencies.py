"""The pinned scanpy / pynndescent pair works on the code paths that need pynndescent.

scanpy 1.11.5 with pynndescent 0.7.0 (the earlier pin) crashes in ``sc.pp.neighbors`` with
``'csr_array' object has no attribute 'getnnz'`` as soon as pynndescent is used: 0.7.0 returns a
``csr_array`` and scanpy calls ``getnnz``. scanpy takes that path for ``transformer="pynndescent"``
and, by default, from 8,192 cells on (euclidean metric), which is where celltypist's majority
voting (``sc.pp.neighbors`` on its PCA) meets it. Both paths run here on real libraries.
"""

from __future__ import annotations

from importlib.metadata import version

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

#: scanpy uses pynndescent by default from this many cells (euclidean), below it exact brute force
SCANPY_PYNNDESCENT_MIN_CELLS = 8192


def _clusters(n: int, n_dims: int, n_types: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 4.0, size=(n_types, n_dims))
    types = rng.integers(0, n_types, size=n)
    return (centers[types] + rng.normal(size=(n, n_dims))).astype(np.float32), types


@pytest.fixture()
def pynndescent_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the real PyNNDescentTransformer.fit_transform (which still runs)."""
    from pynndescent import PyNNDescentTransformer

    calls: list[int] = []
    real = PyNNDescentTransformer.fit_transform

    def counted(self, X, *args, **kwargs):
        calls.append(int(X.shape[0]))
        return real(self, X, *args, **kwargs)

    monkeypatch.setattr(PyNNDescentTransformer, "fit_transform", counted)
    return calls


def test_constraints_pin_the_installed_pair() -> None:
    from pathlib import Path

    pins = dict(
        line.strip().split("==", 1)
        for line in (Path(__file__).resolve().parents[2] / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert pins["scanpy"] == version("scanpy") and pins["pynndescent"] == version("pynndescent")


def test_scanpy_neighbors_through_pynndescent(pynndescent_calls: list[int]) -> None:
    import scanpy as sc
    from sklearn.neighbors import NearestNeighbors

    X, _ = _clusters(5000, 20, 6, seed=0)
    a = ad.AnnData(X)
    sc.pp.neighbors(a, use_rep="X", n_neighbors=15, transformer="pynndescent", random_state=0)
    assert pynndescent_calls == [5000]
    D = sp.csr_matrix(a.obsp["distances"])
    assert D.shape == (5000, 5000) and sp.issparse(a.obsp["connectivities"])
    assert a.obsp["connectivities"].nnz > 0 and a.uns["neighbors"]["params"]["n_neighbors"] == 15
    # approximate neighbours: nearly all of the 14 exact nearest ones (self excluded) per cell
    exact = NearestNeighbors(n_neighbors=15).fit(X).kneighbors(X, return_distance=False)[:, 1:]
    recalls = []
    for i, e in enumerate(exact):
        lo, hi = D.indptr[i], D.indptr[i + 1]
        idx = D.indices[lo:hi][np.argsort(D.data[lo:hi], kind="stable")]
        idx = idx[idx != i][:14]
        assert len(idx) == 14, i
        recalls.append(len(set(idx) & set(e)) / 14)
    assert np.mean(recalls) > 0.95


def test_celltypist_majority_voting(tmp_path, pynndescent_calls: list[int]) -> None:
    import celltypist

    from spatial_assets.celltyping.training import save_model, train_model

    n, n_genes, n_types = SCANPY_PYNNDESCENT_MIN_CELLS + 808, 60, 4
    rng = np.random.default_rng(1)
    rates = np.exp(rng.normal(0.0, 1.0, size=(n_types, n_genes)))
    types = rng.integers(0, n_types, size=n)
    counts = rng.poisson(rates[types] * 3.0).astype(np.float32)
    lognorm = np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) * 1e4)
    genes = [f"g{i}" for i in range(n_genes)]
    obs = pd.DataFrame({"cell_type": pd.Categorical([f"type{t}" for t in types])}, index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(lognorm, obs=obs, var=pd.DataFrame(index=genes))

    model = train_model(adata[:2000].copy(), seed=0)  # a small model: 2,000 cells, 60 genes, 4 classes
    path = tmp_path / "model.pkl"
    save_model(model, path)
    query = ad.AnnData(adata.X.copy(), obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(index=genes))
    result = celltypist.annotate(query, model=celltypist.models.Model.load(str(path)), majority_voting=True)

    assert pynndescent_calls == [n]  # the neighbour graph of the over-clustering went through pynndescent
    labels = result.predicted_labels
    assert {"predicted_labels", "over_clustering", "majority_voting"} <= set(labels.columns)
    assert labels["over_clustering"].nunique() > n_types
    accuracy = float((labels["majority_voting"].astype(str).to_numpy() == obs["cell_type"].astype(str).to_numpy()).mean())
    assert accuracy > 0.95
