"""RCTD likelihood tables computed locally equal rctd-py's own integral, and are cached on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rctd")

from rctd._likelihood import _get_q_single, build_x_vals  # noqa: E402

from spatial_assets.deconvolution.rctd_tables import QTables, compute_q_table  # noqa: E402


@pytest.mark.parametrize("sigma", [0.6])
def test_table_rows_match_rctd_py(sigma: float) -> None:
    x = build_x_vals()
    table = compute_q_table(sigma, x, 8)
    assert table.shape == (8, x.size)
    for k in (0, 1, 7):
        ref = np.log(np.maximum(_get_q_single(x, k, sigma), 1e-300))
        np.testing.assert_allclose(table[k], ref, rtol=0, atol=1e-9)


def test_tables_are_cached_and_a_larger_table_serves_a_smaller_k(tmp_path: Path) -> None:
    big = QTables(12, cache_dir=tmp_path)
    t_big = big.get(55)
    assert big.n_computed == 1 and len(list(tmp_path.glob("q_sigma055_*.npy"))) == 1
    again = QTables(12, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.get(55), t_big)
    small = QTables(5, cache_dir=tmp_path)
    np.testing.assert_array_equal(small.get(55), t_big[:8])
    assert again.n_computed == 0 and small.n_computed == 0
    assert small.spline(55).shape == (8, small.x_vals.size)
    with pytest.raises(ValueError, match="k_val"):
        QTables(0, cache_dir=tmp_path)
