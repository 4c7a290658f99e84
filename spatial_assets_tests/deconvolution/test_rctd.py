"""RCTD (rctd-py, CPU) runs offline through ``deconvolve`` with locally computed likelihood tables."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("rctd")

from spatial_assets.deconvolution import PROPORTIONS_KEY, check_proportions, deconvolve  # noqa: E402
from spatial_assets_tests.deconvolution.conftest import truth_r  # noqa: E402


def test_rctd_full_mode_offline(small_case, tmp_path: Path) -> None:
    """σ fixed (rctd-py's ``sigma_override``) to keep the test fast: the σ search needs ~20-80 tables
    and runs in benchmarks/bench_deconvolution.py."""
    spots, ref = small_case
    sub = spots[:300].copy()
    out = deconvolve(
        sub, ref, label_column="cell_type", method="rctd", seed=0,
        method_params={"table_dir": str(tmp_path), "sigma": 30},
    )  # fmt: skip
    assert check_proportions(out).passed
    info = out.uns["deconvolution"]
    params = info["parameters"]
    assert info["method"] == "rctd" and info["native_units"] == "transcripts" and info["units"] == "cells"
    assert params["mode"] == "full" and params["sigma"] == 0.3 and params["sigma_rounds"] == 0
    # tables were computed (not downloaded) and cached for the next run
    assert params["n_tables_computed"] == 1 and len(list(tmp_path.glob("q_sigma030_*.npy"))) == 1
    assert params["K_val"] == int(sub.X.max())
    assert truth_r(out, sub) > 0.85
    assert list(out.obsm[PROPORTIONS_KEY].columns) == sorted(ref.obs["cell_type"].unique())
