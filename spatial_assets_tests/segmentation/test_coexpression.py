"""The vectorised ComSeg co-expression step gives ComSeg's own numbers and is undone afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from spatial_assets.segmentation.coexpression import coexpression_dict, coexpression_matrix, fast_coexpression


class _Dataset:
    """The two attributes ``get_dict_proba_edge_in_situ`` reads from a ComSegDataset."""

    def __init__(self, genes):
        self.selected_genes = genes
        self.disable_tqdm = True


@pytest.mark.parametrize("distance", ["pearson", "spearman"])
def test_same_numbers_as_comseg(distance):
    from comseg.dataset import ComSegDataset

    rng = np.random.default_rng(3)
    counts = rng.poisson(rng.gamma(1.0, 1.0, size=(1, 7)), size=(60, 7)).astype(float)
    counts[:, 4] = 2.0  # a gene constant over the sample: NaN correlation, -1 in ComSeg
    counts[:, 5] = counts[:, 0] * 2 + rng.poisson(0.2, 60)  # strongly correlated with gene 0
    genes = [f"g{i}" for i in range(7)]
    theirs = ComSegDataset.get_dict_proba_edge_in_situ(_Dataset(genes), counts, distance=distance)
    ours = coexpression_dict(genes, counts, distance)
    assert set(ours) == set(theirs)
    for g in genes:
        assert set(ours[g]) == set(theirs[g])
        for h in genes:
            assert ours[g][h] == pytest.approx(theirs[g][h], abs=1e-9), (g, h)
    assert ours["g4"]["g1"] == -1.0 and ours["g0"]["g5"] > 0.5


def test_matrix_is_symmetric_and_rejects_unknown_distance():
    x = np.random.default_rng(0).poisson(2.0, size=(30, 5)).astype(float)
    c = coexpression_matrix(x)
    assert np.allclose(c, c.T) and np.allclose(np.diag(c), 1.0)
    with pytest.raises(ValueError, match="kendall"):
        coexpression_matrix(x, "kendall")


def test_fast_coexpression_is_restored_even_on_error():
    from comseg.dataset import ComSegDataset

    original = ComSegDataset.get_dict_proba_edge_in_situ
    with pytest.raises(RuntimeError):
        with fast_coexpression():
            assert ComSegDataset.get_dict_proba_edge_in_situ is not original
            raise RuntimeError("inside")
    assert ComSegDataset.get_dict_proba_edge_in_situ is original
