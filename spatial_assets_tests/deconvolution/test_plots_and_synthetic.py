"""Deconvolution figures, and the ground-truth builders the benchmarks rely on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from spatial_assets.deconvolution import DeconvolutionInputError, deconvolution_plots, deconvolve
from spatial_assets.deconvolution.synthetic import TRUTH_KEY, cell_spacing, pseudo_spots, undo_per_cell_scaling


def test_plots_are_written(small_case, tmp_path: Path) -> None:
    spots, ref = small_case
    out = deconvolve(spots, ref, label_column="cell_type", method="nnls")
    paths = deconvolution_plots(out, tmp_path / "p", n_top=3)
    assert set(paths) == {"dominant_type", "proportion_maps"}
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert sorted(x.name for x in (tmp_path / "p").iterdir()) == sorted(p.name for p in paths.values())
    with pytest.raises(DeconvolutionInputError, match="run deconvolve first"):
        deconvolution_plots(spots, tmp_path / "q")


def test_undo_per_cell_scaling_recovers_counts() -> None:
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(50, 20)).astype(float)
    counts[:, 0] = np.maximum(counts[:, 0], 1)  # every cell has a gene with a count ≥ 1
    counts[np.arange(50), rng.integers(1, 20, 50)] = 1  # …and one with exactly one transcript
    volume = rng.uniform(200, 2000, size=50)
    scaled = counts / volume[:, None] * 1000.0
    C, unit, frac = undo_per_cell_scaling(sp.csr_matrix(scaled.astype(np.float32)))
    np.testing.assert_array_equal(C.toarray(), counts)
    np.testing.assert_allclose(1000.0 / unit, volume, rtol=1e-5)
    assert frac == 1.0
    _, _, frac_noise = undo_per_cell_scaling(scaled * rng.uniform(0.7, 1.3, size=scaled.shape))
    assert frac_noise < 0.3


def test_pseudo_spots_sum_cells_and_know_their_composition() -> None:
    xy = np.array([[1.0, 1.0], [2.0, 1.5], [11.0, 1.0], [12.0, 2.0], [13.0, 3.0], [1.0, 12.0]])
    labels = ["A", "B", "A", "A", "Ambiguous", "Ambiguous"]
    counts = sp.csr_matrix(np.arange(12, dtype=float).reshape(6, 2))
    s = pseudo_spots(counts, xy, labels, ["g1", "g2"], bin_size=10.0, ignore_labels=("Ambiguous",))
    assert s.n_obs == 2  # the bin holding only an Ambiguous cell has no truth and is dropped
    np.testing.assert_array_equal(s.X.toarray(), [[0 + 2, 1 + 3], [4 + 6 + 8, 5 + 7 + 9]])
    truth = s.obsm[TRUTH_KEY]
    np.testing.assert_allclose(truth.loc[:, "A"].to_numpy(), [0.5, 1.0])
    assert list(s.obs["n_cells"]) == [2, 3] and list(s.obs["n_labelled_cells"]) == [2, 2]
    assert s.uns["spot"]["kind"] == "visium_hd_bin" and s.uns["spot"]["bin_size_um"] == 10.0
    assert cell_spacing(xy) == pytest.approx(np.median([1.118, 1.118, 1.414, 1.414, 1.414, 11.0]), rel=1e-2)
