"""``spatial-assets deconvolve`` through the real entry point (``cli.main``): output, printout, exit codes."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from spatial_assets.cli import EXIT_BAD_INPUT, main
from spatial_assets.deconvolution import PROPORTIONS_KEY, check_proportions


@pytest.fixture()
def files(small_case, tmp_path: Path) -> tuple[Path, Path]:
    spots, ref = small_case
    s = spots[:200].copy()
    del s.obsm["true_proportions"]
    sp_path, ref_path = tmp_path / "spots.h5ad", tmp_path / "ref.h5ad"
    s.write_h5ad(sp_path)
    ref.write_h5ad(ref_path)
    return sp_path, ref_path


def test_cli_writes_proportions_and_prints_their_means(files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sp_path, ref_path = files
    out = tmp_path / "res" / "deconvolved.h5ad"
    plots = tmp_path / "plots"
    argv = ["deconvolve", "--reference", str(ref_path), "--label-column", "cell_type", "--spatial", str(sp_path),
            "--out", str(out), "--method", "nnls", "--seed", "1", "--plots", str(plots)]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    res = ad.read_h5ad(out)
    assert check_proportions(res).passed and res.uns["deconvolution"]["method"] == "nnls" and res.uns["deconvolution"]["seed"] == 1
    means = res.obsm[PROPORTIONS_KEY].mean()
    for label, value in means.items():
        assert f"  {label}: {value:.4f}" in captured.out
    assert "200 spots deconvolved with nnls" in captured.out
    assert "deconvolving with nnls" in captured.err
    assert "done" in captured.err and "files written:" in captured.out  # progress on stderr
    assert sorted(p.name for p in plots.iterdir()) == ["cell_type_proportions.png", "dominant_cell_type.png"]
    assert [p.name for p in (tmp_path / "res").iterdir()] == ["deconvolved.h5ad"]  # no temp file left


def test_cli_bad_input_exits_2_and_writes_nothing(files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sp_path, ref_path = files
    bad = ad.read_h5ad(sp_path)
    X = bad.X.toarray()
    X[0, 0] = -3
    bad.X = sp.csr_matrix(X)
    bad_path = tmp_path / "bad_spots.h5ad"
    bad.write_h5ad(bad_path)
    out = tmp_path / "out" / "x.h5ad"
    base = ["deconvolve", "--reference", str(ref_path), "--label-column", "cell_type", "--out", str(out)]
    assert main(base + ["--spatial", str(bad_path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "error: " in err and "bad_spots.h5ad" in err and "negative values" in err
    # no shared gene
    other = ad.read_h5ad(ref_path)
    other.var_names = [f"X{i}" for i in range(other.n_vars)]
    other_path = tmp_path / "other_ref.h5ad"
    other.write_h5ad(other_path)
    argv = ["deconvolve", "--reference", str(other_path), "--label-column", "cell_type", "--out", str(out), "--spatial", str(sp_path)]
    assert main(argv) == EXIT_BAD_INPUT
    assert "shares no gene" in capsys.readouterr().err
    # a non-integer count
    frac = ad.read_h5ad(sp_path)
    X = frac.X.toarray()
    X[2, 1] += 0.25
    frac.X = sp.csr_matrix(X)
    frac_path = tmp_path / "frac_spots.h5ad"
    frac.write_h5ad(frac_path)
    assert main(base + ["--spatial", str(frac_path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "frac_spots.h5ad" in err and "non-integer" in err
    # a reference class with fewer than 5 cells, named
    tiny = ad.read_h5ad(ref_path)
    first = tiny.obs["cell_type"].astype(str).to_numpy()
    keep = np.ones(tiny.n_obs, bool)
    keep[np.flatnonzero(first == "Microglia")[4:]] = False
    tiny_path = tmp_path / "tiny_ref.h5ad"
    tiny[keep].copy().write_h5ad(tiny_path)
    argv = ["deconvolve", "--reference", str(tiny_path), "--label-column", "cell_type", "--out", str(out), "--spatial", str(sp_path)]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Microglia" in err and "4 cells" in err
    assert main(base + ["--spatial", str(tmp_path / "missing.h5ad")]) == EXIT_BAD_INPUT
    assert not out.exists() and not out.parent.exists() or not any(out.parent.iterdir())


def test_cli_marks_a_visium_hd_table(files, tmp_path: Path) -> None:
    sp_path, ref_path = files
    plain = ad.read_h5ad(sp_path)
    plain.uns.pop("spot")
    p = tmp_path / "plain.h5ad"
    plain.write_h5ad(p)
    out = tmp_path / "o.h5ad"
    argv = ["deconvolve", "--reference", str(ref_path), "--label-column", "cell_type", "--spatial", str(p), "--out", str(out),
            "--method", "nnls", "--kind", "visium_hd_bin", "--bin-size-um", "16"]  # fmt: skip
    assert main(argv) == 0
    res = ad.read_h5ad(out)
    assert res.uns["spot"]["bin_size_um"] == 16.0 and res.uns["deconvolution"]["spot_kind"] == "visium_hd_bin"
    np.testing.assert_allclose(res.obsm[PROPORTIONS_KEY].sum(axis=1), 1.0)


def test_cli_choices_are_the_packages_own() -> None:
    """The parser lists methods / units / kinds without importing the science; they must stay the real ones."""
    from spatial_assets.cli import deconvolve as cli
    from spatial_assets.deconvolution.deconvolve import DEFAULT_METHOD
    from spatial_assets.deconvolution.methods import METHODS, UNITS
    from spatial_assets.deconvolution.spots import SPOT_KINDS

    assert cli.METHODS == METHODS and cli.DEFAULT_METHOD == DEFAULT_METHOD
    assert cli.UNITS == UNITS and cli.SPOT_KINDS == SPOT_KINDS
