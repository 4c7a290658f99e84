"""Inputs the CLI refuses with the platform's own check: NaN/inf in X, duplicated cell ids."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.sparse as sp

from spatial_assets.cli import main
from spatial_assets.core.spatial import SpatialInputError, prepare_spatial_cells
from spatial_assets.domains.synthetic import make_synthetic_tissue

PROGRESS_LINE = re.compile(r"^\[\s*\d+\.\d+s\] ")


def _error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0][len("error: ") :]


def test_celltype_refuses_nonfinite_x_like_the_platform(tmp_path, capsys, poa_reference_path, load_merfish):
    a = load_merfish()[:1500].copy()
    X = a.X.toarray()
    X[[3, 3, 700], [5, 9, 20]] = [np.inf, np.nan, -np.inf]
    a.X = sp.csr_matrix(X)
    bad = tmp_path / "with_inf.h5ad"
    a.write_h5ad(bad)
    out_dir = tmp_path / "out"
    rc = main(["celltype", "--reference", str(poa_reference_path), "--label-column", "cell_type",
               "--spatial", str(bad), "--out", str(out_dir / "a.h5ad")])  # fmt: skip
    assert rc == 2
    message = _error(capsys.readouterr().err)
    assert message.startswith(f"{bad}: X has 3 non-finite values (NaN or infinite) in 2 cells")
    assert f"cell {a.obs_names[3]!r}, gene {a.var_names[5]!r}" in message
    assert not out_dir.exists()
    # the platform's spatial_cells validation gives the very same message
    with pytest.raises(SpatialInputError) as platform:
        prepare_spatial_cells(a, sample_id="s1", source=str(bad))
    assert str(platform.value) == message


def _tissue_with_duplicate_ids(tmp_path):
    a = make_synthetic_tissue(400, n_domains=2, n_samples=1, seed=0)
    names = a.obs_names.to_numpy().copy()
    names[10] = names[3]
    a.obs_names = names
    path = tmp_path / "dup_ids.h5ad"
    a.write_h5ad(path)
    return path, str(names[3])


def test_domains_refuses_duplicate_cell_ids_as_celltype_does(tmp_path, capsys, poa_reference_path):
    path, dup = _tissue_with_duplicate_ids(tmp_path)
    out_dir = tmp_path / "out"
    assert main(["domains", "--spatial", str(path), "--n-domains", "2", "--out", str(out_dir / "d.h5ad")]) == 2
    domains_message = _error(capsys.readouterr().err)
    assert domains_message == f"{path}: 1 duplicate cell ids in obs_names (2 cells), e.g. {dup!r}"
    assert not out_dir.exists()
    rc = main(["celltype", "--reference", str(poa_reference_path), "--label-column", "cell_type",
               "--spatial", str(path), "--out", str(out_dir / "a.h5ad")])  # fmt: skip
    assert rc == 2
    assert _error(capsys.readouterr().err) == domains_message
    assert not out_dir.exists()
